"""tarflow_ref: a readable, numerically verified reference implementation of TarFlow.

Public surface (shared by the notebooks, the CLI and outside users):

    TarFlowConfig                    one configuration object (config.py)
    load_checkpoint(path)            a released or trained checkpoint -> torch TarFlow, strictly
    TarFlow(cfg)                     the torch model: model(x, y) -> z, logdet; model.loss(x, y)
    sample(model, noise, y, ...)     sequential sampling with a KV cache and guidance (torch)
    Guidance(weight, what, ...)      classifier-free guidance settings
    to_numpy(model), from_numpy(...) the same weights as the NumPy reference's parameter dict
    tarflow_ref.model                the NumPy reference: forward / inverse / sample
"""
from .checkpoint import CheckpointError, download_release, from_numpy, load_checkpoint, to_numpy
from .config import TarFlowConfig
from .guidance import Guidance
from .torch_backend import TarFlow, sample

__all__ = ["TarFlowConfig", "load_checkpoint", "TarFlow", "sample", "Guidance", "to_numpy", "from_numpy",
           "download_release", "CheckpointError"]
