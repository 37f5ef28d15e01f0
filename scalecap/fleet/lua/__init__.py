"""The queue protocol's Lua transitions, one file per script (loaded by scalecap.fleet.protocol)."""
