"""The Matryoshka reconstruction loss over nested prefixes of latents.

A Matryoshka SAE (Nabeshima 2024, "Matryoshka Sparse Autoencoders", LessWrong; Bussmann et al.
2025, arXiv 2503.17547) asks every prefix ``latents[:m]`` to reconstruct the input on its own.
The loss is a weighted mean over prefix lengths ``m`` of the squared error of
``acts[:, :m] @ W_dec[:m] + b_dec``. Which prefixes, and with what weight, is a
``[inst, d_sae]`` weight matrix (column ``m - 1`` is prefix length ``m``; rows sum to 1):

* ``"fixed"``: a given list of lengths, equal weights (Bussmann-style groups; Chanin's [1, 3]);
* ``"random"``: Nabeshima's sampling: each step ``n_prefixes - 1`` distinct lengths from
  ``{min_prefix .. d_sae - 1}`` with ``P(m) ∝ (m / d_sae)^p - ((m - 1) / d_sae)^p`` (a truncated
  Pareto, ``p = 0.5``), plus the full length; drawn independently per instance;
* ``"every"``: every length ``1 .. d_sae`` with weight ``1 / d_sae``.

With ``weight_sparsity_by_prefix`` (Nabeshima's code) the sparsity penalty is averaged over the
same prefixes, so latent ``j`` is penalised with weight ``sum_{m > j} w_m``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "MatryoshkaConfig",
    "prefix_weights",
    "latent_weights",
    "prefix_errors",
    "every_prefix_errors",
    "matryoshka_recon_loss",
]

PrefixMode = Literal["fixed", "random", "every"]


@dataclass
class MatryoshkaConfig:
    """How prefixes are chosen for the Matryoshka loss.

    Attributes:
        mode: ``"fixed"``, ``"random"`` or ``"every"`` (see the module docstring).
        prefixes: prefix lengths for ``"fixed"`` (the full length is added if missing).
        n_prefixes: prefixes per step for ``"random"``, the full length included (Nabeshima: 10).
        pareto_power: exponent ``p`` of the truncated-Pareto length distribution.
        min_prefix: smallest sampled length for ``"random"``.
        weight_sparsity_by_prefix: average the sparsity penalty over the prefixes too.
        permute_latents: after each step, sort latents by an EMA of their mean squared
            decoder-norm-scaled activation, descending (Nabeshima's latent permutation).
        permute_ema: EMA decay of that statistic.
    """

    mode: PrefixMode = "random"
    prefixes: tuple[int, ...] = ()
    n_prefixes: int = 10
    pareto_power: float = 0.5
    min_prefix: int = 1
    weight_sparsity_by_prefix: bool = True
    permute_latents: bool = False
    permute_ema: float = 0.95

    def __post_init__(self) -> None:
        if self.mode not in ("fixed", "random", "every"):
            raise ValueError(f"MatryoshkaConfig.mode must be 'fixed', 'random' or 'every', got {self.mode!r}")
        if self.mode == "fixed" and not self.prefixes:
            raise ValueError("MatryoshkaConfig.prefixes must be non-empty for mode='fixed'")
        if self.mode == "random" and self.n_prefixes < 1:
            raise ValueError(f"MatryoshkaConfig.n_prefixes must be >= 1, got {self.n_prefixes!r}")
        if not (0 < self.pareto_power):
            raise ValueError(f"MatryoshkaConfig.pareto_power must be > 0, got {self.pareto_power!r}")
        self.prefixes = tuple(int(p) for p in self.prefixes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prefix_weights(
    cfg: MatryoshkaConfig, d_sae: int, n_inst: int, generator: torch.Generator | None = None
) -> Float[Tensor, "inst d_sae"]:
    """Weight of every prefix length (column ``m - 1`` ↔ length ``m``) for one training step.

    Raises ValueError if a fixed prefix is outside ``[1, d_sae]`` or ``"random"`` asks for more
    distinct lengths than exist.
    """
    w = torch.zeros(n_inst, d_sae)
    if cfg.mode == "every":
        return w + 1.0 / d_sae
    if cfg.mode == "fixed":
        lengths = sorted(set(cfg.prefixes) | {d_sae})
        bad = [m for m in lengths if not (1 <= m <= d_sae)]
        if bad:
            raise ValueError(f"Matryoshka prefixes {bad} are outside [1, d_sae={d_sae}]")
        w[:, torch.tensor(lengths) - 1] = 1.0 / len(lengths)
        return w
    # random (Nabeshima's truncated Pareto)
    n_sampled = cfg.n_prefixes - 1
    candidates = torch.arange(cfg.min_prefix, d_sae)  # lengths min_prefix .. d_sae - 1
    if n_sampled > len(candidates):
        raise ValueError(
            f"n_prefixes={cfg.n_prefixes} needs {n_sampled} distinct lengths but only "
            f"{len(candidates)} exist below d_sae={d_sae}"
        )
    w[:, d_sae - 1] = 1.0 / cfg.n_prefixes
    if n_sampled == 0:
        return w
    m = candidates.double()
    probs = (m / d_sae) ** cfg.pareto_power - ((m - 1) / d_sae) ** cfg.pareto_power
    picks = torch.multinomial(probs.expand(n_inst, -1), n_sampled, replacement=False, generator=generator)
    w.scatter_(1, candidates[picks] - 1, 1.0 / cfg.n_prefixes)
    return w


def latent_weights(weights: Float[Tensor, "inst d_sae"]) -> Float[Tensor, "inst d_sae"]:
    """Fraction (by weight) of prefixes that contain each latent: ``sum_{m > j} w_m``."""
    return weights.flip(-1).cumsum(-1).flip(-1)


def prefix_errors(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    ends: Tensor,
) -> Float[Tensor, "batch inst n_ends"]:
    """Squared error ``||x - acts[:, :m] @ W_dec[:m] - b_dec||²`` for each length ``m`` in ``ends``.

    ``ends`` is a sorted 1-d long tensor of prefix lengths in ``[1, d_sae]``. Cost: one decode
    split into blocks at ``ends``, plus a cumulative sum over the blocks.
    """
    bounds = [0] + [int(e) for e in ends]
    block_out = [
        torch.einsum("bis,isd->bid", acts[..., s:e], W_dec[:, s:e]) for s, e in zip(bounds[:-1], bounds[1:])
    ]
    recon = torch.stack(block_out, dim=2).cumsum(dim=2) + b_dec[None, :, None, :]  # [b, i, K, d]
    return (x[:, :, None, :] - recon).pow(2).sum(-1)


def every_prefix_errors(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
) -> Float[Tensor, "batch inst d_sae"]:
    """Squared error of every prefix at once (column ``m - 1`` ↔ length ``m``), exactly.

    With ``e = x - b_dec``, ``d_j`` the decoder rows and ``G = W_dec W_decᵀ`` their Gram matrix::

        ||e - sum_{j<m} a_j d_j||² = ||e||² - 2 sum_{j<m} a_j <e, d_j>
                                     + sum_{j<m} a_j (2 sum_{i<=j} a_i G_ij - a_j G_jj)

    so all ``d_sae`` prefix errors come from cumulative sums over latents, at a cost of
    ``O(batch · d_sae · (d_in + d_sae))`` per instance instead of one decode per prefix.
    """
    e = x - b_dec  # [b, i, d]
    gram = torch.einsum("isd,itd->ist", W_dec, W_dec)  # [i, s, s]
    proj = torch.einsum("bid,isd->bis", e, W_dec)  # <e, d_j>
    upper = torch.einsum("bis,ist->bit", acts, gram.triu())  # sum_{i<=j} a_i G_ij
    diag = gram.diagonal(dim1=-2, dim2=-1)  # [i, s]
    terms = acts * (2 * upper - acts * diag - 2 * proj)
    return e.pow(2).sum(-1, keepdim=True) + terms.cumsum(-1)


# above this many elements in [batch, inst, d_sae, d_sae], decode block by block instead
_DENSE_PREFIX_LIMIT = 2**23


def matryoshka_recon_loss(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    weights: Float[Tensor, "inst d_sae"],
) -> Float[Tensor, " inst"]:
    """Weighted mean over prefixes of the batch-mean squared error, per instance."""
    if acts.numel() * acts.shape[-1] <= _DENSE_PREFIX_LIMIT:
        errs = every_prefix_errors(x, acts, W_dec, b_dec).mean(0)  # [inst, d_sae]
        return (errs * weights).sum(-1)
    ends = torch.nonzero(weights.sum(0) > 0).flatten() + 1
    errs = prefix_errors(x, acts, W_dec, b_dec, ends).mean(0)  # [inst, K]
    return (errs * weights[:, ends - 1]).sum(-1)
