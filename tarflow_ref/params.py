"""The NumPy model's parameters without torch: the released state-dict keys and shapes, the recipe's
initialisation, and weights drawn away from it (book/checkpoints.md, "State-dict keys and shapes"
and "Training recipe").

With T tokens, C the width, D values per token, K classes and L layers per block:

    var                                              [T, D]        ones (the prior's variance)
    blocks.{b}.pos_embed / class_embed               [T, C] / [K, 1, C]    N(0, 0.01^2)
    blocks.{b}.attn_mask                             [T, T]        the causal mask of ones
    blocks.{b}.proj_in / proj_out                    Linear(D, C) / Linear(C, 2D); proj_out = 0
    blocks.{b}.attn_blocks.{l}.attention.{norm,qkv,proj}, .mlp.{norm,main.0,main.2}

Linear layers start as torch's do, weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); layer
norms at gain 1 and bias 0. proj_out = 0 makes every block the identity map, so a fresh flow is
the identity: tests draw the weights away from it (`randomize`), by the rule `away_from_init`
that torch_backend.model.randomize_ follows too.
"""
import math

import numpy as np

BUFFERS = ("var", "attn_mask")              # state-dict entries that are not trained parameters


def shapes(cfg) -> dict:
    """key -> shape of every state-dict entry, in the order of the torch model's state_dict()."""
    T, C, D, K = cfg.tokens, cfg.width, cfg.token_dim, cfg.num_classes
    out = {"var": (T, D)}
    for b in range(cfg.blocks):
        p = f"blocks.{b}."
        out[p + "pos_embed"] = (T, C)
        if K:
            out[p + "class_embed"] = (K, 1, C)
        out[p + "attn_mask"] = (T, T)
        out.update(_linear(p + "proj_in", C, D))
        for l in range(cfg.layers):
            q = f"{p}attn_blocks.{l}."
            out.update({q + "attention.norm.weight": (C,), q + "attention.norm.bias": (C,)})
            out.update(_linear(q + "attention.qkv", 3 * C, C) | _linear(q + "attention.proj", C, C))
            out.update({q + "mlp.norm.weight": (C,), q + "mlp.norm.bias": (C,)})
            out.update(_linear(q + "mlp.main.0", 4 * C, C) | _linear(q + "mlp.main.2", C, 4 * C))
        out.update(_linear(p + "proj_out", 2 * D, C))
    return out


def _linear(name, out_features, in_features):
    return {name + ".weight": (out_features, in_features), name + ".bias": (out_features,)}


def init_params(cfg, seed: int = 0) -> dict:
    """The recipe's initialisation (the module docstring), float64: a flow that is the identity map."""
    rng = np.random.default_rng(seed)
    table, params = shapes(cfg), {}
    for key, shape in table.items():
        if key == "var":
            params[key] = np.ones(shape)
        elif key.endswith("attn_mask"):
            params[key] = np.tril(np.ones(shape))
        elif key.endswith(("pos_embed", "class_embed")):
            params[key] = rng.normal(0.0, 1e-2, shape)
        elif ".norm." in key:
            params[key] = np.ones(shape) if key.endswith("weight") else np.zeros(shape)
        elif key.split(".")[-2] == "proj_out":
            params[key] = np.zeros(shape)
        else:                                                    # Linear weight or bias
            bound = 1.0 / math.sqrt(table[key.rsplit(".", 1)[0] + ".weight"][1])      # 1 / sqrt(fan_in)
            params[key] = rng.uniform(-bound, bound, shape)
    return params


def away_from_init(key: str, shape, out_scale: float):
    """(mean, std) of the normal draw that replaces trained parameter `key`: Linear weights
    N(0, 1/fan_in), embeddings and biases N(0, 0.1^2), layer-norm gains N(1, 0.1^2), proj_out
    N(0, out_scale^2 / C), so that |a| stays moderate and the inverse well conditioned."""
    if key.endswith("proj_out.weight"):
        return 0.0, out_scale / shape[1] ** 0.5
    if key.endswith("norm.weight"):
        return 1.0, 0.1
    if key.endswith("weight") and len(shape) == 2:
        return 0.0, 1.0 / shape[1] ** 0.5
    return 0.0, 0.1


def randomize(params, seed: int = 0, out_scale: float = 0.3) -> dict:
    """A copy of `params` with every trained parameter drawn by `away_from_init` (buffers kept)."""
    rng = np.random.default_rng(seed)
    out = dict(params)
    for key, value in params.items():
        if key.split(".")[-1] not in BUFFERS:
            mean, std = away_from_init(key, value.shape, out_scale)
            out[key] = rng.standard_normal(value.shape) * std + mean
    return out


def random_params(cfg, seed: int = 0, out_scale: float = 0.3) -> dict:
    """Float64 parameters with weights away from the initialisation: init_params, then randomize."""
    return randomize(init_params(cfg, seed), seed, out_scale)
