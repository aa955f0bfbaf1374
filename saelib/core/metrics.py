"""Metrics for judging SAEs: cosines with true features, Hungarian matching, MCC, FVU, L0,
feature density, dead latents, and SAE-vs-SAE statistics.

This module holds the one definition of each quantity; every other module computes it through
these functions (training's logs and controller, the experiments' streamed and masked forms):

* a latent is **active** (fires) on a sample when its activation is ``> 0`` (:func:`active`);
  SAE activations are ``>= 0`` (ReLU, TopK and BatchTopK of ReLU), so this is also ``!= 0``;
* **L0**: mean over samples of the number of active latents (:func:`l0`);
* **feature density**: fraction of samples on which a latent is active (:func:`feature_density`);
* **FVU**: summed squared error (:func:`squared_error`) over the summed squared deviation from
  the batch mean (:func:`total_variance`) (:func:`fvu`).

Activation normalisation is defined in :mod:`saelib.core.normalisation`.

Shapes (the vocabulary of :mod:`saelib.core.sae`)::

    W_enc     [d_in, d_sae]      (one instance: ``sae.W_enc[i]``; stored as in SAELens)
    W_dec     [d_sae, d_in]      (one instance: ``sae.W_dec[i]``)
    features  [n_feat, d_in]     true feature directions (rows)
    cos       [n_latents, n_feat]
    acts      [batch, ..., d_sae] (e.g. [batch, inst, d_sae] from ``SAE.encode``)

Matching: latents are matched one-to-one to features with the
Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) maximising the summed absolute
cosine; MCC is the mean absolute cosine of that matching, as SAELens defines it
(``sae_lens.synthetic.evals.mean_correlation_coefficient``; arXiv 2505.20254).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "unit_rows",
    "check_finite",
    "instance_indices",
    "cosine_matrix",
    "decoder_cosines",
    "encoder_cosines",
    "hungarian_match",
    "hungarian_order",
    "mcc",
    "squared_error",
    "total_variance",
    "fvu",
    "active",
    "l0",
    "feature_density",
    "dead_latents",
    "recovered_features",
    "best_match_stats",
]


# ---------------------------------------------------------------------------- cosines
def _check_matrix(name: str, t: Tensor, hint: str = "") -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}{hint}")


def unit_rows(t: Float[Tensor, "*rows d"]) -> Float[Tensor, "*rows d"]:
    """``t`` with every row (last dimension) scaled to unit Euclidean norm; an all-zero row stays
    zero (so its cosines are 0, not NaN). Same shape and dtype as ``t``."""
    norms = t.norm(dim=-1, keepdim=True)  # [*rows, 1]
    return t / torch.where(norms > 0, norms, torch.ones_like(norms))


def check_finite(name: str, t: Tensor) -> None:
    """Raise ValueError (naming ``name``) if ``t`` holds a NaN or an infinity."""
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf values")


def instance_indices(n_inst: int, instances: int | Sequence[int] | None) -> list[int]:
    """The instances of an ``n_inst``-instance SAE that a per-instance score covers: all of them
    (``None``), one (an int) or the listed ones, in the order given.

    Raises ValueError for an empty list or an index that is not an int in ``[0, n_inst)``.
    """
    if instances is None:
        return list(range(n_inst))
    out = [instances] if isinstance(instances, int) else list(instances)
    if not out:
        raise ValueError("instances is empty: pass None (all), an int or a non-empty list")
    for i in out:
        if not isinstance(i, int) or not (0 <= i < n_inst):
            raise ValueError(f"instance index {i!r} out of range for n_inst={n_inst}")
    return out


def cosine_matrix(a: Float[Tensor, "n d"], b: Float[Tensor, "m d"]) -> Float[Tensor, "n m"]:
    """Cosine similarity of every row of ``a`` with every row of ``b``.

    ``out[i, j] = <a_i, b_j> / (|a_i| |b_j|)``, clamped to ``[-1, 1]``; a zero row has cosine 0
    with everything (not NaN). The result has the promoted floating dtype of the inputs.

    Raises ValueError if either input is not 2-D or the row dimensions ``d`` differ (the message
    names both shapes).
    """
    _check_matrix("a", a)
    _check_matrix("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"cosine_matrix: row dimensions differ, a has shape {tuple(a.shape)} and "
            f"b has shape {tuple(b.shape)}"
        )
    dtype = torch.promote_types(a.dtype, b.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    a_u = unit_rows(a.to(dtype))  # [n, d]
    b_u = unit_rows(b.to(dtype))  # [m, d]
    return (a_u @ b_u.T).clamp(-1.0, 1.0)  # [n, m]


def decoder_cosines(
    W_dec: Float[Tensor, "d_sae d_in"], features: Float[Tensor, "n_feat d_in"]
) -> Float[Tensor, "d_sae n_feat"]:
    """Cosine similarity of every decoder row with every true feature direction.

    Pass one instance (``sae.W_dec[i]``), not the ``[inst, d_sae, d_in]`` parameter.
    Raises ValueError if an input is not 2-D or their ``d_in`` differ.
    Source: Nabeshima 2024 toy heatmaps (REFERENCES.md).
    """
    _check_matrix("W_dec", W_dec, " (pass one instance, e.g. sae.W_dec[i], of shape [d_sae, d_in])")
    _check_matrix("features", features, " (expected [n_feat, d_in])")
    if W_dec.shape[1] != features.shape[1]:
        raise ValueError(
            f"decoder_cosines: W_dec has shape {tuple(W_dec.shape)} ([d_sae, d_in]) but features "
            f"has shape {tuple(features.shape)} ([n_feat, d_in]): d_in differs"
        )
    return cosine_matrix(W_dec, features)


def encoder_cosines(
    W_enc: Float[Tensor, "d_in d_sae"], features: Float[Tensor, "n_feat d_in"]
) -> Float[Tensor, "d_sae n_feat"]:
    """Cosine similarity of every encoder direction (column of ``W_enc``) with every feature.

    ``W_enc`` is stored ``[d_in, d_sae]`` as in SAELens; pass one instance (``sae.W_enc[i]``).
    Raises ValueError if an input is not 2-D or their ``d_in`` differ.
    Source: Nabeshima 2024 toy heatmaps (REFERENCES.md).
    """
    _check_matrix("W_enc", W_enc, " (pass one instance, e.g. sae.W_enc[i], of shape [d_in, d_sae])")
    _check_matrix("features", features, " (expected [n_feat, d_in])")
    if W_enc.shape[0] != features.shape[1]:
        raise ValueError(
            f"encoder_cosines: W_enc has shape {tuple(W_enc.shape)} ([d_in, d_sae]) but features "
            f"has shape {tuple(features.shape)} ([n_feat, d_in]): d_in differs"
        )
    return cosine_matrix(W_enc.T, features)


# ---------------------------------------------------------------------------- matching
def _abs_cos_numpy(cos: Tensor) -> np.ndarray:
    _check_matrix("cos", cos, " (expected [n_latents, n_feat])")
    if cos.numel() == 0:
        raise ValueError(f"cos must be non-empty, got shape {tuple(cos.shape)}")
    arr = cos.detach().to("cpu", torch.float64).abs().numpy()
    if not np.isfinite(arr).all():
        raise ValueError("cos contains NaN or inf values")
    return arr


def hungarian_match(
    cos: Float[Tensor, "n_latents n_feat"],
) -> tuple[Int[Tensor, " n_match"], Int[Tensor, " n_match"]]:
    """One-to-one matching of latents to features maximising the summed ``|cos|``.

    Works for rectangular matrices: ``n_match = min(n_latents, n_feat)`` pairs. Returns
    ``(latent_idx, feature_idx)``, two LongTensors sorted by feature index. The sign of the
    cosine is ignored for matching (a latent with cosine -1 matches as well as +1).

    Raises ValueError if ``cos`` is not a non-empty 2-D tensor or contains NaN/inf.
    Source: ``scipy.optimize.linear_sum_assignment``.
    """
    arr = _abs_cos_numpy(cos)
    rows, cols = linear_sum_assignment(arr, maximize=True)
    order = np.argsort(cols, kind="stable")
    latent_idx = torch.as_tensor(rows[order], dtype=torch.long)
    feature_idx = torch.as_tensor(cols[order], dtype=torch.long)
    return latent_idx, feature_idx


def hungarian_order(cos: Float[Tensor, "n_latents n_feat"]) -> Int[Tensor, " n_latents"]:
    """A permutation of the latents for heatmaps: ``cos[hungarian_order(cos)]`` has the match on
    the diagonal.

    With ``n_latents >= n_feat`` row ``j`` is the latent matched to feature ``j``, and the
    unmatched latents follow in ascending index order. With fewer latents than features every
    latent is matched and they are sorted by the index of their matched feature.

    Raises ValueError as :func:`hungarian_match`.
    """
    latent_idx, _ = hungarian_match(cos)
    matched = set(latent_idx.tolist())
    rest = [i for i in range(cos.shape[0]) if i not in matched]
    return torch.cat([latent_idx, torch.tensor(rest, dtype=torch.long)])


def mcc(cos: Float[Tensor, "n_latents n_feat"]) -> float:
    """Mean correlation coefficient: mean ``|cos|`` over the Hungarian matching.

    ``MCC = (1 / n_match) * sum_j |cos[latent_j, feature_j]|`` over the ``n_match =
    min(n_latents, n_feat)`` pairs of :func:`hungarian_match`; in ``[0, 1]``, 1 when every
    feature (or every latent, if there are fewer) has a perfectly aligned partner. This is how
    SAELens defines it (``sae_lens.synthetic.evals.mean_correlation_coefficient``, after
    arXiv 2505.20254). Pass ``decoder_cosines(...)`` to score feature recovery.

    Raises ValueError as :func:`hungarian_match`.
    """
    latent_idx, feature_idx = hungarian_match(cos)
    return float(cos.detach()[latent_idx, feature_idx].abs().double().mean())


def recovered_features(
    cos: Float[Tensor, "n_latents n_feat"], threshold: float = 0.9
) -> Bool[Tensor, " n_feat"]:
    """Which true features are recovered: feature ``j`` counts if its Hungarian-matched latent
    has (signed) cosine ``> threshold`` with it.

    Features left unmatched (possible when ``n_latents < n_feat``) are not recovered. A latent
    anti-aligned with a feature (cosine near -1) does not count, since it cannot represent the
    feature with a non-negative activation.

    Raises ValueError as :func:`hungarian_match`, or if ``threshold`` is not in ``[-1, 1]``.
    """
    if not (-1.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be in [-1, 1], got {threshold!r}")
    latent_idx, feature_idx = hungarian_match(cos)
    out = torch.zeros(cos.shape[1], dtype=torch.bool)
    out[feature_idx] = cos.detach()[latent_idx, feature_idx].cpu() > threshold
    return out


def best_match_stats(W_a: Float[Tensor, "n d"], W_b: Float[Tensor, "m d"]) -> dict[str, Any]:
    """SAE-vs-SAE summary: for every row of ``W_a`` its best (largest signed) cosine with any row
    of ``W_b``.

    Typically ``W_a`` and ``W_b`` are the decoders ``[d_sae, d_in]`` of two SAEs (a new method vs
    an L1 reference, or two seeds of one method). Returns::

        {"best_cos": Tensor[n],      # max_j cos(W_a[i], W_b[j])
         "frac_gt_0.9": float,       # fraction of rows of W_a with best_cos > 0.9
         "frac_gt_0.8": float,       # ... > 0.8
         "median": float}            # median of best_cos (mean of the two middle values if n even)

    Not symmetric in ``a`` and ``b``. Raises ValueError as :func:`cosine_matrix`, or if either
    matrix has no rows. Source: Farrell 2024 in REFERENCES.md (10 % > 0.9, 32 % > 0.8, median
    0.686).
    """
    _check_matrix("W_a", W_a)
    _check_matrix("W_b", W_b)
    if W_a.shape[0] == 0 or W_b.shape[0] == 0:
        raise ValueError(f"W_a and W_b need at least one row, got shapes {tuple(W_a.shape)} and {tuple(W_b.shape)}")
    best = cosine_matrix(W_a.detach(), W_b.detach()).max(dim=1).values  # [n]
    best_np = best.to("cpu", torch.float64).numpy()
    return {
        "best_cos": best,
        "frac_gt_0.9": float((best_np > 0.9).mean()),
        "frac_gt_0.8": float((best_np > 0.8).mean()),
        "median": float(np.median(best_np)),
    }


# ---------------------------------------------------------------------------- reconstruction
def squared_error(x: Float[Tensor, "batch *inst d"], x_hat: Float[Tensor, "batch *inst d"]) -> Float[Tensor, "batch *inst"]:
    """Squared error of each sample, summed over the last dimension: ``||x - x_hat||²``.

    No checks (it runs inside training); :func:`fvu` validates its inputs."""
    return (x - x_hat).pow(2).sum(-1)


def total_variance(x: Float[Tensor, "batch *inst d"], mean: Tensor | None = None) -> Float[Tensor, "*inst"]:
    """``sum_batch ||x - mean||²``: the denominator of :func:`fvu`. ``mean`` defaults to the batch
    mean ``x.mean(0, keepdim=True)``; data-parallel training passes the mean of the combined
    batch. No checks."""
    centre = x.mean(0, keepdim=True) if mean is None else mean
    return (x - centre).pow(2).sum(-1).sum(0)


def fvu(x: Float[Tensor, "batch *inst d"], x_hat: Float[Tensor, "batch *inst d"]) -> Tensor:
    """Fraction of variance unexplained of a reconstruction.

    ``FVU = sum_batch ||x - x_hat||² / sum_batch ||x - mean_batch(x)||²``, squared norms over
    the last dimension ``d``, means and sums over the batch (first) dimension: 0 is perfect,
    1 is no better than predicting the batch mean. The FVU logged by
    :func:`saelib.core.train.train_sae` is the same formula (:func:`squared_error`,
    :func:`total_variance`) without the checks, its variance clamped at ``1e-12``.

    Shapes: ``[batch, d]`` → scalar; ``[batch, inst, d]`` → ``[inst]``. As a convenience
    ``x`` may be ``[batch, d]`` with ``x_hat`` ``[batch, inst, d]`` (one input broadcast to every
    instance, as :class:`saelib.core.sae.SAE` does) → ``[inst]``.

    Raises ValueError if the shapes do not match (other than that broadcast), are not 2-D/3-D,
    if ``x`` or ``x_hat`` contains NaN/inf, or if ``x`` has zero variance over the batch (FVU
    undefined).
    """
    if x.ndim == 2 and x_hat.ndim == 3 and x.shape[0] == x_hat.shape[0] and x.shape[1] == x_hat.shape[2]:
        x = x[:, None, :].expand_as(x_hat)
    if x.shape != x_hat.shape:
        raise ValueError(
            f"fvu: x has shape {tuple(x.shape)} but x_hat has shape {tuple(x_hat.shape)}"
        )
    if x.ndim not in (2, 3):
        raise ValueError(f"fvu: expected [batch, d] or [batch, inst, d], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("fvu: x contains NaN or inf values")
    if not torch.isfinite(x_hat).all():
        raise ValueError("fvu: x_hat contains NaN or inf values")
    err = squared_error(x, x_hat).sum(0)  # [] or [inst]
    var = total_variance(x)  # [] or [inst]
    if (var <= 0).any():
        raise ValueError(
            f"fvu: x has zero variance over the batch (per instance: {var.tolist()}), FVU is undefined"
        )
    return err / var


# ---------------------------------------------------------------------------- sparsity
def _check_acts(acts: Tensor) -> None:
    if not isinstance(acts, Tensor):
        raise TypeError(f"acts must be a torch.Tensor, got {type(acts).__name__}")
    if acts.ndim < 2 or acts.shape[0] == 0:
        raise ValueError(f"acts must be [batch, ..., d_sae] with batch >= 1, got shape {tuple(acts.shape)}")
    finite = torch.isfinite(acts)
    if not finite.all():
        n_bad = int((~finite).sum())
        first = tuple((~finite).nonzero()[0].tolist())
        raise ValueError(
            f"acts contains {n_bad} NaN/inf value(s) (first at index {first}: {acts[first].item()})"
        )


def active(acts: Float[Tensor, "*shape"]) -> Bool[Tensor, "*shape"]:
    """Which latents are active (fire): activation ``> 0``. The one definition behind
    :func:`l0`, :func:`feature_density`, :func:`dead_latents` and every firing count in saelib.

    SAE activations are ``>= 0`` (ReLU, TopK and BatchTopK of ReLU), so on them ``> 0`` and
    ``!= 0`` agree; a NaN is not active. No checks (it runs inside training)."""
    return acts > 0


def l0(acts: Float[Tensor, "batch *rest d_sae"]) -> Float[Tensor, "*rest"]:
    """L0: mean over the batch of the number of active latents (:func:`active`, ``> 0``) per
    sample.

    ``acts`` ``[batch, d_sae]`` → scalar; ``[batch, inst, d_sae]`` → ``[inst]``. Negative values
    do not count (SAE activations have none). Raises ValueError if ``acts`` has fewer than 2
    dims, an empty batch, or contains NaN/inf.
    """
    _check_acts(acts)
    return active(acts).sum(-1).to(torch.get_default_dtype()).mean(0)


def feature_density(acts: Float[Tensor, "batch *rest d_sae"]) -> Float[Tensor, "*rest d_sae"]:
    """Feature density: the fraction of samples (first dimension) on which each latent is active
    (:func:`active`, ``> 0``).

    ``acts`` ``[batch, ..., d_sae]`` → ``[..., d_sae]``, values in ``[0, 1]``. Raises ValueError
    as :func:`l0`.
    """
    _check_acts(acts)
    return active(acts).to(torch.get_default_dtype()).mean(0)


def dead_latents(
    acts: Float[Tensor, "batch *rest d_sae"], threshold: float = 0.0
) -> Bool[Tensor, "*rest d_sae"]:
    """Latents whose :func:`feature_density` is ``<= threshold`` (default: never fired).

    Raises ValueError as :func:`l0`, or if ``threshold`` is not in ``[0, 1]``.
    """
    if not (0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold must be a density in [0, 1], got {threshold!r}")
    return feature_density(acts) <= threshold
