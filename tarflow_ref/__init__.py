"""tarflow_ref: a readable, numerically verified reference implementation of TarFlow.

Public surface (shared by the notebooks, the CLI and outside users):

    TarFlowConfig                    one configuration object (config.py)
    load_checkpoint(path)            a released or trained checkpoint -> torch TarFlow, strictly
    TarFlow(cfg)                     the torch model: model(x, y) -> z, logdet; model.loss(x, y)
    sample(model, noise, y, ...)     sequential sampling with a KV cache and guidance (torch)
    Sampler(model, guidance, bf16)   the same for many batches: one engine (CUDA graphs) per batch size
    Guidance(weight, what, ...)      classifier-free guidance settings
    denoise(model, x, y, factor)     one Tweedie step that removes the training noise (torch)
    sample_gsj(model, noise, y, strategy, guidance)   GS-Jacobi sampling; parse_strategy, PRESETS,
    auto_strategy(model, ...)        strategies (preset, list, compact [Stack-GS-J-Else], automatic)
    to_numpy(model), from_numpy(...) the same weights as the NumPy reference's parameter dict
    tarflow_ref.model                the NumPy reference: forward / inverse / sample
"""
from .checkpoint import CheckpointError, download_release, from_numpy, load_checkpoint, to_numpy
from .config import TarFlowConfig
from .guidance import Guidance
from .strategy import PRESETS, parse_strategy
from .torch_backend import Sampler, TarFlow, sample
from .torch_backend.denoise import denoise
from .torch_backend.jacobi import auto_strategy, sample_gsj

__all__ = ["TarFlowConfig", "load_checkpoint", "TarFlow", "sample", "Sampler", "Guidance", "denoise", "sample_gsj",
           "auto_strategy", "parse_strategy", "PRESETS", "to_numpy", "from_numpy", "download_release",
           "CheckpointError"]
