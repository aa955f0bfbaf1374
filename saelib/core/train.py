"""Training SAEs (all instances at once): Adam, warmup-stable-decay LR, per-instance gradient
clipping, an adaptive L1 coefficient that steers L0 to a target, optional Matryoshka loss and
latent permutation; on any device and dtype (the SAE's, :class:`saelib.core.sae.SAEConfig`), and
data-parallel over ``torch.distributed`` when a process group is initialised (see
:func:`train_sae` and :mod:`saelib.core.distributed`). This module is the loop: :func:`train_sae`
composes the parts in :mod:`saelib.core.train_parts` (the loss of one step, the sparsity
controller, dead-latent resampling, latent permutation) with the batches and random streams of
:mod:`saelib.core.data_streams`, the divergence check, the optimiser step and
:meth:`History.record`. Its settings are :class:`saelib.core.train_config.TrainConfig` and the
CPU allocator tuning is :mod:`saelib.core.allocator`; ``TrainConfig``, ``wsd_lr_factor``,
``retain_freed_cpu_memory`` and ``DataSource`` are re-exported here.

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

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .allocator import retain_freed_cpu_memory
from .data_streams import DataSource, batch_sampler, next_batch, seed_streams
from .distributed import DataParallel, data_parallel
from .matryoshka import PerInstanceMatryoshka
from .metrics import active, squared_error, total_variance
from .penalties import FREQ_TARGET
from .precision import autocast, resolve_precision
from .sae import SAE
from .train_config import TrainConfig, wsd_lr_factor
from .train_parts import DeadLatentResampler, LatentPermuter, SparsityController, SparsityPenalty, step_loss

__all__ = [
    "TrainConfig",
    "History",
    "train_sae",
    "wsd_lr_factor",
    "TrainingDivergedError",
    "retain_freed_cpu_memory",
    "DataSource",
]


class TrainingDivergedError(FloatingPointError):
    """Raised when the loss becomes NaN/inf or explodes during training."""


@dataclass
class History:
    """Per-logged-step training curves; every metric is ``[n_logged, inst]``.

    ``mse`` is the full-SAE reconstruction error (mean over batch of the squared error summed
    over ``d_in``), ``fvu`` its fraction of the batch variance (:func:`saelib.core.metrics.fvu`'s
    formula), ``l0`` the mean number of active latents (:func:`saelib.core.metrics.l0`'s
    definition), ``loss`` the total objective and ``l1_coeff`` the sparsity coefficient in force.
    ``precision`` is the precision that ran (``"float32"`` or ``"bfloat16"``, ``"auto"`` resolved).
    """

    step: list[int] = field(default_factory=list)
    loss: list[Tensor] = field(default_factory=list)
    mse: list[Tensor] = field(default_factory=list)
    l0: list[Tensor] = field(default_factory=list)
    fvu: list[Tensor] = field(default_factory=list)
    l1_coeff: list[Tensor] = field(default_factory=list)
    precision: str = "float32"

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


def _per_instance(value: float | Sequence[float], n_inst: int, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(n_inst).clone()
    if t.numel() != n_inst:
        raise ValueError(f"TrainConfig.{name} has {t.numel()} values but n_inst={n_inst}")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"TrainConfig.{name} must be finite and >= 0, got {t.tolist()}")
    return t


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
    generators, so a seed gives the same draws on every device. ``cfg.precision`` (resolved on the
    SAE's device, recorded in ``History.precision``) runs the forward in bf16 mixed precision
    where it says so.

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
        sample, check_batches = [batch_sampler(f, sae.d_in, sae.d_out, rows)[0] for f in data], True
    else:
        sample, check_batches = batch_sampler(data, sae.d_in, sae.d_out, rows)
    precision = resolve_precision(cfg.precision, sae.W_enc.device)
    if precision == "bfloat16" and sae.W_enc.dtype != torch.float32:
        raise ValueError(f"precision 'bfloat16' keeps float32 master weights: the SAE's dtype must be float32, "
                         f"got {sae.W_enc.dtype} (set SAEConfig.dtype='float32' or TrainConfig.precision='float32')")
    if cfg.retain_cpu_memory and sae.W_enc.device.type == "cpu":
        retain_freed_cpu_memory()
    controller = _controller(cfg, n_inst, d_sae, like)
    penalty = _sparsity_penalty(cfg, controller.target, n_inst, d_sae, dp)
    mplan = None if cfg.matryoshka is None else PerInstanceMatryoshka.build(cfg.matryoshka, n_inst).to(like["device"])
    if term_mask is not None and mplan is None:
        raise ValueError("term_mask needs a Matryoshka loss (TrainConfig.matryoshka is None)")
    streams = seed_streams(cfg, n_inst, share_data=not isinstance(data, list))
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
    hist = History(precision=precision)
    writes = dp is None or dp.is_main
    sae.train()

    for step in tqdm(range(cfg.steps), disable=not (cfg.progress and writes), desc="train SAE", mininterval=1.0):
        x_in, x_raw, data_ok = next_batch(sample, streams, cfg, sae, check_batches, step)
        x = sae.expand_instances(x_raw, sae.d_out)  # reconstruction target [batch, inst, d_out]
        weights = None
        if mplan is not None:  # this step's prefix weights, drawn on the CPU
            draw = mplan.independent_weights if cfg.independent_instances else mplan.weights
            weights = draw(d_sae, streams.prefix).to(**like)  # type: ignore[arg-type]
        keep = None if term_mask is None else term_mask(x_in)
        with autocast(precision, like["device"]):  # bf16 products in the forward; the backward outside
            loss, x_hat, acts = step_loss(sae, x_in, x, controller.in_force(step),
                                          penalty if sae.cfg.architecture == "relu" else None, mplan, weights, keep)
        loss_seen = guard(loss, data_ok, x_in, x_raw, step)
        _optimizer_step(loss, params, opt, sched, cfg, sae, dp)

        with torch.no_grad():
            log_now = step % cfg.log_every == 0 or step == cfg.steps - 1
            count_dtype = torch.promote_types(acts.dtype, torch.float32)  # counts above 256 are not exact in bf16
            l0 = batch_mean(active(acts).to(count_dtype).sum(-1)) if controller.steers or log_now else None  # [inst]
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
