"""Files: checkpoints read strictly (weights_only) and written atomically, and the conversion between
the torch model and the NumPy reference's parameter dict (checkpoint.py)."""
