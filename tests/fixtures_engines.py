"""Fixtures that build the tiny model and start real engines (filled in by the engines work)."""
