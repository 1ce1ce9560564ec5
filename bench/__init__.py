"""Benchmarks: target-only decoding and Dovetail back to back, on the same prompts."""
