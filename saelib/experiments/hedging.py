"""Feature hedging: what a too-narrow SAE learns on a parent/child hierarchy, in closed form.

Chanin (comment on Nabeshima 2024, "Matryoshka Sparse Autoencoders") and Chanin et al. 2025,
"Feature hedging: correlated features break narrow sparse autoencoders" (arXiv 2505.11756): a
single latent that must reconstruct a parent whose children only fire with it does not learn the
parent alone; it merges a positive share of every child into its decoder.

With no decoder bias and the sparsity penalty → 0, the best single latent (ReLU is inactive here
because all feature coefficients are ≥ 0) is the rank-1 PCA of the *uncentred* second moment:
its decoder is the top eigenvector of ``E[x xᵀ]``. For a parent (probability ``p0``) with ``k``
children each firing with probability ``q`` given the parent, orthonormal features, magnitude 1,
that eigenvector is ``(1, t, …, t)`` in the (parent, children) basis, where ``t > 0`` solves

* mutually exclusive children: ``k q t² + (1 - q) t - q = 0``
* independent children:        ``k q t² + (1 - q - (k - 1) q²) t - q = 0``

(the second adds the children's co-firing ``E[c_i c_j] = p0 q²``). Each child's cosine with the
latent is ``t / sqrt(1 + k t²)``; ``p0`` cancels. The uncentred variance the merged direction
explains beyond the pure parent direction is ``λ_max - E[(u_parentᵀ x)²]``.

Hedging rate of a trained SAE
-----------------------------

:func:`hedging_scores` — the hedging rate of Chanin et al. 2025 ("Feature hedging", arXiv
2505.11756; reference code ``chanind/feature-hedging-paper``,
``hedging_paper/evals/hedging_eval.py``, extension in ``hedging_paper/saes/base_sae.py``
``extend_sae``, training in ``hedging_paper/scripts/train_hedging_eval_batch_topk_sae.py``). A
trained SAE of width ``w`` is trained further twice from the same weights: once extended by
``n_new`` latents ("extended"), once at width ``w`` ("control"). If the old latents hedged (mixed
in correlated features they had no room for), the new latents take those features over and the old
decoder rows move *into the span of the new rows*. Per SAE:

* ``delta`` = unit-normalised old decoder rows of the extended SAE minus those of the control;
* ``delta_proj`` = mean over old rows of ``||P_new delta_i||`` (``P_new``: orthogonal projection
  onto the span of the new decoder rows), in units of the (unit) decoder norm;
* ``baseline_proj`` = the same with ``n_baselines`` random Gaussian subspaces of the same
  dimension;
* ``hedging_rate = max(0, (delta_proj - baseline_proj) / (1 - baseline_proj))``
  (:func:`hedging_rate`).

Adaptations: (a) decoder rows are unit-normalised inside the function (the reference folds the
decoder norms into the encoder with ``fold_W_dec_norm`` first; the inputs here are not modified);
an all-zero (dead) row stays zero; (b) the random subspaces have the *rank* of the new rows'
span (the reference draws as many random vectors as new latents; the two agree unless the new rows
are linearly dependent); (c) random draws come from a seeded generator per instance; (d) the rate
is NaN when ``baseline_proj >= 1`` (the formula divides by ``1 - baseline_proj``), and a span as
large as ``d_in`` is refused (every random subspace would contain ``delta``); (e) the SAE before
the extra training is optional and only used for drift diagnostics (the reference compares the
two trained SAEs only). :func:`extend_sae` initialises the new latents as the reference does
(decoder row = encoder column = a random unit vector × 0.1, ``b_enc = 0``);
:func:`train_hedging_pair` trains the extended and the control SAE with
:func:`saelib.core.train.train_sae` on the same data stream.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.metrics import check_finite, instance_indices, unit_rows
from ..core.sae import SAE, SAEConfig
from ..core.train import DataSource, TrainConfig, train_sae
from ..data.toy_data import ToyHierarchy

__all__ = [
    "hedging_coefficient",
    "hedged_child_cosine",
    "optimal_single_latent",
    "single_latent_mse",
    "hedging_rate",
    "InstanceHedging",
    "HedgingScores",
    "hedging_scores",
    "extend_sae",
    "train_hedging_pair",
]


def _check_prob(name: str, value: float) -> None:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def hedging_coefficient(q: float, k: int, exclusive: bool = True) -> float:
    """The child weight ``t`` of the optimal single latent ``(1, t, …, t)`` (see module docstring).

    Args:
        q: each child's firing probability given the parent.
        k: number of children.
        exclusive: children mutually exclusive (True) or independent (False).

    Raises ValueError if ``q`` is not a probability, ``k < 1``, or exclusive children have
    ``k·q > 1``.
    """
    _check_prob("q", q)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if exclusive and k * q > 1 + 1e-12:
        raise ValueError(f"mutually exclusive children need k*q <= 1, got k={k}, q={q}")
    if q == 0:
        return 0.0
    a = k * q
    b = (1 - q) if exclusive else (1 - q - (k - 1) * q * q)
    return (-b + math.sqrt(b * b + 4 * a * q)) / (2 * a)


def hedged_child_cosine(q: float, k: int, exclusive: bool = True) -> float:
    """Cosine of each child feature with the optimal single latent: ``t / sqrt(1 + k t²)``."""
    t = hedging_coefficient(q, k, exclusive)
    return t / math.sqrt(1 + k * t * t)


def optimal_single_latent(hierarchy: ToyHierarchy) -> tuple[Float[Tensor, " d"], float]:
    """Top eigenvector (unit norm, oriented to a positive sum of feature cosines) and top
    eigenvalue of the analytic uncentred second moment ``E[x xᵀ] = Fᵀ E[c cᵀ] F``.

    Works for any hierarchy (numerically, float64); the closed form above is the special case.
    """
    F = hierarchy.features.double()  # [n_feat, d]
    second = F.T @ hierarchy.second_moment() @ F  # [d, d]
    evals, evecs = torch.linalg.eigh(second)
    v = evecs[:, -1]
    if (F @ v).sum() < 0:
        v = -v
    return v.float(), float(evals[-1])


def single_latent_mse(hierarchy: ToyHierarchy, direction: Float[Tensor, " d"]) -> float:
    """Expected squared error ``E||x - (uᵀx) u||²`` of reconstructing with one unit direction ``u``
    and the best (unconstrained) coefficient, from the analytic second moment.

    Raises ValueError if ``direction`` has the wrong length or zero norm.
    """
    if direction.shape != (hierarchy.d,):
        raise ValueError(f"direction must have shape ({hierarchy.d},), got {tuple(direction.shape)}")
    norm = direction.double().norm()
    if norm == 0:
        raise ValueError("direction has zero norm")
    u = direction.double() / norm
    F = hierarchy.features.double()
    second = F.T @ hierarchy.second_moment() @ F
    return float(torch.trace(second) - u @ second @ u)


# ---------------------------------------------------------------------------- hedging rate (Chanin et al. 2025)
def hedging_rate(delta_proj: float | Tensor, baseline_proj: float | Tensor) -> float:
    """Chanin et al. 2025's hedging rate ``max(0, (delta_proj - baseline_proj) / (1 - baseline_proj))``:
    how much more of the old decoder rows' move lies in the new latents' span than in a random
    subspace of that dimension, as a share of what a random subspace leaves out. 0 means no more
    than chance; NaN when ``baseline_proj >= 1`` (the ratio is undefined). Both inputs are mean
    lengths in units of the unit-normalised decoder rows (see :func:`hedging_scores`).

    Source: Chanin et al. 2025 (arXiv 2505.11756); ``chanind/feature-hedging-paper``
    ``hedging_paper/evals/hedging_eval.py``.
    """
    if baseline_proj >= 1:
        return float("nan")
    return max(0.0, float((delta_proj - baseline_proj) / (1 - baseline_proj)))


class InstanceHedging(NamedTuple):
    """The hedging statistics of one instance (:func:`hedging_scores`), lengths in units of the
    unit-normalised decoder rows; the fields of :class:`HedgingScores` without the stacking."""

    rank: int
    hedging_rate: float
    delta_norm: float
    delta_proj: float
    baseline_proj: float
    baseline_proj_std: float
    mean_dec_cos: float
    extended_drift: float | None
    control_drift: float | None


@dataclass
class HedgingScores:
    """Hedging scores of some instances (see :func:`hedging_scores`); every tensor is ``[inst]``
    with ``inst = len(instances)``, lengths in units of the (unit-normalised) decoder rows.

    Attributes:
        instances: the scored instance indices.
        width: ``w``, the control SAE's ``d_sae`` (the extended SAE's first ``w`` latents are old).
        n_new: number of latents added.
        rank: dimension of the span of the new decoder rows (= ``n_new`` unless they are
            linearly dependent).
        hedging_rate: :func:`hedging_rate` of ``delta_proj`` and ``baseline_proj``; NaN if
            ``baseline_proj >= 1``.
        delta_norm: mean ``||delta_i||`` over the old rows.
        delta_proj: mean ``||P_new delta_i||`` (the reference's ``delta_proj_portion``, since the
            control rows have unit norm; dead rows count as zero).
        baseline_proj: the same for random subspaces of dimension ``rank``, mean over draws.
        baseline_proj_std: standard deviation of that over the draws.
        mean_dec_cos: mean cosine of each old row of the extended SAE with the control's.
        extended_drift, control_drift: mean ``||unit(after_i) - unit(before_i)||`` of the old
            rows since ``before`` (None when ``before`` was not given).
    """

    instances: list[int]
    width: int
    n_new: int
    rank: Tensor
    hedging_rate: Tensor
    delta_norm: Tensor
    delta_proj: Tensor
    baseline_proj: Tensor
    baseline_proj_std: Tensor
    mean_dec_cos: Tensor
    extended_drift: Tensor | None = None
    control_drift: Tensor | None = None

    @classmethod
    def stack(cls, instances: list[int], width: int, n_new: int, rows: Sequence[InstanceHedging]) -> "HedgingScores":
        """One :class:`HedgingScores` from the per-instance statistics, in the order of ``instances``
        (float64 tensors; ``rank`` long; the drifts None when the rows have none)."""

        def column(name: str) -> Tensor:
            return torch.tensor([getattr(r, name) for r in rows], dtype=torch.float64)

        has_drift = bool(rows) and rows[0].extended_drift is not None
        return cls(
            instances=instances,
            width=width,
            n_new=n_new,
            rank=torch.tensor([r.rank for r in rows], dtype=torch.long),
            hedging_rate=column("hedging_rate"),
            delta_norm=column("delta_norm"),
            delta_proj=column("delta_proj"),
            baseline_proj=column("baseline_proj"),
            baseline_proj_std=column("baseline_proj_std"),
            mean_dec_cos=column("mean_dec_cos"),
            extended_drift=column("extended_drift") if has_drift else None,
            control_drift=column("control_drift") if has_drift else None,
        )


def _mean_row_norm(rows: Float[Tensor, "n d"]) -> Tensor:
    """Mean Euclidean norm of the rows (a 0-dim tensor)."""
    return rows.norm(dim=-1).mean()


def _span_basis(rows: Tensor) -> Tensor:
    """``[d, r]`` orthonormal basis of the span of ``rows`` ``[n, d]`` (rank ``r`` by SVD, with
    numpy's ``matrix_rank`` tolerance)."""
    _, s, Vh = torch.linalg.svd(rows, full_matrices=False)  # Vh [min(n, d), d]
    if s.numel() == 0 or s[0] == 0:
        return rows.new_zeros(rows.shape[1], 0)
    tol = s[0] * max(rows.shape) * torch.finfo(rows.dtype).eps
    return Vh[s > tol].T


def _new_latent_basis(new_rows: Float[Tensor, "n_new d_in"], instance: int) -> Float[Tensor, "d_in r"]:
    """Orthonormal basis of the span of the new decoder rows; ValueError if the span is empty or
    all of ``d_in`` (no random baseline is possible then)."""
    n_new, d_in = new_rows.shape
    basis = _span_basis(new_rows)  # [d_in, r]
    if basis.shape[1] == 0:
        raise ValueError(f"instance {instance}: the {n_new} new decoder rows are all zero")
    if basis.shape[1] >= d_in:
        raise ValueError(
            f"instance {instance}: the new decoder rows span all d_in={d_in} dimensions; a random "
            f"subspace of that dimension contains every delta (use fewer new latents)"
        )
    return basis


def _random_subspace_projections(
    delta: Float[Tensor, "w d_in"], rank: int, n_baselines: int, generator: torch.Generator
) -> Float[Tensor, " n_baselines"]:
    """Mean ``||P delta_i||`` over the rows for each of ``n_baselines`` random (Gaussian, then
    orthonormalised) subspaces of dimension ``rank``, float64."""
    d_in = delta.shape[1]
    out = torch.empty(n_baselines, dtype=torch.float64)
    for b in range(n_baselines):
        rand = torch.randn(rank, d_in, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(rand.T)  # [d_in, rank], full rank with probability 1
        out[b] = _mean_row_norm(delta @ q)
    return out


def _instance_hedging(
    extended: SAE, control: SAE, before: SAE | None, instance: int, n_baselines: int, seed: int
) -> InstanceHedging:
    """The statistics of :func:`hedging_scores` for one instance."""
    w = control.d_sae
    W_ext = extended.W_dec[instance].detach().cpu().double()  # [w + n_new, d_in]
    old_ext = unit_rows(W_ext[:w])  # [w, d_in]
    old_ctrl = unit_rows(control.W_dec[instance].detach().cpu().double())  # [w, d_in]
    delta = old_ext - old_ctrl  # [w, d_in]
    basis = _new_latent_basis(W_ext[w:], instance)  # [d_in, r]
    rank = basis.shape[1]
    delta_proj = _mean_row_norm(delta @ basis)  # basis orthonormal: ||B Bᵀ δ|| = ||Bᵀ δ||
    generator = torch.Generator().manual_seed(seed + instance)
    baseline = _random_subspace_projections(delta, rank, n_baselines, generator)  # [n_baselines]
    ctrl_norm = _mean_row_norm(old_ctrl)  # 1 unless the control has dead rows
    delta_portion, baseline_portion = delta_proj / ctrl_norm, baseline.mean() / ctrl_norm
    extended_drift = control_drift = None
    if before is not None:
        old_before = unit_rows(before.W_dec[instance].detach().cpu().double())
        extended_drift = float(_mean_row_norm(old_ext - old_before))
        control_drift = float(_mean_row_norm(old_ctrl - old_before))
    return InstanceHedging(
        rank=rank,
        hedging_rate=hedging_rate(delta_portion, baseline_portion),
        delta_norm=float(_mean_row_norm(delta)),
        delta_proj=float(delta_portion),
        baseline_proj=float(baseline_portion),
        baseline_proj_std=float(baseline.std() / ctrl_norm),
        mean_dec_cos=float((old_ext * old_ctrl).sum(-1).mean()),
        extended_drift=extended_drift,
        control_drift=control_drift,
    )


def _check_hedging_pair(extended: SAE, control: SAE, before: SAE | None, n_baselines: int) -> None:
    """The input checks of :func:`hedging_scores` (its Raises list)."""
    if extended.d_in != control.d_in:
        raise ValueError(f"extended.d_in={extended.d_in} but control.d_in={control.d_in}")
    if extended.n_inst != control.n_inst:
        raise ValueError(f"extended.n_inst={extended.n_inst} but control.n_inst={control.n_inst}")
    if extended.d_sae <= control.d_sae:
        raise ValueError(
            f"extended.d_sae={extended.d_sae} must exceed control.d_sae={control.d_sae} "
            f"(the extended SAE has the new latents)"
        )
    if before is not None and tuple(before.W_dec.shape) != tuple(control.W_dec.shape):
        raise ValueError(
            f"before.W_dec has shape {tuple(before.W_dec.shape)} but control.W_dec has shape "
            f"{tuple(control.W_dec.shape)}"
        )
    if not isinstance(n_baselines, int) or n_baselines < 2:
        raise ValueError(f"n_baselines must be an int >= 2, got {n_baselines!r}")
    check_finite("extended.W_dec", extended.W_dec)
    check_finite("control.W_dec", control.W_dec)
    if before is not None:
        check_finite("before.W_dec", before.W_dec)


@torch.no_grad()
def hedging_scores(
    extended: SAE,
    control: SAE,
    *,
    before: SAE | None = None,
    instances: int | Sequence[int] | None = None,
    n_baselines: int = 50,
    seed: int = 0,
) -> HedgingScores:
    """Hedging rate of Chanin et al. 2025: how far the old decoder rows move into the span of
    newly added latents, beyond what a random subspace of the same dimension would catch.

    ``extended`` and ``control`` were both trained further from the same SAE (``before``);
    ``extended`` got ``n_new`` extra latents appended after the ``w`` old ones (see
    :func:`extend_sae`, :func:`train_hedging_pair`). Per instance, with decoder rows
    unit-normalised: ``delta_i = W_ext[i] - W_ctrl[i]`` for old rows ``i < w``; ``delta_proj`` =
    mean ``||P delta_i||`` with ``P`` the projection onto ``span(W_ext[w:])``; ``baseline_proj`` =
    the same averaged over ``n_baselines`` random Gaussian subspaces of that span's dimension;
    the rate is :func:`hedging_rate` of the two. 0 means the old rows did not move toward the new
    latents more than toward random directions; values near 1 mean the old rows moved by about
    their own length into the new span. See the module docstring for the adaptations from the
    reference.

    Args:
        extended: ``W_dec`` ``[inst, w + n_new, d_in]``.
        control: ``W_dec`` ``[inst, w, d_in]``, same ``n_inst`` and ``d_in``.
        before: optional, ``W_dec`` ``[inst, w, d_in]``: only for the drift diagnostics.
        instances: ``None`` (all), one index, or a list of indices.
        n_baselines: random subspaces per instance (reference: 50); at least 2.
        seed: the random subspaces of instance ``i`` come from ``torch.Generator`` seeded
            ``seed + i`` (the same whichever other instances are scored).

    Returns a :class:`HedgingScores`, one value per scored instance.

    Raises:
        ValueError: ``d_in`` or ``n_inst`` differ; ``extended.d_sae <= control.d_sae``;
            ``before`` shaped unlike ``control``; NaN/inf in a decoder; new decoder rows that
            are all zero, or span ``d_in`` dimensions (no random baseline possible);
            ``n_baselines < 2``; a bad instance index.
    Source: Chanin et al. 2025 (arXiv 2505.11756); ``chanind/feature-hedging-paper``
    ``hedging_paper/evals/hedging_eval.py`` (``calculate_hedging_stats``).
    """
    _check_hedging_pair(extended, control, before, n_baselines)
    scored = instance_indices(extended.n_inst, instances)
    rows = [_instance_hedging(extended, control, before, i, n_baselines, seed) for i in scored]
    return HedgingScores.stack(scored, control.d_sae, extended.d_sae - control.d_sae, rows)


@torch.no_grad()
def extend_sae(sae: SAE, n_new: int, init_norm: float = 0.1, seed: int = 0) -> SAE:
    """A copy of ``sae`` with ``n_new`` latents appended (``d_sae`` → ``d_sae + n_new``).

    The old latents keep their weights (latent ``j < d_sae`` is the same latent); each new latent
    gets a random direction ``v`` (Gaussian, unit norm, times ``init_norm``) as both its decoder
    row and its encoder column, and ``b_enc = 0``, as the reference's ``extend_sae`` does
    (``chanind/feature-hedging-paper``, ``hedging_paper/saes/base_sae.py``). ``b_dec`` and the
    BatchTopK threshold are copied. Instance ``i`` draws from ``torch.Generator`` seeded
    ``seed + i``. ``sae`` itself is not modified.

    Shapes: ``W_enc`` ``[inst, d_in, d_sae]`` → ``[inst, d_in, d_sae + n_new]``, ``W_dec``
    ``[inst, d_sae, d_out]`` → ``[inst, d_sae + n_new, d_out]``.

    Raises ValueError if ``n_new < 1`` or ``init_norm`` is not a positive finite number.
    """
    if not isinstance(n_new, int) or n_new < 1:
        raise ValueError(f"n_new must be an int >= 1, got {n_new!r}")
    if not (math.isfinite(init_norm) and init_norm > 0):
        raise ValueError(f"init_norm must be a positive finite number, got {init_norm!r}")
    w, d_in, d_out = sae.d_sae, sae.d_in, sae.d_out
    cfg = SAEConfig.from_dict({**sae.cfg.to_dict(), "d_sae": w + n_new})
    out = SAE(cfg).to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)
    out.W_enc[:, :, :w] = sae.W_enc
    out.W_dec[:, :w] = sae.W_dec
    out.b_enc[:, :w] = sae.b_enc
    out.b_enc[:, w:] = 0
    out.b_dec.copy_(sae.b_dec)
    out.threshold.copy_(sae.threshold)
    for i in range(sae.n_inst):
        g = torch.Generator().manual_seed(seed + i)
        v = torch.randn(n_new, max(d_in, d_out), generator=g, dtype=torch.float64)
        dec = v[:, :d_out]
        dec = (dec / dec.norm(dim=-1, keepdim=True) * init_norm).to(out.W_dec)  # [n_new, d_out]
        out.W_dec[i, w:] = dec
        if d_out == d_in:  # tied initialisation, as in the reference
            out.W_enc[i, :, w:] = dec.T
        else:  # a transcoder reads another space: same recipe, its own direction
            enc = v[:, :d_in]
            out.W_enc[i, :, w:] = (enc / enc.norm(dim=-1, keepdim=True) * init_norm).T.to(out.W_enc)
    out.train(sae.training)
    return out


def train_hedging_pair(
    before: SAE,
    n_new: int,
    data: DataSource,
    cfg: TrainConfig,
    *,
    init_norm: float = 0.1,
    seed: int = 0,
) -> tuple[SAE, SAE]:
    """Train the two SAEs the hedging eval compares: ``(extended, control)``.

    ``extended`` = :func:`extend_sae` of ``before`` (``n_new`` latents, ``init_norm``, ``seed``),
    ``control`` = a copy of ``before``; both are trained with :func:`saelib.core.train.train_sae` on
    ``data`` with the same ``cfg`` (so the same data stream, ``cfg.seed``). ``before`` is not
    modified. Pass the result to :func:`hedging_scores`. The reference
    (``hedging_paper/scripts/train_hedging_eval_batch_topk_sae.py``) trains both with the
    initial SAE's training configuration. A Matryoshka ``cfg.matryoshka`` must fit both widths.

    Raises what :func:`extend_sae` and :func:`saelib.core.train.train_sae` raise.
    """
    extended = extend_sae(before, n_new, init_norm=init_norm, seed=seed)
    control = copy.deepcopy(before)
    train_sae(control, data, cfg)
    train_sae(extended, data, cfg)
    return extended, control
