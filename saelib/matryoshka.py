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

Variants (seed 000 and 002 questions; notebook 03):

* ``inner_weight`` (Chanin et al. 2025, arXiv 2505.11756, "balance" Matryoshka): every prefix
  shorter than ``d_sae`` gets weight ``inner_weight`` relative to the full prefix before the row is
  normalised; 0 is a vanilla SAE, 1 the plain Matryoshka mean.
* ``inner_grad_scale``: the loss of a chosen prefix ``m`` sends only this fraction of its gradient
  into the latents that already sit inside the previous chosen prefix (the "inner" sub-SAEs);
  the newest block ``[prev(m), m)`` gets the full gradient. 0 is Nabeshima's stop-gradient
  experiment (seed 000; Chanin's ``use_delta_loss``), values in ``(0, 1)`` the partial version.
  Forward values are unchanged.
* per-``(sample, prefix)`` term masks (:class:`SplitTermMask`): drop the terms in which a child
  feature is active and the prefix holds its parent's latent but not its own (Nabeshima's
  hypothesis for the residual parent/child mixing, seed 000), and
  :func:`prefix_term_gradient` to measure what chosen terms do to one decoder row.

Different instances may use different configs (:class:`PerInstanceMatryoshka`), so that many
variants train side by side in one batched run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .every_prefix import sparse_prefix_loss
from .toy_data import ToyHierarchy

__all__ = [
    "MatryoshkaConfig",
    "prefix_weights",
    "latent_weights",
    "prefix_errors",
    "every_prefix_errors",
    "matryoshka_recon_loss",
    "PerInstanceMatryoshka",
    "batched_prefix_weights",
    "expected_prefix_weights",
    "previous_prefix",
    "routed_prefix_errors",
    "prefix_term_errors",
    "matryoshka_variant_loss",
    "parent_child_split_terms",
    "SplitTermMask",
    "prefix_term_gradient",
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
        inner_weight: weight of every prefix shorter than ``d_sae`` relative to the full prefix,
            before normalising (Chanin et al. 2025's inner-loss multiplier; 0 = vanilla SAE).
        inner_grad_scale: fraction of a prefix loss's gradient that reaches latents inside the
            previous chosen prefix (1 = plain Matryoshka, 0 = stop-gradient; in [0, 1]).
    """

    mode: PrefixMode = "random"
    prefixes: tuple[int, ...] = ()
    n_prefixes: int = 10
    pareto_power: float = 0.5
    min_prefix: int = 1
    weight_sparsity_by_prefix: bool = True
    permute_latents: bool = False
    permute_ema: float = 0.95
    inner_weight: float = 1.0
    inner_grad_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("fixed", "random", "every"):
            raise ValueError(f"MatryoshkaConfig.mode must be 'fixed', 'random' or 'every', got {self.mode!r}")
        if self.mode == "fixed" and not self.prefixes:
            raise ValueError("MatryoshkaConfig.prefixes must be non-empty for mode='fixed'")
        if self.mode == "random" and self.n_prefixes < 1:
            raise ValueError(f"MatryoshkaConfig.n_prefixes must be >= 1, got {self.n_prefixes!r}")
        if not isinstance(self.min_prefix, int) or self.min_prefix < 1:
            raise ValueError(f"MatryoshkaConfig.min_prefix must be an int >= 1, got {self.min_prefix!r}")
        if not (0 < self.pareto_power):
            raise ValueError(f"MatryoshkaConfig.pareto_power must be > 0, got {self.pareto_power!r}")
        if not (0 <= self.inner_weight < float("inf")):
            raise ValueError(f"MatryoshkaConfig.inner_weight must be finite and >= 0, got {self.inner_weight!r}")
        if not (0 <= self.inner_grad_scale <= 1):
            raise ValueError(f"MatryoshkaConfig.inner_grad_scale must be in [0, 1], got {self.inner_grad_scale!r}")
        self.prefixes = tuple(int(p) for p in self.prefixes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prefix_weights(
    cfg: MatryoshkaConfig, d_sae: int, n_inst: int, generator: torch.Generator | None = None
) -> Float[Tensor, "inst d_sae"]:
    """Weight of every prefix length (column ``m - 1`` ↔ length ``m``) for one training step.

    With ``cfg.inner_weight != 1`` every prefix shorter than ``d_sae`` is scaled by it and the
    row renormalised to sum to 1.

    Raises ValueError if a fixed prefix is outside ``[1, d_sae]`` or ``"random"`` asks for more
    distinct lengths than exist.
    """
    w = _equal_prefix_weights(cfg, d_sae, n_inst, generator)
    if cfg.inner_weight != 1.0:
        w[:, :-1] *= cfg.inner_weight
        w = w / w.sum(-1, keepdim=True)
    return w


def _equal_prefix_weights(
    cfg: MatryoshkaConfig, d_sae: int, n_inst: int, generator: torch.Generator | None
) -> Float[Tensor, "inst d_sae"]:
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


def latent_weights(
    weights: Float[Tensor, "inst d_sae"], inner_grad_scale: Float[Tensor, " inst"] | None = None
) -> Float[Tensor, "inst d_sae"]:
    """Fraction (by weight) of prefixes that contain each latent: ``T_j = sum_{m > j} w_m``.

    With ``inner_grad_scale`` ``γ`` (see :func:`routed_prefix_errors`) the sparsity penalty is
    routed like the reconstruction: prefix ``m`` penalises its own block at full weight and the
    inner latents at ``γ``, so latent ``j`` gets ``w_h + γ (T_j - w_h)`` where ``h`` is the
    smallest chosen prefix containing it (its block). As in Chanin et al.'s ``use_delta_loss``,
    where each prefix's L1 covers only its new block.
    """
    tail = weights.flip(-1).cumsum(-1).flip(-1)
    if inner_grad_scale is None:
        return tail
    w_home = weights.gather(-1, _home_prefix(weights))
    gamma = inner_grad_scale.to(weights)[:, None]
    return w_home + gamma * (tail - w_home)


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


# the dense Gram path costs batch · inst · d_sae² multiply-adds: used below this many, or when
# d_sae <= d_in (then it costs at most one more encoder-sized product)
_DENSE_PREFIX_LIMIT = 2**23


def matryoshka_recon_loss(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    weights: Float[Tensor, "inst d_sae"],
) -> Float[Tensor, " inst"]:
    """Weighted mean over prefixes of the batch-mean squared error, per instance.

    Small problems and ``d_sae <= d_in`` use the dense Gram path (:func:`every_prefix_errors`);
    larger ones use the sparse exact path (:func:`saelib.every_prefix.sparse_prefix_loss`, cost
    set by the largest row L0) when that L0 is below the number of weighted prefixes, else one
    decode split into blocks.
    """
    if acts.numel() * acts.shape[-1] <= _DENSE_PREFIX_LIMIT or acts.shape[-1] <= x.shape[-1]:
        errs = every_prefix_errors(x, acts, W_dec, b_dec).mean(0)  # [inst, d_sae]
        return (errs * weights).sum(-1)
    ends = torch.nonzero(weights.sum(0) > 0).flatten() + 1
    if int((acts != 0).sum(-1).max()) < len(ends):  # e.g. "every" prefix on a wide TopK SAE
        return sparse_prefix_loss(x, acts, W_dec, b_dec, weights)
    errs = prefix_errors(x, acts, W_dec, b_dec, ends).mean(0)  # [inst, K]
    return (errs * weights[:, ends - 1]).sum(-1)


# ---------------------------------------------------------------------- per-instance configs
_SAMPLING_FIELDS = ("mode", "prefixes", "n_prefixes", "pareto_power", "min_prefix", "inner_weight")


def _config_key(cfg: MatryoshkaConfig) -> tuple:
    """The fields that decide the prefix weights (configs differing elsewhere draw together)."""
    return tuple(getattr(cfg, f) for f in _SAMPLING_FIELDS)


def batched_prefix_weights(
    cfgs: Sequence[MatryoshkaConfig], d_sae: int, generator: torch.Generator | None = None
) -> Float[Tensor, "inst d_sae"]:
    """:func:`prefix_weights` for one config per instance.

    Instances whose configs agree on the fields that decide the weights (mode, prefixes,
    n_prefixes, pareto_power, min_prefix, inner_weight) are drawn together, groups in order of
    first appearance, so a list of ``n`` such configs draws exactly what
    ``prefix_weights(cfg, d_sae, n)`` draws.
    Raises ValueError as :func:`prefix_weights`.
    """
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        groups.setdefault(_config_key(cfg), []).append(i)
    w = torch.zeros(len(cfgs), d_sae)
    for idx in groups.values():
        w[idx] = prefix_weights(cfgs[idx[0]], d_sae, len(idx), generator)
    return w


@dataclass
class PerInstanceMatryoshka:
    """One :class:`MatryoshkaConfig` per instance, with the per-instance tensors training needs.

    Attributes:
        configs: the configs, one per instance.
        inner_grad_scale: ``[inst]`` float.
        permute: ``[inst]`` bool, whether the instance permutes its latents.
        permute_ema: ``[inst]`` float.
        sparsity_by_prefix: ``[inst]`` bool, whether the penalty is weighted by prefix weights.
    """

    configs: list[MatryoshkaConfig]
    inner_grad_scale: Float[Tensor, " inst"]
    permute: Bool[Tensor, " inst"]
    permute_ema: Float[Tensor, " inst"]
    sparsity_by_prefix: Bool[Tensor, " inst"]

    @classmethod
    def build(cls, cfg: MatryoshkaConfig | Sequence[MatryoshkaConfig], n_inst: int) -> "PerInstanceMatryoshka":
        """Expand one config to every instance, or check a list has one per instance.

        Raises ValueError if a list's length is not ``n_inst`` or an entry is not a config.
        """
        cfgs = [cfg] * n_inst if isinstance(cfg, MatryoshkaConfig) else list(cfg)
        if len(cfgs) != n_inst:
            raise ValueError(f"got {len(cfgs)} Matryoshka configs for n_inst={n_inst}")
        bad = [type(c).__name__ for c in cfgs if not isinstance(c, MatryoshkaConfig)]
        if bad:
            raise ValueError(f"per-instance Matryoshka configs must be MatryoshkaConfig, got {bad[:3]}")
        return cls(
            configs=cfgs,
            inner_grad_scale=torch.tensor([c.inner_grad_scale for c in cfgs], dtype=torch.float32),
            permute=torch.tensor([c.permute_latents for c in cfgs]),
            permute_ema=torch.tensor([c.permute_ema for c in cfgs], dtype=torch.float32),
            sparsity_by_prefix=torch.tensor([c.weight_sparsity_by_prefix for c in cfgs]),
        )

    def to(self, device: torch.device | str) -> "PerInstanceMatryoshka":
        """The same plan with its tensors on ``device`` (the SAE's, for training)."""
        return PerInstanceMatryoshka(
            self.configs,
            self.inner_grad_scale.to(device),
            self.permute.to(device),
            self.permute_ema.to(device),
            self.sparsity_by_prefix.to(device),
        )

    @property
    def routes_gradient(self) -> bool:
        """True if some instance scales the gradient into inner latents."""
        return bool((self.inner_grad_scale != 1).any())

    def weights(self, d_sae: int, generator: torch.Generator | None = None) -> Float[Tensor, "inst d_sae"]:
        """This step's prefix weights (one :func:`prefix_weights` draw when all configs agree)."""
        if all(c == self.configs[0] for c in self.configs):  # the single-config path, unchanged
            return prefix_weights(self.configs[0], d_sae, len(self.configs), generator)
        return batched_prefix_weights(self.configs, d_sae, generator)

    def independent_weights(
        self, d_sae: int, generators: Sequence[torch.Generator]
    ) -> Float[Tensor, "inst d_sae"]:
        """This step's prefix weights with instance ``i``'s row drawn from ``generators[i]`` alone,
        exactly as ``prefix_weights(configs[i], d_sae, 1, generators[i])``: a row does not depend
        on how many instances there are (:class:`saelib.train.TrainConfig` ``independent_instances``).

        Raises ValueError if there is not one generator per instance, or as :func:`prefix_weights`.
        """
        if len(generators) != len(self.configs):
            raise ValueError(f"got {len(generators)} generators for {len(self.configs)} instances")
        return torch.cat([prefix_weights(c, d_sae, 1, g) for c, g in zip(self.configs, generators)])


def expected_prefix_weights(
    cfg: MatryoshkaConfig, d_sae: int, n_draws: int = 4096, seed: int = 0
) -> Float[Tensor, " d_sae"]:
    """Mean prefix weights over ``n_draws`` draws (exact for ``"fixed"`` and ``"every"``):
    the weights to use when measuring the loss's average effect, e.g. in
    :func:`prefix_term_gradient`."""
    g = torch.Generator().manual_seed(seed)
    return prefix_weights(cfg, d_sae, n_draws, g).mean(0)


# ---------------------------------------------------------------------- gradient routing
def previous_prefix(weights: Float[Tensor, "inst d_sae"]) -> Int[Tensor, "inst d_sae"]:
    """For every length ``m`` (column ``m - 1``), the largest chosen length ``< m`` (0 if none).

    A length is chosen when its weight is > 0. The latents ``[prev(m), m)`` are the block that
    prefix ``m`` adds; latents ``< prev(m)`` belong to smaller chosen prefixes ("inner").
    """
    d_sae = weights.shape[-1]
    lengths = torch.arange(1, d_sae + 1, device=weights.device).expand_as(weights) * (weights > 0)  # 0 where not chosen
    upto = lengths.cummax(dim=-1).values  # largest chosen length <= m
    return torch.cat([torch.zeros_like(upto[:, :1]), upto[:, :-1]], dim=-1)


def routed_prefix_errors(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    weights: Float[Tensor, "inst d_sae"],
    inner_grad_scale: Float[Tensor, " inst"],
) -> Float[Tensor, "batch inst d_sae"]:
    """Every prefix's squared error (as :func:`every_prefix_errors`), with the gradient that error
    ``m`` sends into latents ``< prev(m)`` (see :func:`previous_prefix`) multiplied by
    ``inner_grad_scale``; latents ``[prev(m), m)``, ``b_dec`` and ``x`` get the full gradient.

    The values equal :func:`every_prefix_errors`. Cost: one ``[batch, inst, d_sae, d_in]``
    tensor of per-latent contributions (decodes every prefix explicitly).
    """
    batch, inst, d_sae = acts.shape
    contrib = acts[..., None] * W_dec[None]  # [batch, inst, d_sae, d_in]
    cum = torch.cat([torch.zeros_like(contrib[:, :, :1]), contrib.cumsum(dim=2)], dim=2)  # [b, i, s+1, d]
    full = cum[:, :, 1:]  # recon of prefix m (without b_dec), [b, i, s, d]
    prev = previous_prefix(weights)  # [inst, s]
    inner = cum.gather(2, prev[None, :, :, None].expand(batch, inst, d_sae, cum.shape[-1]))
    scale = inner_grad_scale.to(contrib)[None, :, None, None]
    # forward: full; backward through the inner part scaled by inner_grad_scale
    recon = full - (1 - scale) * (inner - inner.detach())
    return ((x - b_dec)[:, :, None, :] - recon).pow(2).sum(-1)


def prefix_term_errors(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    weights: Float[Tensor, "inst d_sae"],
    inner_grad_scale: Float[Tensor, " inst"] | None = None,
) -> Float[Tensor, "batch inst d_sae"]:
    """Per-sample squared error of every prefix; instances with ``inner_grad_scale != 1`` use
    :func:`routed_prefix_errors`, the others :func:`every_prefix_errors`."""
    if inner_grad_scale is None or bool((inner_grad_scale == 1).all()):
        return every_prefix_errors(x, acts, W_dec, b_dec)
    routed = (inner_grad_scale != 1).nonzero().flatten()
    plain = (inner_grad_scale == 1).nonzero().flatten()
    out = x.new_zeros(acts.shape)
    parts = [
        (routed, routed_prefix_errors(x[:, routed], acts[:, routed], W_dec[routed], b_dec[routed],
                                      weights[routed], inner_grad_scale[routed])),
    ]
    if len(plain):
        parts.append((plain, every_prefix_errors(x[:, plain], acts[:, plain], W_dec[plain], b_dec[plain])))
    for idx, errs in parts:
        out = out.index_copy(1, idx, errs)
    return out


def _home_prefix(weights: Float[Tensor, "inst d_sae"]) -> Int[Tensor, "inst d_sae"]:
    """Column of the smallest chosen prefix that contains each latent (its block)."""
    d_sae = weights.shape[-1]
    cols = torch.arange(d_sae, device=weights.device).expand_as(weights)
    chosen_col = torch.where(weights > 0, cols, torch.full_like(cols, d_sae))
    return chosen_col.flip(-1).cummin(-1).values.flip(-1).clamp_max(d_sae - 1)


def _block_only_surrogate(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    weights: Float[Tensor, "inst d_sae"],
) -> Float[Tensor, " inst"]:
    """A function whose gradient is that of the Matryoshka loss with inner latents detached
    (``inner_grad_scale = 0``); its value is not the loss.

    With ``h(j)`` the block (home prefix) of latent ``j``, ``T_j`` its tail weight and ``p_j =
    <x - b_dec, W_dec[j]>``, prefix ``m`` contributes ``w_m ||e - sg(I_m) - B_m||²`` (``I_m``: inner
    latents' reconstruction, ``B_m``: its block's). Summed over prefixes the parts that carry
    gradient are::

        W ||e||² - 2 sum_j w_h(j) a_j p_j - 2 sum_j (T_j - w_h(j)) sg(a_j) <e, sg(W_dec[j])>
        + sum_{j,k: h(j)=h(k)} w_h(j) a_j a_k <W_dec[j], W_dec[k]>
        + 2 sum_{j,k: h(k)<h(j)} w_h(j) a_j sg(a_k) <W_dec[j], sg(W_dec[k])>

    at a cost of ``O(batch · inst · d_sae · (d_in + d_sae))``, without decoding any prefix.
    """
    home = _home_prefix(weights)  # [i, s]
    w_home = weights.gather(-1, home)  # [i, s]
    tail = weights.flip(-1).cumsum(-1).flip(-1)  # [i, s]
    e = x - b_dec  # [b, i, d]
    W_sg = W_dec.detach()
    a_sg = acts.detach()
    a_t, a_sg_t, e_t = acts.transpose(0, 1), a_sg.transpose(0, 1), e.transpose(0, 1)  # [i, b, .]
    same = (home[:, :, None] == home[:, None, :]).to(W_dec.dtype) * w_home[:, :, None]  # [i, s, s]
    inner = (home[:, None, :] < home[:, :, None]).to(W_dec.dtype) * w_home[:, :, None]  # k inner to j
    gram = torch.bmm(W_dec, W_dec.transpose(1, 2))  # [i, s, s]
    gram_half = torch.bmm(W_dec, W_sg.transpose(1, 2))
    # quadratic terms, and the linear term's block part; [i, b]
    quad = (torch.bmm(a_t, gram * same) * a_t).sum(-1)
    quad = quad + 2 * (a_t * torch.bmm(a_sg_t, (gram_half * inner).transpose(1, 2))).sum(-1)
    block_rec = torch.bmm(a_t * w_home[:, None, :], W_dec)  # sum_j w_h a_j W_dec[j], [i, b, d]
    inner_rec = torch.bmm(a_sg_t * (tail - w_home)[:, None, :], W_sg)  # detached, [i, b, d]
    linear = -2 * (e_t * (block_rec + inner_rec)).sum(-1)
    total = tail[:, :1]  # W = sum_m w_m, [i, 1]
    return (total * e_t.pow(2).sum(-1) + linear + quad).mean(1)


def matryoshka_variant_loss(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    weights: Float[Tensor, "inst d_sae"],
    inner_grad_scale: Float[Tensor, " inst"] | None = None,
    keep: Float[Tensor, "batch inst d_sae"] | None = None,
) -> Float[Tensor, " inst"]:
    """:func:`matryoshka_recon_loss` with gradient routing and per-term masks.

    ``sum_m w_m mean_batch(keep[b, m] * err[b, m])``: ``keep`` (1 keeps, 0 drops a
    ``(sample, prefix)`` term; the batch mean still divides by the full batch) defaults to all
    ones; ``inner_grad_scale`` ``γ`` as in :func:`routed_prefix_errors`. The value never depends
    on ``γ``. With both left at their defaults this is :func:`matryoshka_recon_loss`.

    Without ``keep``, routed instances use ``γ·L + (1 - γ)·L_block`` where ``L_block`` has the
    gradient of the stop-gradient loss (see ``_block_only_surrogate``) and the value of ``L``;
    with ``keep``, per-term errors come from :func:`prefix_term_errors`.

    Raises ValueError if ``keep`` is not ``[batch, inst, d_sae]``.
    """
    routed = None if inner_grad_scale is None else (inner_grad_scale != 1).nonzero().flatten()
    if keep is None:
        loss = matryoshka_recon_loss(x, acts, W_dec, b_dec, weights)  # [inst]
        if routed is None or len(routed) == 0:
            return loss
        r = routed
        gamma = inner_grad_scale[r].to(loss)
        sur = _block_only_surrogate(x[:, r], acts[:, r], W_dec[r], b_dec[r], weights[r])
        routed_loss = gamma * loss[r] + (1 - gamma) * (loss[r].detach() + sur - sur.detach())
        return loss.index_copy(0, r, routed_loss)
    if keep.shape != acts.shape:
        raise ValueError(f"keep must have shape {tuple(acts.shape)}, got {tuple(keep.shape)}")
    keep = keep.to(acts.dtype)
    errs = every_prefix_errors(x, acts, W_dec, b_dec)  # [b, i, s]
    loss = ((errs * keep).mean(0) * weights).sum(-1)  # [inst]
    if routed is None or len(routed) == 0:
        return loss
    # routed instances that drop no term take the cheap surrogate, the others the dense errors
    whole = keep[:, routed].eq(1).all(dim=2).all(dim=0)
    r = routed[whole]
    if len(r):
        gamma = inner_grad_scale[r].to(loss)
        sur = _block_only_surrogate(x[:, r], acts[:, r], W_dec[r], b_dec[r], weights[r])
        loss = loss.index_copy(0, r, gamma * loss[r] + (1 - gamma) * (loss[r].detach() + sur - sur.detach()))
    r = routed[~whole]
    if len(r):
        dense = routed_prefix_errors(x[:, r], acts[:, r], W_dec[r], b_dec[r], weights[r], inner_grad_scale[r])
        loss = loss.index_copy(0, r, ((dense * keep[:, r]).mean(0) * weights[r]).sum(-1))
    return loss


# ---------------------------------------------------------------------- parent-in / child-out terms
def parent_child_split_terms(
    coeffs: Float[Tensor, "batch n_feat"],
    parent_index: Int[Tensor, " n_feat"],
    latent_of_feature: Int[Tensor, "inst n_feat"],
    d_sae: int,
) -> Bool[Tensor, "batch inst d_sae"]:
    """Which ``(sample, prefix length)`` terms hold a parent latent but not an active child's.

    Term ``(b, m)`` (column ``m - 1``) of instance ``i`` is marked when some feature ``c`` with
    parent ``p`` has ``coeffs[b, c] > 0`` and ``coeffs[b, p] > 0`` (child and parent both
    active), and ``latent_of_feature[i, p] < m <= latent_of_feature[i, c]``: the prefix contains
    the parent's latent but not the child's. These are the loss terms of Nabeshima's hypothesis
    for the residual mixing (seed 000). A latent index of -1 means "no latent": pairs involving
    it are never marked.

    Raises ValueError on mismatched shapes.
    """
    batch, n_feat = coeffs.shape
    if parent_index.shape != (n_feat,) or latent_of_feature.ndim != 2 or latent_of_feature.shape[1] != n_feat:
        raise ValueError(
            f"coeffs {tuple(coeffs.shape)}, parent_index {tuple(parent_index.shape)} and "
            f"latent_of_feature {tuple(latent_of_feature.shape)} disagree on n_feat={n_feat}"
        )
    inst = latent_of_feature.shape[0]
    child = (parent_index >= 0).nonzero().flatten()  # [n_pairs]
    parent = parent_index[child]
    out = torch.zeros(batch, inst, d_sae, dtype=torch.bool, device=coeffs.device)
    if len(child) == 0:
        return out
    both = (coeffs[:, child] > 0) & (coeffs[:, parent] > 0)  # [batch, n_pairs]
    lp, lc = latent_of_feature[:, parent], latent_of_feature[:, child]  # [inst, n_pairs]
    cols = torch.arange(d_sae, device=coeffs.device)  # column k <-> length k + 1: marked iff lp <= k < lc
    span = (lp[..., None] <= cols) & (cols < lc[..., None]) & (lp[..., None] >= 0) & (lc[..., None] >= 0)
    # [inst, n_pairs, d_sae]; a term is marked if any active pair spans it
    hits = torch.einsum("bp,ips->bis", both.float(), span.float())
    return hits > 0


class SplitTermMask:
    """A ``term_mask`` for :func:`saelib.train.train_sae` that drops the parent-in / child-out
    terms of :func:`parent_child_split_terms` (keep = 0) and keeps every other term (keep = 1).

    The active features of a sample are decoded from ``x`` by least squares against the
    hierarchy's feature directions, exact when they are linearly independent (``d >= n``).

    Args:
        hierarchy: the toy hierarchy the data comes from.
        latent_of_feature: ``[inst, n_feat]`` long, the latent that represents each feature in
            each instance (e.g. the Hungarian match, or the order of a truth initialisation).
        instances: ``[inst]`` bool, the instances whose terms are dropped (default: all).
        d_sae: number of latents.

    Raises ValueError if the feature directions are linearly dependent or shapes disagree.
    """

    def __init__(
        self,
        hierarchy: ToyHierarchy,
        latent_of_feature: Int[Tensor, "inst n_feat"],
        d_sae: int,
        instances: Bool[Tensor, " inst"] | None = None,
    ):
        feats = hierarchy.features.double()  # [n_feat, d]
        if torch.linalg.matrix_rank(feats) < hierarchy.n_features:
            raise ValueError(
                f"SplitTermMask needs linearly independent features, got {hierarchy.n_features} "
                f"features in d={hierarchy.d}"
            )
        if latent_of_feature.shape[1] != hierarchy.n_features:
            raise ValueError(
                f"latent_of_feature must be [inst, {hierarchy.n_features}], got {tuple(latent_of_feature.shape)}"
            )
        self.decode = torch.linalg.pinv(feats).float()  # [d, n_feat]: x @ decode = coeffs
        self.parent_index = hierarchy.parent_index
        self.latent_of_feature = latent_of_feature.long()
        n_inst = latent_of_feature.shape[0]
        self.instances = torch.ones(n_inst, dtype=torch.bool) if instances is None else instances.bool()
        if self.instances.shape != (n_inst,):
            raise ValueError(f"instances must be [{n_inst}] bool, got {tuple(self.instances.shape)}")
        self.d_sae = d_sae

    def coefficients(self, x: Float[Tensor, "batch d"]) -> Float[Tensor, "batch n_feat"]:
        """Feature coefficients decoded from inputs (values below 1e-3 are set to 0)."""
        c = x @ self.decode.to(x)
        return torch.where(c.abs() > 1e-3, c, torch.zeros_like(c))

    def __call__(self, x: Float[Tensor, "batch d"]) -> Float[Tensor, "batch inst d_sae"]:
        if x.ndim != 2:
            raise ValueError(f"SplitTermMask expects x of shape [batch, d] (shared by instances), got {tuple(x.shape)}")
        idx = self.instances.nonzero().flatten()
        keep = x.new_ones(x.shape[0], len(self.instances), self.d_sae)
        if len(idx):
            split = parent_child_split_terms(
                self.coefficients(x), self.parent_index.to(x.device), self.latent_of_feature[idx].to(x.device), self.d_sae
            )
            keep[:, idx] = (~split).to(keep.dtype)
        return keep


def prefix_term_gradient(
    sae: Any,
    x: Float[Tensor, "batch d_in"] | Float[Tensor, "batch inst d_in"],
    weights: Float[Tensor, "inst d_sae"],
    terms: Float[Tensor, "batch inst d_sae"],
    latent: Int[Tensor, " inst"],
    directions: Float[Tensor, "inst n_dir d_in"] | Float[Tensor, "n_dir d_in"],
) -> Float[Tensor, "inst n_dir"]:
    """Component of the descent step that chosen loss terms give one decoder row, along given
    directions.

    With ``L = sum_m w_m mean_batch(terms[b, m] * err[b, m])`` (the Matryoshka reconstruction loss
    restricted to the selected ``(sample, prefix)`` terms; ``terms`` may be 0/1 or weights), returns
    ``-dL/dW_dec[i, latent[i]] · d̂`` for every unit direction ``d̂`` of ``directions`` (shared, or
    one set per instance). Positive means these terms pull the decoder row toward the direction.
    Reconstruction only (no sparsity penalty). Parameters are not changed.

    Used for Nabeshima's hypothesis (seed 000): with ``terms`` from
    :func:`parent_child_split_terms`, ``latent`` the parent latents and ``directions`` the child
    features, a positive value is the push of the parent decoder toward its children.

    Raises ValueError on mismatched shapes.
    """
    n_inst = sae.n_inst
    if latent.shape != (n_inst,):
        raise ValueError(f"latent must be [{n_inst}] long, got {tuple(latent.shape)}")
    dirs = directions.expand(n_inst, *directions.shape) if directions.ndim == 2 else directions
    if dirs.shape[0] != n_inst or dirs.shape[-1] != sae.d_out:
        raise ValueError(f"directions must be [n_dir, {sae.d_out}] or [{n_inst}, n_dir, {sae.d_out}], got {tuple(directions.shape)}")
    with torch.enable_grad():
        x_in = sae._as_instances(x)
        x_hat, acts = sae(x_in)
        errs = every_prefix_errors(x_in, acts, sae.W_dec, sae.b_dec)  # [b, i, s]
        if terms.shape != errs.shape:
            raise ValueError(f"terms must have shape {tuple(errs.shape)}, got {tuple(terms.shape)}")
        loss = ((errs * terms.to(errs.dtype)).mean(0) * weights).sum()
        (grad,) = torch.autograd.grad(loss, sae.W_dec)
    row = grad[torch.arange(n_inst, device=grad.device), latent.to(grad.device)]  # [inst, d_in]
    unit = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return -torch.einsum("id,ind->in", row, unit)
