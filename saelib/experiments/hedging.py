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
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from ..data.toy_data import ToyHierarchy

__all__ = [
    "hedging_coefficient",
    "hedged_child_cosine",
    "optimal_single_latent",
    "single_latent_mse",
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
