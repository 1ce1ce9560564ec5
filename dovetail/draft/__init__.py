"""The Dovetail feature draft: its model (model.py), checkpoints (checkpoint.py), the shipped ones."""
