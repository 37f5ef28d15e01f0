"""The producer side: submit batches to the fleet and follow them. Needs no torch or vLLM.

Names load on first use, so `scalecap --help` and `scalecap caption` need neither Celery nor Redis.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BatchNotFound", "FleetClient", "SubmitResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from producer import client

        return getattr(client, name)
    raise AttributeError(f"module 'producer' has no attribute {name!r}")
