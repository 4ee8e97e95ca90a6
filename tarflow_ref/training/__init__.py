"""Training by the released recipe (train.py) on image data sets (data.py), in torch."""
