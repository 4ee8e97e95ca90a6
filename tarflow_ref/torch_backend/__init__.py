"""The PyTorch backend: the same TarFlow as the NumPy reference, with the released state-dict keys."""
from .model import TarFlow
from .sampling import Sampler, inverse, sample

__all__ = ["TarFlow", "inverse", "sample", "Sampler"]
