"""Training SAEs (all instances at once): Adam, warmup-stable-decay LR, per-instance gradient
clipping, an adaptive L1 coefficient that steers L0 to a target, optional Matryoshka loss and
latent permutation; on any device and dtype (the SAE's, :class:`saelib.core.sae.SAEConfig`), and
data-parallel over ``torch.distributed`` when a process group is initialised (see
:func:`train_sae` and :mod:`saelib.core.distributed`). :func:`train_sae` composes the parts in
:mod:`saelib.core.train_parts` (the loss of one step, the sparsity controller, dead-latent
resampling, latent permutation) with the data streams, the divergence check, the optimiser step
and :meth:`History.record`.

The recipe follows Nabeshima's Matryoshka SAE code (``noanabeshima/matryoshka-saes``, ``sae.py``):
Adam(lr 3e-2, betas (0.5, 0.9375)), grad-norm clip 1.0, WSD schedule, and a sparsity controller
(an idea credited there to Glen Taggart) that multiplies the coefficient by ``1 ± eps`` each step
after a linear warm-up, depending on whether the batch L0 is above or below the target.

Losses (per instance, summed over instances so instances never share a gradient):

* reconstruction: ``MSE = mean_batch ||x - x_hat||²`` (squared error summed over ``d_in``), or the
  Matryoshka mean over prefixes of the same quantity;
* sparsity: ``coeff * mean_batch sum_j penalty(a_j ||W_dec[j]||)``.

Logged FVU is ``sum_batch ||x - x_hat||² / sum_batch ||x - mean_batch(x)||²`` (see
:func:`saelib.core.metrics.fvu`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .distributed import DataParallel, data_parallel
from .matryoshka import MatryoshkaConfig, PerInstanceMatryoshka
from .metrics import active, squared_error, total_variance
from .penalties import FREQ_TARGET
from .sae import SAE
from .train_parts import DeadLatentResampler, LatentPermuter, SparsityController, SparsityPenalty, step_loss

__all__ = [
    "TrainConfig",
    "History",
    "train_sae",
    "wsd_lr_factor",
    "TrainingDivergedError",
    "retain_freed_cpu_memory",
]

DataFunction = Callable[[int, torch.Generator], Tensor | tuple[Tensor, Tensor]]
DataSource = DataFunction | Tensor | tuple[Tensor, Tensor] | list[DataFunction]


class TrainingDivergedError(FloatingPointError):
    """Raised when the loss becomes NaN/inf or explodes during training."""


@dataclass
class TrainConfig:
    """Optimisation settings shared by every instance (per-instance values where noted).

    Attributes:
        steps: optimiser steps.
        batch_size: samples per step (the same batch is seen by every instance unless the data
            source returns ``[batch, inst, d_in]`` or ``independent_instances`` is set; then it is
            per instance).
        lr: peak Adam learning rate.
        betas: Adam betas (Nabeshima: (0.5, 0.9375)).
        grad_clip: max gradient norm per instance (None: no clipping).
        warmup_steps: linear LR warm-up steps.
        decay_frac: final fraction of the steps over which the LR decays linearly.
        end_lr_factor: LR at the end as a fraction of ``lr``.
        l1_coeff: sparsity coefficient (a float, or one per instance for a sweep).
        target_l0: None keeps ``l1_coeff`` fixed; a number (or one per instance) turns on the
            adaptive controller that steers the batch L0 towards it. Must be in ``(0, d_sae]``
            (checked by :func:`train_sae`, where the SAE is known).
        l1_adapt_eps: multiplicative step of the controller.
        l1_warmup_frac: fraction of the steps over which the coefficient ramps up linearly from 0.
        penalty: sparsity penalty name (see :mod:`saelib.core.penalties`), or one per instance;
            ignored for TopK/BatchTopK.
        freq_target: target firing frequency ``rho`` of the ``smooth_l0_freq`` penalty's frequency
            term (one value, or one per instance). None: ``target_l0 / d_sae`` when ``target_l0``
            is set (every latent firing equally often at the target L0), else
            :data:`saelib.core.penalties.FREQ_TARGET` (0.05). Ignored by the other penalties.
        scale_penalty_by_decoder_norm: apply the penalty to ``a_j * ||W_dec[j]||`` (True) or to
            the raw activation ``a_j`` (False, e.g. for a sparse MLP with a fixed decoder scale).
        matryoshka: None for a plain SAE, else the prefix configuration, or one configuration
            per instance (variants trained side by side; ``MatryoshkaConfig(mode="fixed",
            prefixes=(d_sae,))`` makes an instance a plain SAE).
        unit_norm_decoder: renormalise decoder rows to 1 after every step.
        resample_dead_every: every this many steps (during the first half of training), latents
            that did not fire in the window are re-initialised towards an input of the current
            batch (a simplified version of Anthropic's neuron resampling, "Towards
            Monosemanticity" 2023); None disables it.
        log_every: steps between logged history rows.
        divergence_factor: stop if the loss exceeds this multiple of its first value.
        seed: seed of data sampling, prefix sampling and dead-latent resampling.
        independent_instances: False (the default, and the behaviour before this option): one
            data stream shared by all instances (one batch per step, seen by every instance) and
            one stream of Matryoshka prefix draws and one of resampling draws over all instances
            at once, so an instance's result depends on how many train beside it. True: every
            instance has its own generators, derived from ``(seed, instance id)`` (see
            ``instance_ids``), for its data (the data function is called once per instance per
            step and the batches are stacked to ``[batch, inst, d]``; stored tensors draw each
            instance's rows separately), its random Matryoshka prefix lengths and its
            dead-latent resampling, so instance ``i`` trains exactly as it would alone (its
            initial weights via :meth:`saelib.core.sae.SAE.instance`, ``instance_ids=[i]``) and
            ``n`` instances are ``n`` independent seeds, not ``n`` initialisations that share
            one data stream (what notebooks 01-05 need for seed statistics). The data function must then
            return one instance's batch, ``[batch, d_in]`` (or a pair), and costs ``n_inst``
            calls per step; latent permutation and TopK/BatchTopK draw nothing and need no
            stream. Equal to the lone run up to floating-point rounding: a one-instance run takes
            other kernel paths (~1e-7 apart in float32 per step, which training can amplify);
            on the CPU, runs of 2 and 3 instances agree bit for bit (tests/test_train.py).
        instance_ids: with ``independent_instances``, the id of each instance whose generators
            it uses (distinct ids give unrelated streams); None means ``0 .. n_inst - 1``. Lets a
            run stand in for instances of a larger one: ``instance_ids=[3]`` retrains instance 3
            alone, ``[0, 1]`` the first two instances of any run with the same seed. Ids may
            repeat: instances with one id see the same data (drawn once per step, so a sweep of
            several settings per seed costs one data draw per seed) and the same prefix and
            resampling draws. Its length must be ``n_inst`` (checked by :func:`train_sae`).
        progress: show a tqdm progress bar.
        retain_cpu_memory: opt-in (default False). On Linux with glibc and an SAE on the CPU,
            keep freed memory in the process heap (see :func:`retain_freed_cpu_memory`): glibc
            otherwise hands every block over 32 MiB back to the OS on free and page-faults it in
            again on the next step (measured at d_sae 4096, batch 4096: ~100k page faults and
            ~15 % of every step). Process-wide and permanent: it changes the allocator of the
            whole process, and the resident memory does not shrink after training, which is why
            it is off unless asked for. Never changes results.
    """

    steps: int = 10_000
    batch_size: int = 200
    lr: float = 3e-2
    betas: tuple[float, float] = (0.5, 0.9375)
    grad_clip: float | None = 1.0
    warmup_steps: int = 100
    decay_frac: float = 0.2
    end_lr_factor: float = 0.1
    l1_coeff: float | Sequence[float] = 1.0
    target_l0: float | Sequence[float] | None = None
    l1_adapt_eps: float = 3e-4
    l1_warmup_frac: float = 0.2
    penalty: str | Sequence[str] = "l1"
    freq_target: float | Sequence[float] | None = None
    scale_penalty_by_decoder_norm: bool = True
    matryoshka: MatryoshkaConfig | Sequence[MatryoshkaConfig] | None = None
    unit_norm_decoder: bool = False
    resample_dead_every: int | None = None
    log_every: int = 100
    divergence_factor: float = 1e4
    seed: int = 0
    independent_instances: bool = False
    instance_ids: Sequence[int] | None = None
    progress: bool = True
    retain_cpu_memory: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        if not (self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if not (0.0 <= self.decay_frac <= 1.0):
            raise ValueError(f"TrainConfig.decay_frac must be in [0, 1], got {self.decay_frac!r}")
        if not (0.0 <= self.l1_warmup_frac <= 1.0):
            raise ValueError(f"TrainConfig.l1_warmup_frac must be in [0, 1], got {self.l1_warmup_frac!r}")
        if self.resample_dead_every is not None and (
            not isinstance(self.resample_dead_every, int) or self.resample_dead_every < 1
        ):
            raise ValueError(f"TrainConfig.resample_dead_every must be None or an int >= 1, got {self.resample_dead_every!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not (0.0 <= self.end_lr_factor <= 1.0):
            raise ValueError(f"TrainConfig.end_lr_factor must be in [0, 1], got {self.end_lr_factor!r}")
        if not (0.0 <= self.l1_adapt_eps < 1.0):
            raise ValueError(f"TrainConfig.l1_adapt_eps must be in [0, 1), got {self.l1_adapt_eps!r}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be in [0, 1), got {self.betas!r}")
        if self.grad_clip is not None and not (self.grad_clip > 0):
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if self.freq_target is not None:
            ft = [self.freq_target] if isinstance(self.freq_target, (int, float)) else list(self.freq_target)
            if not ft or not all(isinstance(v, (int, float)) and 0 < v < 1 for v in ft):
                raise ValueError(f"TrainConfig.freq_target must be None or values in (0, 1), got {self.freq_target!r}")
        if self.instance_ids is not None:
            if not self.independent_instances:
                raise ValueError("TrainConfig.instance_ids needs independent_instances=True")
            ids = list(self.instance_ids)
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"TrainConfig.instance_ids must be a non-empty list of ints >= 0, got {self.instance_ids!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class History:
    """Per-logged-step training curves; every metric is ``[n_logged, inst]``.

    ``mse`` is the full-SAE reconstruction error (mean over batch of the squared error summed
    over ``d_in``), ``fvu`` its fraction of the batch variance (:func:`saelib.core.metrics.fvu`'s
    formula), ``l0`` the mean number of active latents (:func:`saelib.core.metrics.l0`'s
    definition), ``loss`` the total objective and ``l1_coeff`` the sparsity coefficient in force.
    """

    step: list[int] = field(default_factory=list)
    loss: list[Tensor] = field(default_factory=list)
    mse: list[Tensor] = field(default_factory=list)
    l0: list[Tensor] = field(default_factory=list)
    fvu: list[Tensor] = field(default_factory=list)
    l1_coeff: list[Tensor] = field(default_factory=list)

    def as_tensors(self) -> dict[str, Tensor]:
        """All curves stacked: ``{"step": [n], "loss": [n, inst], ...}``."""
        out = {"step": torch.tensor(self.step)}
        for name in ("loss", "mse", "l0", "fvu", "l1_coeff"):
            out[name] = torch.stack(getattr(self, name)) if self.step else torch.empty(0)
        return out

    def final(self, name: str) -> Tensor:
        """The last logged value of one curve, ``[inst]``."""
        return getattr(self, name)[-1]

    def record(
        self,
        step: int,
        loss: Float[Tensor, " inst"],
        x: Float[Tensor, "batch inst d_out"],
        x_hat: Float[Tensor, "batch inst d_out"],
        l0: Float[Tensor, " inst"],
        l1_coeff: Float[Tensor, " inst"],
        dp: DataParallel | None = None,
    ) -> None:
        """Append one logged step: the loss, L0 and coefficient as given (copied), the MSE and FVU
        of ``x_hat`` against ``x`` (under data-parallel training ``dp``, of the combined batch)."""
        err = squared_error(x, x_hat)  # [batch, inst]
        self.step.append(step)
        self.loss.append(loss.clone())
        self.mse.append(err.mean(0) if dp is None else dp.batch_mean(err))
        self.l0.append(l0)
        self.fvu.append(_fvu(x, err, dp))
        self.l1_coeff.append(l1_coeff.clone())


def wsd_lr_factor(step: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay multiplier of the learning rate at ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = cfg.steps * (1 - cfg.decay_frac)
    if step < decay_start or cfg.decay_frac == 0:
        return 1.0
    frac = (step - decay_start) / (cfg.steps * cfg.decay_frac)
    return 1.0 - (1.0 - cfg.end_lr_factor) * min(frac, 1.0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (glibc malloc.h)
_HEAP_LIMIT = 1 << 30  # blocks up to 1 GiB come from the heap; up to 1 GiB of free top is kept
_heap_retained = False


def retain_freed_cpu_memory() -> bool:
    """Make glibc keep freed blocks of up to 1 GiB in the heap for reuse (process-wide, once).

    By default glibc serves every allocation over its mmap threshold (at most 32 MiB) with a fresh
    ``mmap`` and unmaps it on free, so a training step that allocates ``[batch, d_sae]`` tensors of
    64 MiB page-faults all of that memory in again on every step (the kernel zeroes each 4 KiB
    page). This sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 1 GiB with ``mallopt``
    (the same effect as the ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment
    variables, which must be set before the process starts). It changes where memory comes from,
    never a computed value; the process keeps its peak heap instead of returning it to the OS.

    Returns True if the setting is in force, False where it does not apply (not Linux, or a C
    library without glibc's ``mallopt``, e.g. musl), where nothing is changed.
    """
    global _heap_retained
    if _heap_retained:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    # glibc only (gnu_get_libc_version exists): musl's mallopt is a no-op stub
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, _HEAP_LIMIT) == 1 and mallopt(_M_TRIM_THRESHOLD, _HEAP_LIMIT) == 1
    _heap_retained = ok
    return ok


def _per_instance(value: float | Sequence[float], n_inst: int, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(n_inst).clone()
    if t.numel() != n_inst:
        raise ValueError(f"TrainConfig.{name} has {t.numel()} values but n_inst={n_inst}")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"TrainConfig.{name} must be finite and >= 0, got {t.tolist()}")
    return t


def _check_stored(t: Tensor, d: int, what: str) -> None:
    if t.ndim != 2 or t.shape[1] != d:
        raise ValueError(f"{what} tensor must be [n_samples, {d}], got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{what} tensor contains NaN/inf (rows {bad} ...)")


def _sampler(
    data: DataSource, d_in: int, d_out: int, rows: slice | None = None
) -> tuple[Callable[[int, torch.Generator], Any], bool]:
    """Turn stored activations (a tensor, or an ``(inputs, targets)`` pair) into a sampler.

    Returns ``(sample, check_batches)``: stored tensors are checked for NaN/inf here, once, so
    ``check_batches`` is False for them and True for a data function, whose every batch
    :func:`train_sae` checks. With ``rows`` (data-parallel training) ``sample(batch, g)`` draws
    the combined batch of ``batch`` rows with ``g`` and returns only rows ``rows`` of it (stored
    data gathers only those rows; a data function makes the whole batch).
    """
    if isinstance(data, Tensor):
        if d_out != d_in:
            raise ValueError(
                f"a transcoder (d_in={d_in}, d_out={d_out}) trains on a pair (inputs, targets), "
                f"got one tensor of shape {tuple(data.shape)} as data"
            )
        data = (data, data)
    if isinstance(data, tuple):
        inputs, targets = data
        _check_stored(inputs, d_in, "input activation")
        if targets is not inputs:
            _check_stored(targets, d_out, "target activation")
            if len(targets) != len(inputs):
                raise ValueError(f"inputs have {len(inputs)} rows but targets have {len(targets)}")

        def sample(batch: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
            idx = torch.randint(len(inputs), (batch,), generator=g)
            if rows is not None:
                idx = idx[rows]
            return inputs[idx], targets[idx]

        return sample, False
    if rows is None:
        return data, True

    def local_part(batch: int, g: torch.Generator) -> Tensor | tuple[Tensor, Tensor]:
        out = data(batch, g)
        return tuple(t[rows] for t in out) if isinstance(out, tuple) else out[rows]  # type: ignore[return-value]

    return local_part, True


# the random streams of one instance under TrainConfig.independent_instances
_DATA_STREAM, _PREFIX_STREAM, _RESAMPLE_STREAM = 0, 1, 2


def _instance_generators(seed: int, instance_ids: Sequence[int], stream: int) -> list[torch.Generator]:
    """One CPU generator per instance for one random stream (data, prefixes or resampling).

    The generator of instance id ``i`` is seeded with a 64-bit state that numpy's
    ``SeedSequence(entropy=seed, spawn_key=(i, stream))`` hashes from the three numbers, so it is
    the same in every run that gives this instance id and seed, and unrelated to the stream of
    any other ``(seed, id, stream)`` (unlike ``seed + i``, where seed 0's instance 1 would be seed
    1's instance 0).
    """
    entropy = seed % 2**64  # SeedSequence takes non-negative ints only
    return [
        torch.Generator().manual_seed(
            int(np.random.SeedSequence(entropy, spawn_key=(i, stream)).generate_state(1, np.uint64)[0])
        )
        for i in instance_ids
    ]


def _stacked_batch(
    sample: Callable[[int, torch.Generator], Any] | list[Callable[[int, torch.Generator], Any]],
    batch_size: int,
    generators: list[torch.Generator],
    step: int,
    index: list[int] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """One batch per generator, stacked along the instance axis: ``[batch, inst, d]`` (a pair of
    them for ``(inputs, targets)`` data); with ``index``, instance ``i`` gets the batch of
    ``generators[index[i]]`` (instances that share an id share one draw). ``sample`` may be a list
    with one function per generator (per-instance data functions).

    Raises ValueError if the data function returns anything but one instance's ``[batch, d]``.
    """
    samplers = sample if isinstance(sample, list) else [sample] * len(generators)
    parts = [f(batch_size, g) for f, g in zip(samplers, generators)]
    for part in parts:
        for t in part if isinstance(part, tuple) else (part,):
            if t.ndim != 2:
                raise ValueError(
                    f"with TrainConfig.independent_instances the data function is called once per "
                    f"instance with that instance's generator and must return one instance's batch "
                    f"[batch, d], got shape {tuple(t.shape)} at step {step}"
                )
    if index is not None:
        parts = [parts[j] for j in index]
    if isinstance(parts[0], tuple):
        return tuple(torch.stack(ts, dim=1) for ts in zip(*parts))  # type: ignore[return-value]
    return torch.stack(parts, dim=1)


def _raise_non_finite_batch(x_in: Tensor, target: Tensor, n_inst: int, step: int) -> None:
    """Raise ValueError naming the step, the instances and the rows of a batch with NaN/inf
    (``x_in`` and ``target`` as the data function returned them: ``[batch, d]`` or
    ``[batch, inst, d]``)."""
    for what, t in (("input", x_in), ("target", target)):
        bad = ~torch.isfinite(t)
        if not bad.any():
            continue
        bad_rows = bad.any(-1)  # [batch] or [batch, inst]
        if t.ndim == 3:
            insts = bad_rows.any(0).nonzero().flatten().tolist()
            rows = bad_rows.any(1).nonzero().flatten().tolist()
        else:  # one batch shared by every instance
            insts, rows = list(range(n_inst)), bad_rows.nonzero().flatten().tolist()
        more = " ..." if len(rows) > 5 else ""
        raise ValueError(
            f"non-finite {what} batch at step {step} for instance(s) {insts}: the data source "
            f"returned NaN/inf (batch rows {rows[:5]}{more}); this is bad data, not a training divergence"
        )


def _raise_diverged(loss: Tensor, first_loss: Tensor, factor: float, step: int) -> None:
    """Raise :class:`TrainingDivergedError` naming the step and the offending instances."""
    non_finite = (~torch.isfinite(loss)).nonzero().flatten().tolist()
    if non_finite:
        raise TrainingDivergedError(f"non-finite loss at step {step} for instance(s) {non_finite}")
    bad = (loss > factor * first_loss).nonzero().flatten().tolist()
    raise TrainingDivergedError(
        f"loss diverged at step {step} for instance(s) {bad}: {loss[bad].tolist()} > {factor} x first loss"
    )


def _clip_per_instance(params: list[Tensor], max_norm: float) -> None:
    """Clip each instance's gradient (all parameters together) to ``max_norm``."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = sum(g.pow(2).flatten(1).sum(1) for g in grads)  # [inst]
    scale = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.ndim - 1))))


def _optimizer_step(
    loss: Tensor, params: list[Tensor], opt: torch.optim.Optimizer, sched: Any, cfg: TrainConfig, sae: SAE,
    dp: DataParallel | None,
) -> None:
    """Backward of the summed per-instance loss, data-parallel gradient average, per-instance
    clipping, the Adam and schedule steps, and the optional decoder renormalisation."""
    opt.zero_grad(set_to_none=True)
    loss.sum().backward()
    if dp is not None:
        dp.average_gradients(params)  # the combined batch's gradient, before clipping
    if cfg.grad_clip is not None:
        _clip_per_instance(params, cfg.grad_clip)
    opt.step()
    sched.step()
    if cfg.unit_norm_decoder:
        sae.normalize_decoder()


def _penalty_kinds(penalty: str | Sequence[str], n_inst: int) -> list[str]:
    kinds = [penalty] * n_inst if isinstance(penalty, str) else list(penalty)
    if len(kinds) != n_inst:
        raise ValueError(f"TrainConfig.penalty has {len(kinds)} entries but n_inst={n_inst}")
    return kinds


def _freq_targets(cfg: TrainConfig, target: Tensor | None, n_inst: int, d_sae: int) -> list[float]:
    """Per-instance target frequency of the ``smooth_l0_freq`` penalty (see ``TrainConfig.freq_target``)."""
    if cfg.freq_target is not None:
        ft = cfg.freq_target
        vals = [float(ft)] * n_inst if isinstance(ft, (int, float)) else [float(v) for v in ft]
        if len(vals) != n_inst:
            raise ValueError(f"TrainConfig.freq_target has {len(vals)} values but n_inst={n_inst}")
        return vals
    if target is not None:
        return (target.double() / d_sae).tolist()
    return [FREQ_TARGET] * n_inst


def _controller(cfg: TrainConfig, n_inst: int, d_sae: int, like: dict[str, Any]) -> SparsityController:
    """The sparsity controller of ``cfg`` (raises ValueError for a ``target_l0`` outside ``(0, d_sae]``)."""
    coeff = _per_instance(cfg.l1_coeff, n_inst, "l1_coeff").to(**like)
    target = None if cfg.target_l0 is None else _per_instance(cfg.target_l0, n_inst, "target_l0").to(**like)
    if target is not None:
        unreachable = ((target <= 0) | (target > d_sae)).nonzero().flatten().tolist()
        if unreachable:
            raise ValueError(
                f"TrainConfig.target_l0={cfg.target_l0!r} is not an L0 this SAE can reach with "
                f"d_sae={d_sae}: it must be in (0, {d_sae}] (instance(s) {unreachable})"
            )
    return SparsityController(coeff, target, cfg.l1_adapt_eps, int(cfg.l1_warmup_frac * cfg.steps))


def _sparsity_penalty(cfg: TrainConfig, target: Tensor | None, n_inst: int, d_sae: int, dp: DataParallel | None) -> SparsityPenalty:
    """The penalty of ``cfg`` (raises ValueError for per-instance lists of the wrong length)."""
    return SparsityPenalty(
        _penalty_kinds(cfg.penalty, n_inst),
        _freq_targets(cfg, target, n_inst, d_sae),
        cfg.scale_penalty_by_decoder_norm,
        None if dp is None else dp.penalty_batch_mean,
    )


@dataclass
class _Streams:
    """The random streams of a run (CPU generators): one generator each, or one per instance
    (``TrainConfig.independent_instances``)."""

    data: torch.Generator | list[torch.Generator]
    prefix: torch.Generator | list[torch.Generator]
    resample: torch.Generator | list[torch.Generator]
    # independent instances whose ids repeat: one data generator per distinct id, and the
    # position of each instance's generator in ``data`` (None when every id is distinct)
    data_index: list[int] | None = None


def _streams(cfg: TrainConfig, n_inst: int, share_data: bool = True) -> _Streams:
    """Seed the data, prefix and resampling streams (raises ValueError for bad ``instance_ids``)."""
    if cfg.independent_instances:  # one generator per instance and stream
        ids = list(range(n_inst)) if cfg.instance_ids is None else list(cfg.instance_ids)
        if len(ids) != n_inst:
            raise ValueError(f"TrainConfig.instance_ids has {len(ids)} ids but n_inst={n_inst}")
        # with one data function, an id's data stream is drawn once per step and shared; with one
        # function per instance every instance draws (from its id's stream) with its own function
        distinct = list(dict.fromkeys(ids)) if share_data else ids
        return _Streams(
            _instance_generators(cfg.seed, distinct, _DATA_STREAM),
            *(_instance_generators(cfg.seed, ids, s) for s in (_PREFIX_STREAM, _RESAMPLE_STREAM)),
            data_index=None if len(distinct) == len(ids) else [distinct.index(i) for i in ids],
        )
    # prefix sampling and dead-latent resampling draw from their own streams, so that neither
    # changes the data any instance sees
    return _Streams(
        torch.Generator().manual_seed(cfg.seed),
        torch.Generator().manual_seed(cfg.seed + 1_000_003),
        torch.Generator().manual_seed(cfg.seed + 2_000_003),
    )


def _next_batch(
    sample: Callable[[int, torch.Generator], Any] | list[Callable[[int, torch.Generator], Any]], streams: _Streams, cfg: TrainConfig, sae: SAE, check: bool, step: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """This step's ``(x_in, target, data_ok)`` on the SAE's device and dtype, as the data source
    shapes them (``[batch, d]`` or ``[batch, inst, d]``); ``target is x_in`` for an autoencoder;
    ``data_ok`` a 0-d bool (all finite) when ``check``, else None.

    Raises ValueError if a transcoder's data function returns one tensor, or as :func:`_stacked_batch`.
    """
    if cfg.independent_instances:
        batch = _stacked_batch(sample, cfg.batch_size, streams.data, step, streams.data_index)  # type: ignore[arg-type]
    else:
        batch = sample(cfg.batch_size, streams.data)  # type: ignore[operator]
    if isinstance(batch, tuple):
        x_in, x = batch
    elif sae.d_out != sae.d_in:
        raise ValueError(
            f"a transcoder (d_in={sae.d_in}, d_out={sae.d_out}) needs (inputs, targets) "
            f"batches, but the data function returned one tensor of shape {tuple(batch.shape)} "
            f"at step {step}"
        )
    else:
        x_in = x = batch
    like = {"device": sae.W_enc.device, "dtype": sae.W_enc.dtype}
    if x is x_in:  # to the SAE's device and dtype (no copy when already there)
        x_in = x = x_in.to(**like)
    else:
        x_in, x = x_in.to(**like), x.to(**like)
    data_ok: Tensor | None = None  # folded into the divergence check
    if check:
        data_ok = torch.isfinite(x_in).all()
        if x is not x_in:
            data_ok = data_ok & torch.isfinite(x).all()
    return x_in, x, data_ok


class _DivergenceGuard:
    """One check (and one host sync) per step: non-finite data, non-finite loss, or a loss over
    ``factor`` times its first value; data-parallel: over every rank, so all ranks stop together."""

    def __init__(self, factor: float, n_inst: int, dp: DataParallel | None):
        self.factor, self.n_inst, self.dp = factor, n_inst, dp
        self.first_loss: Tensor | None = None

    def __call__(self, loss: Tensor, data_ok: Tensor | None, x_in: Tensor, target: Tensor, step: int) -> Tensor:
        """Return the detached loss ``[inst]`` (of the combined batch), or raise ValueError /
        :class:`TrainingDivergedError` naming the step and instances."""
        loss_seen = loss.detach()
        if self.dp is not None:
            loss_seen = self.dp.mean(loss_seen)
            if data_ok is not None:
                data_ok = ~self.dp.any(~data_ok)
        if self.first_loss is None:
            self.first_loss = loss_seen.clamp_min(1e-12)
        ok = (loss_seen <= self.factor * self.first_loss) & torch.isfinite(loss_seen)
        if data_ok is not None:
            ok = ok & data_ok
        if not ok.all():
            if data_ok is not None and not data_ok:
                _raise_non_finite_batch(x_in, target, self.n_inst, step)
                raise ValueError(f"non-finite batch at step {step} on another torch.distributed rank (see its error)")
            _raise_diverged(loss_seen, self.first_loss, self.factor, step)
        return loss_seen


def _fvu(x: Tensor, err: Tensor, dp: DataParallel | None) -> Tensor:
    """Logged FVU ``[inst]`` of the (combined) batch: ``x`` is ``[batch, inst, d_out]``, ``err`` the
    squared error ``[batch, inst]``. :func:`saelib.core.metrics.fvu`'s formula, unchecked, with
    the variance clamped at ``1e-12`` (a log never stops training)."""
    if dp is None:
        var = total_variance(x)
        return err.sum(0) / var.clamp_min(1e-12)
    var = dp.sum(total_variance(x, dp.batch_mean(x)))
    return dp.sum(err.sum(0)) / var.clamp_min(1e-12)


def train_sae(
    sae: SAE,
    data: DataSource,
    cfg: TrainConfig,
    *,
    callback: Callable[[int, SAE], None] | None = None,
    term_mask: Callable[[Tensor], Tensor] | None = None,
) -> History:
    """Train every instance of ``sae`` in place and return its :class:`History`.

    Args:
        sae: the SAEs to train (``n_inst`` of them).
        data: a function ``(batch_size, generator) -> x`` returning ``[batch, d_in]`` (shared by
            all instances) or ``[batch, inst, d_in]``; or a tensor ``[n_samples, d_in]`` of stored
            activations sampled with replacement. For a transcoder (``d_out`` set), the function
            returns ``(x, target)`` and stored data is a pair of tensors ``(inputs, targets)``.
            With ``cfg.independent_instances`` the function is called once per instance with that
            instance's generator and returns ``[batch, d_in]`` (or the pair), and stored data is
            sampled per instance; ``data`` may then also be a list of such functions, one per
            instance (e.g. each instance its own toy hierarchy), instance ``i`` drawing from
            ``data[i]`` with its own generator.
        callback: called as ``callback(step, sae)`` after every optimiser step (under
            ``torch.no_grad``), e.g. to record decoder cosines over training; on rank 0 only
            under ``torch.distributed``, where it must not change the SAE.
        term_mask: Matryoshka only: ``x_in -> keep`` with ``keep`` ``[batch, inst, d_sae]``
            weighting each ``(sample, prefix)`` loss term (e.g.
            :class:`saelib.experiments.matryoshka_probes.SplitTermMask`).

    Device and dtype: training runs where the SAE's parameters are (``SAEConfig.device`` /
    ``dtype``), in their dtype. Batches are moved there and cast to it (stored activations may
    stay on the CPU: each step gathers its rows, then moves them); every tensor made during
    training is made there. Random draws (data indices, prefixes, resampling) come from CPU
    generators, so a seed gives the same draws on every device.

    Data-parallel: when a ``torch.distributed`` process group with more than one process is
    initialised (e.g. by ``torchrun``; gloo for CPU SAEs, nccl for CUDA ones, one device per
    rank), every rank calls ``train_sae`` with the same SAE config, data and ``cfg`` and trains on
    its ``batch_size / world_size`` rows of each combined batch; gradients are averaged before
    clipping and the step, batch statistics are reduced over ranks, the parameters stay identical
    on every rank, and the result equals one process on the combined batch up to float rounding
    (see :mod:`saelib.core.distributed`). Only rank 0 shows the progress bar and calls ``callback``;
    every rank returns the same :class:`History` (metrics of the combined batch).

    Raises:
        ValueError: bad config values or data shapes; NaN/inf in a stored activation tensor, or
            in a batch returned by a data function (the message names the step and instances;
            checked inside the per-step divergence check, so it costs no extra host sync); a
            ``target_l0`` outside ``(0, d_sae]``; a transcoder given one tensor instead of
            ``(inputs, targets)``; ``cfg.instance_ids`` not of length ``n_inst``, or a data
            function returning ``[batch, inst, d]`` with ``cfg.independent_instances``; a list of
            data functions without ``cfg.independent_instances`` or not one per instance;
            data-parallel: ``cfg.batch_size`` not divisible by the world size.
        NotImplementedError: data-parallel training of a BatchTopK SAE (its top ``k * batch``
            selection runs over the whole batch, which no rank holds).
        TrainingDivergedError: the loss became NaN/inf or grew past ``divergence_factor`` times
            its first value (the message names the step and instances).
    """
    n_inst, d_sae = sae.n_inst, sae.d_sae
    like = {"device": sae.W_enc.device, "dtype": sae.W_enc.dtype}  # every tensor made here
    dp = data_parallel()
    if dp is not None and sae.cfg.architecture == "batchtopk":
        raise NotImplementedError(
            "data-parallel training of a BatchTopK SAE is not supported: its top k * batch "
            "selection needs the whole batch, which is split over ranks (use topk or relu)"
        )
    rows = None if dp is None else dp.local_rows(cfg.batch_size)
    if isinstance(data, list):  # one data function per instance
        if not cfg.independent_instances:
            raise ValueError("a list of data functions (one per instance) needs TrainConfig.independent_instances=True")
        if len(data) != n_inst or not all(callable(f) for f in data):
            raise ValueError(f"a list of data functions needs one function per instance: got {len(data)} "
                             f"entries (callable: {[callable(f) for f in data]}) for n_inst={n_inst}")
        sample, check_batches = [_sampler(f, sae.d_in, sae.d_out, rows)[0] for f in data], True
    else:
        sample, check_batches = _sampler(data, sae.d_in, sae.d_out, rows)
    if cfg.retain_cpu_memory and sae.W_enc.device.type == "cpu":
        retain_freed_cpu_memory()
    controller = _controller(cfg, n_inst, d_sae, like)
    penalty = _sparsity_penalty(cfg, controller.target, n_inst, d_sae, dp)
    mplan = None if cfg.matryoshka is None else PerInstanceMatryoshka.build(cfg.matryoshka, n_inst).to(like["device"])
    if term_mask is not None and mplan is None:
        raise ValueError("term_mask needs a Matryoshka loss (TrainConfig.matryoshka is None)")
    streams = _streams(cfg, n_inst, share_data=not isinstance(data, list))
    # batch means of statistics that steer training or are logged: over the combined batch
    batch_mean: Callable[[Tensor], Tensor] = (lambda t: t.mean(0)) if dp is None else dp.batch_mean
    if dp is not None:
        dp.broadcast_module(sae)  # identical starting points (equal already when made from one config)
    params = [p for p in sae.parameters() if p.requires_grad]
    # foreach: one multi-tensor kernel per Adam sub-step (same arithmetic as the loop)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: wsd_lr_factor(s, cfg))
    permuter = LatentPermuter.for_plan(mplan, sae, batch_mean)
    resampler = None if cfg.resample_dead_every is None else DeadLatentResampler(
        cfg.resample_dead_every, cfg.steps // 2, streams.resample, n_inst, d_sae, like["device"], dp)
    guard = _DivergenceGuard(cfg.divergence_factor, n_inst, dp)
    hist = History()
    writes = dp is None or dp.is_main
    sae.train()

    for step in tqdm(range(cfg.steps), disable=not (cfg.progress and writes), desc="train SAE", mininterval=1.0):
        x_in, x_raw, data_ok = _next_batch(sample, streams, cfg, sae, check_batches, step)
        x = sae.expand_instances(x_raw, sae.d_out)  # reconstruction target [batch, inst, d_out]
        weights = None
        if mplan is not None:  # this step's prefix weights, drawn on the CPU
            draw = mplan.independent_weights if cfg.independent_instances else mplan.weights
            weights = draw(d_sae, streams.prefix).to(**like)  # type: ignore[arg-type]
        keep = None if term_mask is None else term_mask(x_in)
        loss, x_hat, acts = step_loss(sae, x_in, x, controller.in_force(step),
                                      penalty if sae.cfg.architecture == "relu" else None, mplan, weights, keep)
        loss_seen = guard(loss, data_ok, x_in, x_raw, step)
        _optimizer_step(loss, params, opt, sched, cfg, sae, dp)

        with torch.no_grad():
            log_now = step % cfg.log_every == 0 or step == cfg.steps - 1
            l0 = batch_mean(active(acts).to(acts.dtype).sum(-1)) if controller.steers or log_now else None  # [inst]
            controller.update(step, l0)
            if resampler is not None:
                resampler(step, sae, opt, acts, x_in, x, x_hat)
            if permuter is not None:
                permuter(sae, opt, acts)
            if callback is not None and writes:
                callback(step, sae)
            if log_now:
                hist.record(step, loss_seen, x, x_hat, l0, controller.in_force(step), dp)
    sae.eval()
    return hist
