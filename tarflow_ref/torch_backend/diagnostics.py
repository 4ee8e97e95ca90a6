"""IGM and CRM (diagnostics.py) of the blocks of a torch TarFlow; the metrics themselves are
computed in float64 NumPy by the same functions as for the NumPy model."""
import torch

from ..diagnostics import Diagnostics, block_metrics
from ..patchify import patchify
from ..validation import check_image, check_labels
from .checks import tensors_of


@torch.no_grad()
def block_metrics_torch(block, x, z, y=None):
    """block_metrics of a torch MetaBlock; x, z: [B, T, D] tensors in IMAGE order (x in, z out)."""
    def numpy(t):
        return t.double().cpu().numpy()

    def evaluate(tokens):
        return tuple(numpy(v) for v in block.conditioner(torch.as_tensor(tokens).to(x), y))
    return block_metrics(numpy(block.permute(x)), numpy(block.permute(z)), evaluate,
                         numpy(block.proj_out.weight))


@torch.no_grad()
def diagnose_torch(model, images, y=None) -> Diagnostics:
    """IGM and CRM of every block of a torch TarFlow from a forward pass of images: [B, c, S, S]."""
    tensors = tensors_of(model)
    check_image(images, model.config, tensors, "images")
    check_labels(y, model.config.num_classes, len(images), tensors)
    z = patchify(images, model.config.patch_size)
    rows = []
    for block in model.blocks:
        out, _ = block(z, y)
        rows.append(block_metrics_torch(block, z, out, y))
        z = out
    return Diagnostics.from_blocks(rows)
