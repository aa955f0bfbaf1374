"""The configuration of :func:`saelib.core.train.train_sae`: :class:`TrainConfig`, one documented
and validated field per optimisation setting (Adam, the warmup-stable-decay schedule, the sparsity
coefficient and its controller, Matryoshka prefixes, seeding, precision, allocator tuning), and
:func:`wsd_lr_factor`, the learning-rate schedule it defines.

The defaults follow Nabeshima's Matryoshka SAE code (``noanabeshima/matryoshka-saes``, ``sae.py``):
Adam(lr 3e-2, betas (0.5, 0.9375)), grad-norm clip 1.0 and a WSD schedule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from .matryoshka import MatryoshkaConfig
from .precision import PRECISIONS

__all__ = ["TrainConfig", "wsd_lr_factor"]


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
            on the CPU, runs of 2 and 3 instances agree bit for bit (tests/core/test_train.py).
        instance_ids: with ``independent_instances``, the id of each instance whose generators
            it uses (distinct ids give unrelated streams); None means ``0 .. n_inst - 1``. Lets a
            run stand in for instances of a larger one: ``instance_ids=[3]`` retrains instance 3
            alone, ``[0, 1]`` the first two instances of any run with the same seed. Ids may
            repeat: instances with one id see the same data (drawn once per step, so a sweep of
            several settings per seed costs one data draw per seed) and the same prefix and
            resampling draws. Its length must be ``n_inst`` (checked by :func:`train_sae`).
        progress: show a tqdm progress bar.
        precision: ``"float32"`` (the default), ``"bfloat16"`` (mixed precision: the forward and
            the loss's matrix products in bf16 under :func:`torch.autocast`, master weights, Adam
            state, the loss and its reductions in float32, like SAELens's ``autocast=True``) or
            ``"auto"`` (bf16 where the SAE's device has fast bf16 products); see
            :mod:`saelib.core.precision`. Needs a float32 SAE (``SAEConfig.dtype``) for
            ``"bfloat16"``.
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
    precision: str = "float32"
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
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.instance_ids is not None:
            if not self.independent_instances:
                raise ValueError("TrainConfig.instance_ids needs independent_instances=True")
            ids = list(self.instance_ids)
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"TrainConfig.instance_ids must be a non-empty list of ints >= 0, got {self.instance_ids!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wsd_lr_factor(step: int, cfg: TrainConfig) -> float:
    """Warmup-stable-decay multiplier of the learning rate at ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = cfg.steps * (1 - cfg.decay_frac)
    if step < decay_start or cfg.decay_frac == 0:
        return 1.0
    frac = (step - decay_start) / (cfg.steps * cfg.decay_frac)
    return 1.0 - (1.0 - cfg.end_lr_factor) * min(frac, 1.0)
