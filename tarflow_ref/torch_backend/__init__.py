"""The PyTorch backend: the same TarFlow as the NumPy reference, with the released state-dict keys.

model.py mirrors flow.py / attention.py / model.py; engine.py makes sequential sampling fast and
textbook.py is the readable loop it equals; sampling.py is the one sampling entry point, with the
sequential sampler or GS-Jacobi (jacobi.py, strategy_search.py) as its choice; draw.py draws many
batches of samples for an evaluation, and inception.py is the FID feature network of the released
statistics files; distributed.py runs a command as several processes under torchrun.
"""
