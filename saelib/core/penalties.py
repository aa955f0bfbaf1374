"""Sparsity penalties on SAE latent activations, and the priors they imply.

Every penalty is applied to the decoder-norm-scaled activation ``s = a_j * ||W_dec[j]||`` (so that
shrinking the encoder while growing the decoder cannot cheat the penalty; Anthropic, "Towards
Monosemanticity" April 2024 update) and returned per latent, averaged over the batch, so that a
Matryoshka loss can weight latents by how many prefixes contain them.

Two kinds of penalty:

* **elementwise** (:data:`PENALTIES`): ``pen(s)`` for every activation, then the batch mean;
* **batch-level** (:data:`BATCH_PENALTIES`): a function of the whole ``[batch, inst, d_sae]``
  tensor per latent, for terms that need batch statistics such as a latent's firing frequency.

The penalties (``s >= 0`` after the ReLU), with the prior over activations that
``coeff * pen(s)`` implies when read as a negative log-density, ``p(s) ∝ exp(-coeff * pen(s))``
(sparse coding's MAP reading; Olshausen & Field 1997; Apollo Research 2024 in REFERENCES.md):

==================  ==========================================  ===================================
name                ``pen(s)``                                  implied prior on ``s >= 0``
==================  ==========================================  ===================================
``l1``              ``s``                                       Laplace (exponential), rate coeff
``log1p_sq``        ``log(1 + s²)``                             ``(1 + s²)^-coeff``: Cauchy at
                                                                coeff = 1 (Student-t family);
                                                                proper for coeff > 1/2
``log1p_abs``       ``log(1 + s)``                              ``(1 + s)^-coeff``: Lomax /
                                                                Pareto II, shape coeff - 1;
                                                                proper for coeff > 1
``lp_half``         ``sqrt(s)`` (Lp, p = 1/2)                   generalised normal, shape 1/2
``tanh``            ``tanh(s)`` (a saturating L0 surrogate)     improper (tends to e^-coeff)
``smooth_l0``       ``1 - exp(-s / eps)``, eps = 0.1            improper (tends to e^-coeff)
                    (concave exponential L0 approximation,
                    Bradley & Mangasarian 1998, ICML)
``smooth_l0_freq``  ``smooth_l0`` + ``FREQ_WEIGHT *                as ``smooth_l0`` (the frequency
                    KL(rho || f_j)``, batch-level                term is not per activation)
==================  ==========================================  ===================================

The feature-frequency term follows the classic sparse-autoencoder KL sparsity penalty (Ng 2011,
CS294A lecture notes "Sparse autoencoder", section 3):
``KL(rho || f_j) = rho log(rho / f_j) + (1 - rho) log((1 - rho) / (1 - f_j))`` with ``f_j`` the
batch mean of the smooth indicator ``1 - exp(-s / eps)`` (a differentiable firing frequency) and
target ``rho`` (``FREQ_TARGET`` unless the caller gives one: :func:`saelib.core.train.train_sae` uses
``target_l0 / d_sae`` when it steers L0 to a target, the frequency at which every latent would fire
equally often at the target L0; with 0.05 and 4,608 latents the frequency term alone asks for an L0
of 230 and overrides a target of 32). It grows without bound as a latent's frequency goes to 0, the
"sparsity-frequency penalty" that Farrell 2024 pairs with an L0 approximation to avoid dead latents;
Farrell does not give his formulas, so these are our choice.

Instability (Lawrence's remark, quoted in Gross's comment on Sharkey 2024):
``d sqrt(s) / ds = 1 / (2 sqrt(s))`` is unbounded as
``s -> 0+``, so a latent with a tiny but nonzero overlap with an input gets a huge push to zero.
``lp_half`` evaluates ``sqrt(max(s, LP_FLOOR))``: below ``LP_FLOOR`` the gradient is 0 instead of
inf * 0 = NaN (which the decoder-norm scaling would otherwise produce at ``s = 0``); above it the
gradient is exact and reaches ``1 / (2 sqrt(LP_FLOOR)) = 5e5``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "PENALTIES",
    "BATCH_PENALTIES",
    "PRIOR_FAMILY",
    "SMOOTH_L0_EPS",
    "FREQ_TARGET",
    "FREQ_WEIGHT",
    "LP_FLOOR",
    "penalty_names",
    "per_latent_penalty",
    "implied_log_prior",
    "prior_density",
    "prior_is_proper",
]

SMOOTH_L0_EPS = 0.1  # scale of the smooth L0 approximation (activations ~1 in the toys)
FREQ_TARGET = 0.05  # rho: target firing frequency of the KL frequency penalty
FREQ_WEIGHT = 1.0  # weight of the KL frequency term relative to the smooth L0 term
LP_FLOOR = 1e-12  # sqrt is evaluated at max(s, LP_FLOOR)
_FREQ_CLAMP = 1e-6  # soft frequencies are clamped to [_FREQ_CLAMP, 1 - _FREQ_CLAMP] in the KL

BatchMean = Callable[[Tensor], Tensor]  # [batch, ...] -> [...]


def _l1(s: Tensor) -> Tensor:
    return s


def _log1p_sq(s: Tensor) -> Tensor:
    return torch.log1p(s * s)


def _log1p_abs(s: Tensor) -> Tensor:
    return torch.log1p(s.abs())


def _lp_half(s: Tensor) -> Tensor:
    return s.abs().clamp_min(LP_FLOOR).sqrt()


def _tanh(s: Tensor) -> Tensor:
    return torch.tanh(s.abs())


def _smooth_l0(s: Tensor) -> Tensor:
    return -torch.expm1(-s.abs() / SMOOTH_L0_EPS)


def _batch_mean(t: Tensor) -> Tensor:
    return t.mean(dim=0)


def _smooth_l0_freq(
    scaled: Float[Tensor, "batch inst d_sae"], rho: float | Tensor = FREQ_TARGET, batch_mean: BatchMean = _batch_mean
) -> Float[Tensor, "inst d_sae"]:
    ind = _smooth_l0(scaled)  # [batch, inst, d_sae], soft "is active"
    freq = batch_mean(ind).clamp(_FREQ_CLAMP, 1 - _FREQ_CLAMP)  # [inst, d_sae]
    kl = rho * torch.log(rho / freq) + (1 - rho) * torch.log((1 - rho) / (1 - freq))
    return batch_mean(ind) + FREQ_WEIGHT * kl


# elementwise penalties: scaled activation -> penalty of the same shape
PENALTIES: dict[str, Callable[[Tensor], Tensor]] = {
    "l1": _l1,  # Laplace prior
    "log1p_sq": _log1p_sq,  # Cauchy prior
    "log1p_abs": _log1p_abs,  # Lomax prior
    "lp_half": _lp_half,  # generalised normal, shape 1/2
    "tanh": _tanh,  # improper
    "smooth_l0": _smooth_l0,  # improper
}

# batch-level penalties: (scaled activations [batch, inst, d_sae], target frequency rho: a float or
# [inst, 1], batch mean) -> per-latent penalty [inst, d_sae]; every batch statistic goes through the
# batch-mean function, so that data-parallel training can take it over the combined batch
# (saelib.core.distributed)
BATCH_PENALTIES: dict[str, Callable[[Tensor, float | Tensor, BatchMean], Tensor]] = {
    "smooth_l0_freq": _smooth_l0_freq,
}

PRIOR_FAMILY: dict[str, str] = {
    "l1": "Laplace",
    "log1p_sq": "Cauchy",
    "log1p_abs": "Lomax",
    "lp_half": "generalised normal (shape 1/2)",
    "tanh": "bounded penalty",
    "smooth_l0": "bounded penalty",
    "smooth_l0_freq": "bounded penalty",
}

# the elementwise part of a batch-level penalty, which defines its per-activation prior
_ELEMENTWISE_PART = {"smooth_l0_freq": "smooth_l0"}


def penalty_names() -> list[str]:
    """Every known penalty name (elementwise, then batch-level)."""
    return list(PENALTIES) + list(BATCH_PENALTIES)


def _check_kind(kind: str) -> None:
    if kind not in PENALTIES and kind not in BATCH_PENALTIES:
        raise ValueError(f"unknown sparsity penalty {kind!r}; choose one of {penalty_names()}")


def per_latent_penalty(
    acts: Float[Tensor, "batch inst d_sae"],
    decoder_norms: Float[Tensor, "inst d_sae"],
    kind: str = "l1",
    freq_target: float | Sequence[float] = FREQ_TARGET,
    batch_mean: BatchMean | None = None,
) -> Float[Tensor, "inst d_sae"]:
    """Per-latent penalty of one batch: the batch mean of ``pen(a_j * ||W_dec[j]||)`` for an
    elementwise penalty, or the batch-level penalty of the scaled activations.

    Pass ones as ``decoder_norms`` to penalise raw activations. ``freq_target`` is the target
    firing frequency ``rho`` of the ``smooth_l0_freq`` frequency term, one for all instances or one
    per instance (ignored by the other penalties). ``batch_mean`` (``[batch, ...] -> [...]``,
    default ``t.mean(0)``) is the mean a batch-level penalty takes its batch statistics with;
    data-parallel training passes :meth:`saelib.core.distributed.DataParallel.penalty_batch_mean` (the
    mean over every rank's rows).

    Raises ValueError for an unknown ``kind`` (the known ones are :func:`penalty_names`), or a
    ``freq_target`` outside ``(0, 1)`` or with a length other than ``inst``.
    """
    _check_kind(kind)
    scaled = acts * decoder_norms
    if kind in BATCH_PENALTIES:
        rho = _rho(freq_target, acts.shape[1])
        return BATCH_PENALTIES[kind](scaled, rho if isinstance(rho, float) else rho.to(scaled), batch_mean or _batch_mean)
    return PENALTIES[kind](scaled).mean(dim=0)


def _rho(freq_target: float | Sequence[float], n_inst: int) -> float | Tensor:
    """``freq_target`` as a float when it is one value for every instance (so the arithmetic is
    the same as with the module constant), else as a float64 ``[inst, 1]`` tensor."""
    vals = [float(freq_target)] if isinstance(freq_target, (int, float)) else [float(v) for v in freq_target]
    bad = [v for v in vals if not 0 < v < 1]
    if bad:
        raise ValueError(f"freq_target must be in (0, 1), got {bad}")
    if len(vals) == 1 or all(v == vals[0] for v in vals):
        if len(vals) not in (1, n_inst):
            raise ValueError(f"freq_target has {len(vals)} entries for {n_inst} instances")
        return vals[0]
    if len(vals) != n_inst:
        raise ValueError(f"freq_target has {len(vals)} entries for {n_inst} instances")
    return torch.tensor(vals, dtype=torch.float64)[:, None]


def implied_log_prior(kind: str, s: Float[Tensor, "*shape"], coeff: float) -> Float[Tensor, "*shape"]:
    """Unnormalised log-density ``-coeff * pen(s)`` of the prior a penalty implies.

    For a batch-level penalty this is the prior of its elementwise part (``smooth_l0_freq`` →
    ``smooth_l0``). Raises ValueError for an unknown ``kind`` or a negative ``coeff``.
    """
    _check_kind(kind)
    if not coeff >= 0:
        raise ValueError(f"coeff must be >= 0, got {coeff!r}")
    fn = PENALTIES[_ELEMENTWISE_PART.get(kind, kind)]
    return -coeff * fn(s)


def prior_is_proper(kind: str, coeff: float) -> bool:
    """Whether ``exp(-coeff * pen(s))`` is integrable on ``s >= 0``.

    ``l1``, ``lp_half``: coeff > 0; ``log1p_sq``: ``∫(1 + s²)^-c`` converges iff c > 1/2;
    ``log1p_abs``: ``∫(1 + s)^-c`` converges iff c > 1 (Lomax shape c - 1 > 0); ``tanh`` and the
    smooth L0 penalties are bounded, so their density tends to a constant: never proper.
    Raises ValueError as :func:`implied_log_prior`.
    """
    implied_log_prior(kind, torch.zeros(1), coeff)  # validates
    kind = _ELEMENTWISE_PART.get(kind, kind)
    if kind in ("l1", "lp_half"):
        return coeff > 0
    if kind == "log1p_sq":
        return coeff > 0.5
    if kind == "log1p_abs":
        return coeff > 1
    return False


def prior_density(
    kind: str, s: Float[Tensor, " n"], coeff: float
) -> Float[Tensor, " n"]:
    """The implied prior density on a grid ``s`` (ascending, ``s >= 0``), normalised so that its
    trapezoid integral over the grid is 1 (for an improper prior this is the density truncated
    to the grid; say so when plotting).

    Raises ValueError as :func:`implied_log_prior`, or if ``s`` is not 1-D, ascending and >= 0.
    """
    if s.ndim != 1 or len(s) < 2 or (s < 0).any() or (s.diff() <= 0).any():
        raise ValueError(f"s must be a 1-D ascending grid of values >= 0 with >= 2 points, got shape {tuple(s.shape)}")
    logp = implied_log_prior(kind, s.double(), coeff)
    p = torch.exp(logp - logp.max())
    area = torch.trapezoid(p, s.double())
    if not math.isfinite(float(area)) or float(area) <= 0:
        raise ValueError(f"prior of {kind!r} at coeff={coeff} cannot be normalised on this grid")
    return (p / area).to(s.dtype)
