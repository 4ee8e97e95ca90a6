"""tarflow_ref: a readable, numerically verified reference implementation of TarFlow.

The top-level modules are the NumPy reference, one concept each (they import no torch); the
layers above it live in sub-packages: torch_backend/ (the same model in torch, fast sampling),
io/ (checkpoints), training/, evaluation/ (FID), cli/ and grading/. The public surface below is
imported lazily, so `import tarflow_ref.flow` needs no torch:

    TarFlowConfig                    one configuration object (config.py)
    load_checkpoint(path)            a released or trained checkpoint -> torch TarFlow, strictly
    TarFlow(cfg)                     the torch model: model(x, y) -> z, logdet; model.loss(x, y)
    sample(model, noise, y, guidance, sampler=...)   sampling: sequential (default) or GS-Jacobi
    Sampler(model, guidance, bf16)   the same for many batches: one engine (CUDA graphs) per batch size
    Guidance(weight, what, ...)      classifier-free guidance settings
    denoise(model, x, y, factor=)    one Tweedie step that removes the training noise (torch)
    sample_gsj(model, noise, y, strategy, guidance)   GS-Jacobi sampling; gs_jacobi(strategy) its sampler;
    parse_strategy, PRESETS, auto_strategy(model, ...)    strategies (preset, list, compact, automatic)
    to_numpy(model), from_numpy(...) the same weights as the NumPy reference's parameter dict
    download_release(name)           a released file from the cache folder, else the hub (registry.py)
    tarflow_ref.model                the NumPy reference: forward / inverse / sample
"""
import importlib

_PUBLIC = {
    "TarFlowConfig": ".config",
    "Guidance": ".guidance",
    "PRESETS": ".strategy",
    "parse_strategy": ".strategy_text",
    "load_checkpoint": ".io.checkpoint",
    "to_numpy": ".io.checkpoint",
    "from_numpy": ".io.checkpoint",
    "download_release": ".registry",
    "CheckpointError": ".io.checkpoint",
    "TarFlow": ".torch_backend.model",
    "sample": ".torch_backend.sampling",
    "Sampler": ".torch_backend.sampling",
    "denoise": ".torch_backend.denoising",
    "sample_gsj": ".torch_backend.jacobi",
    "gs_jacobi": ".torch_backend.jacobi",
    "auto_strategy": ".torch_backend.strategy_search",
}

__all__ = list(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'tarflow_ref' has no attribute '{name}'")
    value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
