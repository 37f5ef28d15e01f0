"""Fixtures that start real redis-server, SeaweedFS and webhook receivers (filled in by the fleet work)."""
