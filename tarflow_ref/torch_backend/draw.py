"""Many samples, batch after batch, as the released evaluation draws them (book/checkpoints.md,
"Inverse, guidance and sampling"): one noise generator seeded once, labels cycled over the images,
and a batch whose samples hold a NaN drawn again with fresh noise before it is denoised or used
(and, should denoising itself give a NaN, drawn again too).

The noise of batch k is the k-th draw of the one seeded stream, whoever asks for it: a stream
asked for batch k first draws (and drops) the noise of the batches before it that it has not
drawn. So several processes that each take some of the batches (torch_backend/distributed.py:
batch k on rank k mod W) draw exactly the images that one process draws. A redraw takes its
noise from a second generator, seeded by (seed, k), so that it leaves the stream of the other
batches as it is, on whichever rank it happens.

The stream's state is the generator's and the batch it stands at, so a long run saves
`state(start)` with its results and a resumed run continues with exactly the noise it would have
drawn (the FID pipeline does this).
"""
import torch

MAX_REDRAWS = 10


class NanSamples(RuntimeError):
    """MAX_REDRAWS batches in a row came out NaN."""


class SampleStream:
    """Images [b, c, S, S] in model range (float32, CPU), batch by batch.

    sampler(noise [b, T, D], y) -> images; denoise(x, y) -> x or None; labels: [n] or None.
    Batches are asked for by their start (`starts()`), in increasing order; any may be left out.
    """

    def __init__(self, sampler, cfg, n: int, batch_size: int, labels=None, seed: int = 0, device="cpu",
                 denoise=None):
        self.sampler, self.cfg, self.n, self.batch_size = sampler, cfg, n, batch_size
        self.labels, self.device, self.denoise, self.seed = labels, device, denoise, seed
        self.gen = torch.Generator().manual_seed(seed)
        self.next = 0                                   # the start of the batch whose noise `gen` draws next

    def starts(self) -> range:
        return range(0, self.n, self.batch_size)

    def batch(self, start: int) -> torch.Tensor:
        count = min(self.batch_size, self.n - start)
        y = None if self.labels is None else self.labels[start:start + count].to(self.device)
        noise = self._noise(start)
        redraws = torch.Generator().manual_seed((self.seed << 32) + start // self.batch_size + 1)
        for _ in range(MAX_REDRAWS):
            x = self.sampler(noise.to(self.device), y)
            if self.denoise is not None and not torch.isnan(x).any():
                x = self.denoise(x, y)
            if not torch.isnan(x).any():
                break
            noise = torch.randn(noise.shape, generator=redraws)
        else:
            raise NanSamples(f"{MAX_REDRAWS} batches in a row came out NaN")
        return x.detach().float().cpu()

    def _noise(self, start: int) -> torch.Tensor:
        """The noise [b, T, D] of the batch at `start`, after the batches before it."""
        self.skip_to(start)
        count = min(self.batch_size, self.n - start)
        self.next = start + count
        return torch.randn(count, self.cfg.tokens, self.cfg.token_dim, generator=self.gen)

    def skip_to(self, start: int):
        if start < self.next:
            raise ValueError(f"the batch at {start} was asked for after the one before {self.next}: "
                             f"batches come in increasing order")
        while self.next < start:
            self._noise(self.next)

    def state(self, start: int) -> dict:
        """The state for continuing at the batch `start` (the noise before it drawn)."""
        self.skip_to(start)
        return {"generator": self.gen.get_state(), "start": start}

    def restore(self, state: dict):
        self.gen.set_state(state["generator"])
        self.next = int(state["start"])
