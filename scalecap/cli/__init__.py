"""The in-process `scalecap caption` command and the config/engine flags it shares with submit and worker.

May import the chain, backends and images; never the fleet.
"""
