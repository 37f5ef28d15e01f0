"""What producers and workers share: the queue protocol and its Lua, the Celery app, sinks, keys, redaction.

May import the chain (scalecap.*) and redis/celery/boto3; the chain never imports this package.
"""
