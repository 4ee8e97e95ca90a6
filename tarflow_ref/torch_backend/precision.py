"""Precision rules shared by the torch code: float32 at least where bfloat16 loses too much, and the
released evaluation's bfloat16 autocast."""
import contextlib

import torch


def wide(t):
    """At least float32: exp and means of bfloat16 values lose too much (the recipe does the same)."""
    return t.float() if t.element_size() < 4 else t


def autocast(device, bf16: bool):
    """bfloat16 autocast, as the released evaluation samples. Meant for CUDA; it works on the CPU
    too (slowly), which lets the tests run the bfloat16 path."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def check_bf16_model(dtype):
    """Autocast casts float32 only: a model of another dtype would silently run in that dtype."""
    if dtype != torch.float32:
        raise ValueError(f"bfloat16 autocast needs a float32 model, this one is {dtype}")
