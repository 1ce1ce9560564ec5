"""Speculative decoding as pure functions: tree shapes and the acceptance rules.

Both sides use them (the coordinator to read a draft's tree, the target worker to verify it),
so they import nothing else of Dovetail.
"""
