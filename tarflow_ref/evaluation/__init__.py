"""Evaluation by FID, in torch: the statistics files and resumable runs (fid.py) and the digits'
feature network with its training (digit_features.py), on the Fréchet distance of frechet.py."""
