"""Many samples, batch after batch, as the released evaluation draws them (book/checkpoints.md,
"Inverse, guidance and sampling"): one noise generator seeded once, labels cycled over the images,
and a batch whose samples hold a NaN drawn again with fresh noise before it is denoised or used
(and, should denoising itself give a NaN, drawn again too).

The stream's whole state is the generator's, so a long run saves `state()` with its results and a
resumed run continues with exactly the noise it would have drawn (the FID pipeline does this).
"""
import torch

MAX_REDRAWS = 10


class NanSamples(RuntimeError):
    """MAX_REDRAWS batches in a row came out NaN."""


class SampleStream:
    """Images [b, c, S, S] in model range (float32, CPU), batch by batch.

    sampler(noise [b, T, D], y) -> images; denoise(x, y) -> x or None; labels: [n] or None.
    Batches must be asked for in order (`starts()`): each one draws the next noise of the stream.
    """

    def __init__(self, sampler, cfg, n: int, batch_size: int, labels=None, seed: int = 0, device="cpu",
                 denoise=None):
        self.sampler, self.cfg, self.n, self.batch_size = sampler, cfg, n, batch_size
        self.labels, self.device, self.denoise = labels, device, denoise
        self.gen = torch.Generator().manual_seed(seed)

    def starts(self) -> range:
        return range(0, self.n, self.batch_size)

    def batch(self, start: int) -> torch.Tensor:
        count = min(self.batch_size, self.n - start)
        y = None if self.labels is None else self.labels[start:start + count].to(self.device)
        for _ in range(MAX_REDRAWS):
            noise = torch.randn(count, self.cfg.tokens, self.cfg.token_dim, generator=self.gen).to(self.device)
            x = self.sampler(noise, y)
            if self.denoise is not None and not torch.isnan(x).any():
                x = self.denoise(x, y)
            if not torch.isnan(x).any():
                break
        else:
            raise NanSamples(f"{MAX_REDRAWS} batches in a row came out NaN")
        return x.detach().float().cpu()

    def state(self) -> dict:
        return {"generator": self.gen.get_state()}

    def restore(self, state: dict):
        self.gen.set_state(state["generator"])
