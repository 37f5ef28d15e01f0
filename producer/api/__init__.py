"""The HTTP API (`scalecap api`): FastAPI routes over FleetClient, with keys, quotas and metrics.

`producer.api.app.create_app` builds it; routes live one family per module (batches, captions,
health), errors are problem details (problems.py).
"""
