"""Celery workers: the app, tasks, GPU pinning, engine lifetime, result sinks, webhook delivery."""
