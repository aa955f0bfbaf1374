"""Data-parallel training over ``torch.distributed``: what :func:`saelib.core.train.train_sae` needs
when a process group is initialised (launched with ``torchrun``; gloo on CPU, nccl on GPU).

The scheme is plain synchronous data parallelism, as in SAELens and sparsify:

* every rank holds the same SAE (broadcast from rank 0 at the start) and the same random
  streams, so every rank draws the same combined batch indices, Matryoshka prefixes and
  resampling choices; rank ``r`` keeps rows ``[r * b, (r + 1) * b)`` of the combined batch
  (``b = batch_size / world_size``);
* after the backward pass the gradients are averaged over ranks (one ``all_reduce`` per
  parameter), so clipping and the Adam step see the gradient of the combined batch and the
  parameters stay identical on every rank;
* statistics of the batch (the L0 the sparsity controller reads, the permutation statistic, the
  logged metrics, the loss of the divergence check, the firing record of dead-latent resampling,
  the frequency of the ``smooth_l0_freq`` penalty) are reduced over ranks, so every rank takes
  the same decisions; resampling gathers the combined batch.

Equal to one process on the combined batch up to float rounding (sums over the batch are split
into per-rank sums; tests/core/test_distributed.py). The gradient all-reduce is written out instead
of wrapping the SAE in ``DistributedDataParallel``: the loss reads parameters outside
``forward`` (decoder norms, the Matryoshka prefixes), and four tensors need no bucketing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DataParallel", "data_parallel"]


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the default process group.

    Attributes:
        rank: this process's rank, ``0 .. world_size - 1``.
        world_size: number of processes (>= 2; one process trains without this class).
    """

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes (progress bar, callbacks)."""
        return self.rank == 0

    def local_rows(self, batch_size: int) -> slice:
        """This rank's rows of a combined batch of ``batch_size`` rows.

        Raises ValueError if ``batch_size`` does not divide by the world size.
        """
        if batch_size % self.world_size:
            raise ValueError(
                f"TrainConfig.batch_size={batch_size} must be divisible by the torch.distributed "
                f"world size {self.world_size} (each rank trains on batch_size / world_size rows)"
            )
        b = batch_size // self.world_size
        return slice(self.rank * b, (self.rank + 1) * b)

    # ------------------------------------------------------------------ parameters
    @torch.no_grad()
    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (in place)."""
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)

    @torch.no_grad()
    def average_gradients(self, params: Iterable[Tensor]) -> None:
        """Replace every parameter's ``.grad`` with its mean over ranks (in place)."""
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(self.world_size)

    # ------------------------------------------------------------------ batch statistics
    def sum(self, t: Tensor) -> Tensor:
        """Elementwise sum over ranks (a new tensor; no gradient)."""
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def mean(self, t: Tensor) -> Tensor:
        """Elementwise mean over ranks (a new tensor; no gradient): the mean over the combined
        batch of a per-rank batch mean, since every rank holds the same number of rows."""
        return self.sum(t) / self.world_size

    def any(self, t: Tensor) -> Tensor:
        """Elementwise logical or over ranks of a bool tensor (a new bool tensor)."""
        return self.sum(t.to(torch.int32)) > 0

    def batch_mean(self, t: Tensor) -> Tensor:
        """Mean over dim 0 of the combined batch, ``[b, ...] -> [...]`` (no gradient), the same
        on every rank. Taken as the sum over ranks of row sums over the combined row count, so a
        mean of counts (e.g. L0) is exact as long as the counts are."""
        return self.sum(t.sum(0)) / (t.shape[0] * self.world_size)

    def penalty_batch_mean(self, t: Tensor) -> Tensor:
        """Mean over dim 0 of the combined batch, ``[b, ...] -> [...]``, with a gradient that is
        right after :meth:`average_gradients`.

        Its value is the combined mean on every rank; its gradient is that of this rank's own mean
        (``world_size / batch_size`` per row). Averaging the gradients over ranks then gives each
        row of the combined batch ``1 / batch_size``, times the same outer derivative on every
        rank: the gradient of a function of the combined mean (e.g. a latent's firing frequency
        inside a non-linear penalty).
        """
        local = t.mean(0)
        return self.mean(local) + (local - local.detach())  # value: combined; gradient: local

    def gather_rows(self, t: Tensor) -> Tensor:
        """The combined batch ``[batch_size, ...]`` from every rank's rows ``[b, ...]``, in rank
        order (no gradient)."""
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)


def data_parallel() -> DataParallel | None:
    """The data-parallel setting of this process: None when ``torch.distributed`` is not
    initialised or has one process (plain single-process training), else a :class:`DataParallel`.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return None if world == 1 else DataParallel(dist.get_rank(), world)
