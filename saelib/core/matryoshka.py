"""The Matryoshka reconstruction loss over nested prefixes of latents: one entry point,
:func:`matryoshka_loss`.

A Matryoshka SAE (Nabeshima 2024, "Matryoshka Sparse Autoencoders", LessWrong; Bussmann et al.
2025, arXiv 2503.17547) asks every prefix ``latents[:m]`` to reconstruct the input on its own.
The loss is a weighted sum over prefix lengths ``m`` of the batch-mean squared error of
``acts[:, :m] @ W_dec[:m] + b_dec``. Which prefixes, and with what weight, is a
``[inst, d_sae]`` weight matrix (column ``m - 1`` is prefix length ``m``; rows sum to 1):

* ``"fixed"``: a given list of lengths, equal weights (Bussmann-style groups; Chanin's [1, 3]);
* ``"random"``: Nabeshima's sampling: each step ``n_prefixes - 1`` distinct lengths from
  ``{min_prefix .. d_sae - 1}`` with ``P(m) ∝ (m / d_sae)^p - ((m - 1) / d_sae)^p`` (a truncated
  Pareto, ``p = 0.5``), plus the full length; drawn independently per instance;
* ``"every"``: every length ``1 .. d_sae`` with weight ``1 / d_sae``.

With ``weight_sparsity_by_prefix`` (Nabeshima's code) the sparsity penalty is averaged over the
same prefixes, so latent ``j`` is penalised with its tail weight ``T_j = sum_{m > j} w_m``
(:func:`latent_weights`).

Variants (Nabeshima's and Chanin's questions in the comments on Nabeshima 2024; notebook 03), all
options of :func:`matryoshka_loss`:

* ``inner_weight`` (Chanin et al. 2025, arXiv 2505.11756, "balance" Matryoshka): every prefix
  shorter than ``d_sae`` gets weight ``inner_weight`` relative to the full prefix before the row is
  normalised; 0 is a vanilla SAE, 1 the plain Matryoshka mean (in :func:`prefix_weights`).
* ``inner_grad_scale``: the loss of a chosen prefix ``m`` sends only this fraction of its gradient
  into the latents that already sit inside the previous chosen prefix (the "inner" sub-SAEs);
  the newest block ``[prev(m), m)`` gets the full gradient. 0 is Nabeshima's stop-gradient
  experiment (his comment on Bussmann et al. 2024b; Chanin's ``use_delta_loss``), values in ``(0, 1)``
  the partial version.
  Forward values are unchanged.
* ``keep``: per-``(sample, prefix)`` term weights, e.g. the parent-in / child-out mask of
  :class:`saelib.experiments.matryoshka_probes.SplitTermMask` (the probes of Nabeshima's hypothesis live in
  :mod:`saelib.experiments.matryoshka_probes`).

Different instances may use different configs (:class:`PerInstanceMatryoshka`), so that many
variants train side by side in one batched run.

How the loss is computed. ``method="loop"`` is the reference: one decode per chosen prefix, per
instance, written as the definition reads. The other methods give the same value and gradients
at a lower cost: ``"gram"`` (every prefix's error from cumulative sums over a decoder Gram
matrix), ``"blocks"`` (one decode split into blocks at the chosen lengths) and ``"sparse"``
(a quadratic form over the active latents only; see :func:`_sparse_loss`). ``method="auto"``
picks one by the rule in :func:`_auto_method`, the only place such a rule is written. Gradient
routing (``inner_grad_scale``) is added to any of the three the same way (see
:func:`matryoshka_loss`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Bool, Float, Int, Int64
from torch import Tensor

__all__ = [
    "MatryoshkaConfig",
    "prefix_weights",
    "PerInstanceMatryoshka",
    "batched_prefix_weights",
    "expected_prefix_weights",
    "latent_weights",
    "previous_prefix",
    "LossMethod",
    "matryoshka_loss",
]

PrefixMode = Literal["fixed", "random", "every"]
LossMethod = Literal["auto", "loop", "gram", "blocks", "sparse"]


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
        on how many instances there are (:class:`saelib.core.train.TrainConfig` ``independent_instances``).

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
    :func:`saelib.experiments.matryoshka_probes.prefix_term_gradient`."""
    g = torch.Generator().manual_seed(seed)
    return prefix_weights(cfg, d_sae, n_draws, g).mean(0)



# ---------------------------------------------------------------------- weights of latents
def _tail_weights(weights: Float[Tensor, "inst d_sae"]) -> Float[Tensor, "inst d_sae"]:
    """``T_j = sum_{m > j} w_m``: the total weight of the prefixes that contain latent ``j``
    (column ``j``; non-increasing in ``j``; column 0 is the total weight ``W``)."""
    return weights.flip(-1).cumsum(-1).flip(-1)


def latent_weights(
    weights: Float[Tensor, "inst d_sae"], inner_grad_scale: Float[Tensor, " inst"] | None = None
) -> Float[Tensor, "inst d_sae"]:
    """Fraction (by weight) of prefixes that contain each latent: the tail weight
    ``T_j = sum_{m > j} w_m``.

    With ``inner_grad_scale`` ``γ`` (see :func:`matryoshka_loss`) the sparsity penalty is
    routed like the reconstruction: prefix ``m`` penalises its own block at full weight and the
    inner latents at ``γ``, so latent ``j`` gets ``w_h + γ (T_j - w_h)`` where ``h`` is the
    smallest chosen prefix containing it (its block). As in Chanin et al.'s ``use_delta_loss``,
    where each prefix's L1 covers only its new block.
    """
    tail = _tail_weights(weights)
    if inner_grad_scale is None:
        return tail
    w_home = weights.gather(-1, _home_prefix(weights))
    gamma = inner_grad_scale.to(weights)[:, None]
    return w_home + gamma * (tail - w_home)


def previous_prefix(weights: Float[Tensor, "inst d_sae"]) -> Int[Tensor, "inst d_sae"]:
    """For every length ``m`` (column ``m - 1``), the largest chosen length ``< m`` (0 if none).

    A length is chosen when its weight is > 0. The latents ``[prev(m), m)`` are the block that
    prefix ``m`` adds; latents ``< prev(m)`` belong to smaller chosen prefixes ("inner").
    """
    d_sae = weights.shape[-1]
    lengths = torch.arange(1, d_sae + 1, device=weights.device).expand_as(weights) * (weights > 0)  # 0 where not chosen
    upto = lengths.cummax(dim=-1).values  # largest chosen length <= m
    return torch.cat([torch.zeros_like(upto[:, :1]), upto[:, :-1]], dim=-1)


def _home_prefix(weights: Float[Tensor, "inst d_sae"]) -> Int[Tensor, "inst d_sae"]:
    """Column of the smallest chosen prefix that contains each latent (its block)."""
    d_sae = weights.shape[-1]
    cols = torch.arange(d_sae, device=weights.device).expand_as(weights)
    chosen_col = torch.where(weights > 0, cols, torch.full_like(cols, d_sae))
    return chosen_col.flip(-1).cummin(-1).values.flip(-1).clamp_max(d_sae - 1)


# ---------------------------------------------------------------------- the loss
def matryoshka_loss(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    weights: Float[Tensor, "inst d_sae"],
    inner_grad_scale: Float[Tensor, " inst"] | None = None,
    keep: Float[Tensor, "batch inst d_sae"] | None = None,
    method: LossMethod = "auto",
) -> Float[Tensor, " inst"]:
    """The Matryoshka reconstruction loss per instance:
    ``sum_m w_m mean_batch(keep[b, m] · ||x - acts[:, :m] @ W_dec[:m] - b_dec||²)``.

    Args:
        x: reconstruction targets (squared error summed over ``d_in``, so the unit is that of
            ``x`` squared).
        acts: latent activations.
        W_dec, b_dec: decoder rows and bias.
        weights: ``weights[i, m - 1]`` is the weight of prefix length ``m`` for instance ``i``
            (>= 0; :func:`prefix_weights`); lengths with weight 0 cost nothing.
        inner_grad_scale: ``γ`` per instance, in ``[0, 1]``: the gradient of prefix ``m``'s
            error reaching latents ``< prev(m)`` (:func:`previous_prefix`) is multiplied by
            ``γ``; its block ``[prev(m), m)``, ``b_dec`` and ``x`` get the full gradient. The
            value never depends on ``γ``. None means 1 everywhere.
        keep: weight of each ``(sample, prefix)`` term (1 keeps, 0 drops it; the batch mean
            still divides by the full batch). None keeps every term.
        method: ``"loop"``, the reference (one decode per chosen prefix and instance, as the
            formula reads; for tests and small problems); ``"gram"``, every prefix's error from
            cumulative sums over the decoder Gram matrix, ``O(batch · inst · d_sae · (d_in +
            d_sae))``; ``"blocks"``, one decode split into blocks at the chosen lengths plus a
            cumulative sum, ``O(batch · inst · n_chosen · d_in)`` memory; ``"sparse"``, a
            quadratic form over the active latents only, ``O(batch · inst · L0 · (L0 +
            d_in))`` with ``L0`` the largest row L0 (exact gradients for ReLU / TopK /
            BatchTopK; see :func:`_sparse_loss`); ``"auto"`` (default): the rule of
            :func:`_auto_method`. Every method gives the same value and gradients up to float
            rounding. Routed instances (``γ != 1``) add to the value path a surrogate whose
            gradient is the routed one (:func:`_block_only_surrogate`), or, where ``keep``
            drops terms of a routed instance, decode its prefixes explicitly
            (:func:`_routed_errors`).

    Returns:
        ``[inst]`` loss.

    Raises:
        ValueError: mismatched shapes; an unknown ``method``; ``method="sparse"`` with ``keep``;
            negative weights (``"sparse"``).

    Sources: Nabeshima 2024 (random prefixes, stop-gradient question); Bussmann et al. 2025
    (fixed groups); Chanin et al. 2025 (inner-loss weight, delta loss); the every-prefix loss
    wished for in Nabeshima's comments.
    """
    _check_shapes(x, acts, W_dec, b_dec, weights, inner_grad_scale, keep)
    if method == "auto":
        method = _auto_method(x, acts, weights, keep)
    if method == "loop":
        return _loop_loss(x, acts, W_dec, b_dec, weights, inner_grad_scale, keep)
    if method not in ("gram", "blocks", "sparse"):
        raise ValueError(f"method must be one of 'auto', 'loop', 'gram', 'blocks', 'sparse', got {method!r}")
    loss = _fast_loss(method, x, acts, W_dec, b_dec, weights, None if keep is None else keep.to(acts.dtype))
    if inner_grad_scale is None:
        return loss
    routed = (inner_grad_scale != 1).nonzero().flatten()
    if len(routed) == 0:
        return loss
    # routed instances that drop no term take the cheap surrogate, the others explicit decodes
    whole = None if keep is None else keep[:, routed].eq(1).all(dim=2).all(dim=0)
    r = routed if whole is None else routed[whole]
    if len(r):
        gamma = inner_grad_scale[r].to(loss)
        sur = _block_only_surrogate(x[:, r], acts[:, r], W_dec[r], b_dec[r], weights[r])
        loss = loss.index_copy(0, r, gamma * loss[r] + (1 - gamma) * (loss[r].detach() + sur - sur.detach()))
    if whole is not None:
        r = routed[~whole]
        if len(r):
            dense = _routed_errors(x[:, r], acts[:, r], W_dec[r], b_dec[r], weights[r], inner_grad_scale[r])
            loss = loss.index_copy(0, r, ((dense * keep[:, r]).mean(0) * weights[r]).sum(-1))
    return loss


# the dense Gram path costs batch · inst · d_sae² multiply-adds: "auto" takes it below this many,
# or when d_sae <= d_in (then it costs at most one more encoder-sized product)
_DENSE_PREFIX_LIMIT = 2**23


def _auto_method(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    weights: Float[Tensor, "inst d_sae"],
    keep: Tensor | None,
) -> str:
    """The method ``matryoshka_loss(method="auto")`` uses; the one place this choice is made.

    1. ``keep`` given: ``"gram"`` (per-term errors of every prefix; the sparse form cannot
       weight single terms).
    2. ``batch · inst · d_sae² <= _DENSE_PREFIX_LIMIT`` (2**23) or ``d_sae <= d_in``: ``"gram"``.
    3. the largest row L0 of ``acts`` is below the number of chosen lengths (e.g. ``"every"``
       prefix on a wide TopK SAE): ``"sparse"``.
    4. otherwise ``"blocks"``.

    Step 3 reads the L0 off ``acts`` (one host sync).
    """
    if keep is not None:
        return "gram"
    if acts.numel() * acts.shape[-1] <= _DENSE_PREFIX_LIMIT or acts.shape[-1] <= x.shape[-1]:
        return "gram"
    n_chosen = len(torch.nonzero(weights.sum(0) > 0))
    if int((acts != 0).sum(-1).max()) < n_chosen:
        return "sparse"
    return "blocks"


def _check_shapes(
    x: Tensor, acts: Tensor, W_dec: Tensor, b_dec: Tensor, weights: Tensor,
    inner_grad_scale: Tensor | None, keep: Tensor | None,
) -> None:
    """Raise ValueError unless the arguments of :func:`matryoshka_loss` agree in shape."""
    if x.ndim != 3 or acts.ndim != 3 or x.shape[:2] != acts.shape[:2]:
        raise ValueError(
            f"x [batch, inst, d_in] and acts [batch, inst, d_sae] must share batch and inst, got "
            f"{tuple(x.shape)} and {tuple(acts.shape)}"
        )
    batch, inst, d_sae = acts.shape
    d_in = x.shape[-1]
    if W_dec.shape != (inst, d_sae, d_in) or b_dec.shape != (inst, d_in):
        raise ValueError(
            f"W_dec must be {(inst, d_sae, d_in)} and b_dec {(inst, d_in)}, got "
            f"{tuple(W_dec.shape)} and {tuple(b_dec.shape)}"
        )
    if weights.shape != (inst, d_sae):
        raise ValueError(f"weights must be {(inst, d_sae)}, got {tuple(weights.shape)}")
    if inner_grad_scale is not None and inner_grad_scale.shape != (inst,):
        raise ValueError(f"inner_grad_scale must be {(inst,)}, got {tuple(inner_grad_scale.shape)}")
    if keep is not None and keep.shape != acts.shape:
        raise ValueError(f"keep must have shape {tuple(acts.shape)}, got {tuple(keep.shape)}")


def _loop_loss(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    weights: Float[Tensor, "inst d_sae"],
    inner_grad_scale: Float[Tensor, " inst"] | None,
    keep: Float[Tensor, "batch inst d_sae"] | None,
) -> Float[Tensor, " inst"]:
    """The reference: the definition of :func:`matryoshka_loss`, one decode per chosen prefix of
    every instance. Routing keeps the forward value of the inner part ``I`` and scales its
    gradient: ``sg(I) + γ (I - sg(I))``."""
    batch, inst, d_sae = acts.shape
    prev = previous_prefix(weights)
    out = []
    for i in range(inst):
        gamma = 1.0 if inner_grad_scale is None else inner_grad_scale[i].to(acts.dtype)
        total = x.new_zeros(())
        for m in range(1, d_sae + 1):
            if not weights[i, m - 1] > 0:
                continue
            p = int(prev[i, m - 1])
            inner = acts[:, i, :p] @ W_dec[i, :p]  # [batch, d_in]
            inner = inner.detach() + gamma * (inner - inner.detach())
            block = acts[:, i, p:m] @ W_dec[i, p:m]
            err = (x[:, i] - b_dec[i] - inner - block).pow(2).sum(-1)  # [batch]
            if keep is not None:
                err = err * keep[:, i, m - 1].to(err.dtype)
            total = total + weights[i, m - 1] * err.mean()
        out.append(total)
    return torch.stack(out)


def _fast_loss(
    method: str,
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    weights: Float[Tensor, "inst d_sae"],
    keep: Float[Tensor, "batch inst d_sae"] | None = None,
) -> Float[Tensor, " inst"]:
    """The loss of every term by one of the fast methods (no routing); with ``keep``, each
    (sample, prefix) term weighted by it (``"gram"`` or ``"blocks"`` only)."""
    if method == "sparse":
        if keep is not None:
            raise ValueError("method='sparse' cannot weight single (sample, prefix) terms: use 'gram', 'blocks' or 'loop' with keep")
        return _sparse_loss(x, acts, W_dec, b_dec, weights)
    if method == "gram":
        errs = _gram_errors(x, acts, W_dec, b_dec)  # [batch, inst, d_sae]
        if keep is not None:
            errs = errs * keep
        return (errs.mean(0) * weights).sum(-1)
    ends = torch.nonzero(weights.sum(0) > 0).flatten() + 1
    errs = _block_errors(x, acts, W_dec, b_dec, ends)  # [batch, inst, n_ends]
    if keep is not None:
        errs = errs * keep[:, :, ends - 1]
    return (errs.mean(0) * weights[:, ends - 1]).sum(-1)


# ---------------------------------------------------------------------- fast paths: dense
def _block_errors(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    ends: Int64[Tensor, " n_ends"],
) -> Float[Tensor, "batch inst n_ends"]:
    """Squared error ``||x - acts[:, :m] @ W_dec[:m] - b_dec||²`` for each length ``m`` in ``ends``
    (sorted, in ``[1, d_sae]``): one decode split into blocks at ``ends``, plus a cumulative sum
    over the blocks."""
    bounds = [0] + [int(e) for e in ends]
    block_out = [
        torch.einsum("bis,isd->bid", acts[..., s:e], W_dec[:, s:e]) for s, e in zip(bounds[:-1], bounds[1:])
    ]
    recon = torch.stack(block_out, dim=2).cumsum(dim=2) + b_dec[None, :, None, :]  # [b, i, K, d]
    return (x[:, :, None, :] - recon).pow(2).sum(-1)


def _gram_errors(
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


# ---------------------------------------------------------------------- fast paths: routing
def _routed_errors(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    weights: Float[Tensor, "inst d_sae"],
    inner_grad_scale: Float[Tensor, " inst"],
) -> Float[Tensor, "batch inst d_sae"]:
    """Every prefix's squared error (as :func:`_gram_errors`), with the gradient that error
    ``m`` sends into latents ``< prev(m)`` (see :func:`previous_prefix`) multiplied by
    ``inner_grad_scale``; latents ``[prev(m), m)``, ``b_dec`` and ``x`` get the full gradient.

    Cost: one ``[batch, inst, d_sae, d_in]`` tensor of per-latent contributions (decodes every
    prefix explicitly); used only where ``keep`` drops terms of a routed instance.
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
    tail = _tail_weights(weights)  # [i, s]
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


# ---------------------------------------------------------------------- fast path: sparse
def _active_latents(
    acts: Float[Tensor, "batch inst d_sae"],
) -> tuple[Int64[Tensor, "batch inst n_active"], Float[Tensor, "batch inst n_active"]]:
    """Positions and values of the nonzero activations of every ``(sample, instance)`` row.

    ``n_active`` is the largest number of nonzeros in any row; shorter rows are padded with
    position 0 and value exactly 0 (not connected to ``acts`` in the autograd graph). Values are
    differentiable with respect to ``acts``. Positions within a row are ascending.

    Raises ValueError if ``acts`` is not 3-dimensional.
    """
    if acts.ndim != 3:
        raise ValueError(f"acts must be [batch, inst, d_sae], got shape {tuple(acts.shape)}")
    batch, inst, d_sae = acts.shape
    flat = acts.reshape(batch * inst, d_sae)  # [rows, d_sae]
    row, col = (flat.detach() != 0).nonzero(as_tuple=True)  # row-major, so col ascends per row
    counts = torch.bincount(row, minlength=batch * inst)
    n_active = int(counts.max()) if counts.numel() else 0
    slot = torch.arange(len(row), device=acts.device) - (counts.cumsum(0) - counts)[row]  # rank within its row
    idx = torch.zeros(batch * inst, n_active, dtype=torch.long, device=acts.device)
    idx[row, slot] = col
    vals = flat.new_zeros(batch * inst, n_active).index_put((row, slot), flat[row, col])
    return idx.view(batch, inst, n_active), vals.view(batch, inst, n_active)


# rows of U gathered at once: about 2**20 floats (4 MB), so each chunk stays in cache
_CHUNK_ELEMENTS = 2**20


class _GatheredGram(torch.autograd.Function):
    """``G[r] = U_r U_rᵀ`` with ``U_r = table[index[r]]``, computed chunk by chunk.

    Gathering all rows at once would materialise ``[rows, n, d]`` (and its gradient), which is
    slower than the arithmetic on CPU; chunks keep both in cache. Backward recomputes each chunk
    and scatters ``(dG + dGᵀ) U`` into the table with ``index_add_`` (deterministic on CPU).
    """

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(table, index)
        rows, n = index.shape
        ctx.chunk = chunk = max(1, _CHUNK_ELEMENTS // (n * table.shape[1]))
        gram = table.new_empty(rows, n, n)
        for start in range(0, rows, chunk):
            idx = index[start : start + chunk]
            U = table.index_select(0, idx.reshape(-1)).view(*idx.shape, -1)  # [chunk, n, d]
            torch.bmm(U, U.transpose(1, 2), out=gram[start : start + chunk])
        return gram

    @staticmethod
    def backward(ctx, d_gram: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        table, index = ctx.saved_tensors
        d_table = torch.zeros_like(table)
        for start in range(0, index.shape[0], ctx.chunk):
            idx = index[start : start + ctx.chunk]
            g = d_gram[start : start + ctx.chunk]
            U = table.index_select(0, idx.reshape(-1)).view(*idx.shape, -1)
            d_U = torch.bmm(g + g.transpose(1, 2), U)  # [chunk, n, d]
            d_table.index_add_(0, idx.reshape(-1), d_U.reshape(-1, table.shape[1]))
        return d_table, None


def _sparse_loss(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    weights: Float[Tensor, "inst d_sae"],
) -> Float[Tensor, " inst"]:
    """Per instance, ``mean_batch sum_m w_m ||x - acts[..., :m] @ W_dec[:m] - b_dec||²``, exactly,
    at a cost set by the active latents only (``method="sparse"`` of :func:`matryoshka_loss`).

    Why it is cheap. Write ``e = x - b_dec``, ``u_j`` for decoder row ``j``, ``a_j`` for its
    activation and ``T_j`` for its tail weight (:func:`_tail_weights`). Expanding every prefix's
    squared error and collecting terms::

        sum_m w_m ||e - sum_{j < m} a_j u_j||²
            = W ||e||² - 2 sum_j T_j a_j <e, u_j> + sum_{j,k} min(T_j, T_k) a_j a_k <u_j, u_k>

    with ``W = sum_m w_m`` (a pair of latents shares exactly the prefixes that contain the later
    one, whose tail weight is the smaller). Only latents with ``a_j != 0`` appear, in any order.
    Adding ``e`` as an extra row ``u_* = e`` with coefficient ``a_* = -1`` and tail weight ``W``
    turns the whole sum into one quadratic form ``a'ᵀ (M ∘ U Uᵀ) a'`` over the ``n_active + 1``
    rows, with ``M_jk = min(T'_j, T'_k)``: ``O(batch · inst · n_active · (n_active + d_in))`` time
    and ``O(batch · inst · n_active · d_in)`` memory, where ``n_active`` is the largest row L0 of
    ``acts``: cheap for TopK / BatchTopK and trained ReLU SAEs, costly for a dense ReLU SAE early in
    training.

    Gradients are exact with respect to ``x``, ``b_dec``, ``W_dec`` and the *nonzero* activations;
    the gradient with respect to a zero activation is reported as 0. ReLU, TopK and BatchTopK pass
    no gradient through a zero activation, so gradients reaching the encoder are exact for them (an
    activation whose backward uses the gradient at inactive latents, such as JumpReLU's threshold
    estimator, would need ``method="gram"``).

    Raises ValueError on negative weights (shapes are checked by :func:`matryoshka_loss`).
    Source: the every-prefix Matryoshka loss wished for in Nabeshima's comments (block size 1).
    """
    batch, inst, d_sae = acts.shape
    d_in = x.shape[-1]
    weights = weights.to(W_dec.dtype)
    if (weights < 0).any():
        raise ValueError(f"prefix weights must be >= 0, got minimum {weights.min().item()}")

    rows = batch * inst
    idx, vals = _active_latents(acts)  # [batch, inst, L]
    n_active = idx.shape[-1]
    tail = _tail_weights(weights)  # T_j = sum_{m > j} w_m, [inst, d_sae]
    total = tail[:, 0]  # W = sum_m w_m, [inst]

    # One table holds every decoder row and every centred input; row r of the quadratic form
    # gathers e (coefficient -1, tail weight W) followed by the active decoder rows.
    e = (x - b_dec).reshape(rows, d_in)  # [rows, d_in]
    table = torch.cat([W_dec.reshape(inst * d_sae, d_in), e])  # [inst*d_sae + rows, d_in]
    inst_offset = (torch.arange(inst, device=acts.device) * d_sae).view(1, inst, 1)
    lat_rows = (idx + inst_offset).reshape(rows, n_active)
    e_rows = torch.arange(inst * d_sae, inst * d_sae + rows, device=acts.device).unsqueeze(1)
    index = torch.cat([e_rows, lat_rows], 1)  # [rows, L+1] rows of the table

    coef = torch.cat([-vals.new_ones(rows, 1), vals.reshape(rows, n_active)], 1)  # [rows, L+1]
    T = torch.cat(
        [total.repeat(batch).unsqueeze(1), tail.reshape(-1)[lat_rows]], 1
    )  # [rows, L+1], row r belongs to instance r % inst
    M = torch.minimum(T.unsqueeze(2), T.unsqueeze(1))  # [rows, L+1, L+1]
    gram = _GatheredGram.apply(table, index)  # [rows, L+1, L+1] inner products
    per_row = ((coef.unsqueeze(2) * coef.unsqueeze(1)) * M * gram).sum((-1, -2))  # [rows]
    return per_row.view(batch, inst).mean(0)
