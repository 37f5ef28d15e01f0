"""The DataFlow drop-in: the operator, its FileStorage, serving adapters and the DataFlow compatibility shims.

May import the chain and its backends; never the fleet.
"""
