"""Toy data: hierarchies of parent/child features embedded in a low-dimensional space.

A hierarchy is written as a plain spec of :class:`FeatureNode` trees inside a
:class:`HierarchySpec`. :class:`ToyHierarchy` validates the spec, draws the feature
directions and samples activations, deterministically from a seed.

Sampling rules (following Nabeshima 2024, ``noanabeshima/matryoshka-saes``, ``toy_model.py``):

* a root fires with probability ``p`` independently of everything else;
* a child can only fire when its parent fires. With ``exclusive_children=False`` each child
  then fires independently with its own ``p``; with ``exclusive_children=True`` at most one
  child fires, child ``i`` with probability ``p_i`` and none with probability ``1 - sum(p_i)``
  (Nabeshima's non-read-out "none" option);
* a firing feature takes its magnitude (a fixed value, or ``Uniform(lo, hi)`` per sample);
* the input is ``x = sum_i magnitude_i * f_i`` where ``f_i`` are the feature directions, whose
  norms are fixed per feature at ``1 + norm_jitter * N(0, 1)``.

Presets: :func:`nabeshima_tree` (the Matryoshka-SAE toy tree) and :func:`chanin_parent_children`
(Chanin's simplified 1-parent / 2-child hierarchy, LessWrong comment on Nabeshima 2024).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from ..core.normalisation import mean_norm_scale

__all__ = [
    "FeatureNode",
    "HierarchySpec",
    "ToyHierarchy",
    "nabeshima_tree",
    "chanin_parent_children",
    "chanin_absorption_order",
    "stacked_sampler",
]


@dataclass(frozen=True)
class FeatureNode:
    """One feature of a hierarchy, with its children.

    Attributes:
        p: firing probability. For a root: unconditional. For a child: conditional on the parent
            firing (with ``exclusive_children`` the parent's children share one categorical draw).
        magnitude: a fixed activation value, or ``(lo, hi)`` for ``Uniform(lo, hi)`` per sample.
        children: child features, which fire only when this feature fires.
        exclusive_children: if True at most one child fires per sample (probabilities must sum
            to at most 1; the rest is "no child").
        name: an optional label used in plots.
    """

    p: float
    magnitude: float | tuple[float, float] = 1.0
    children: tuple["FeatureNode", ...] = ()
    exclusive_children: bool = False
    name: str = ""


@dataclass(frozen=True)
class HierarchySpec:
    """A full toy setup: feature trees plus how they are embedded.

    Attributes:
        roots: the top-level feature trees (a singleton is a root with no children).
        d: dimension of the embedding space (``d_in`` of the SAE).
        directions: ``"orthonormal"`` (rows of a random orthonormal matrix, needs ``d >= n``) or
            ``"random"`` (independent Gaussian unit vectors, superposition when ``d < n``).
        norm_jitter: each feature direction's norm is ``1 + norm_jitter * N(0, 1)``, fixed per
            feature (Nabeshima: 0.05). Must be in ``[0, 0.5)``.
        seed: seed for the directions and jitter (sampling has its own generator).
    """

    roots: tuple[FeatureNode, ...]
    d: int
    directions: str = "orthonormal"
    norm_jitter: float = 0.0
    seed: int = 0


def _validate_node(node: FeatureNode, path: str) -> None:
    if not isinstance(node.p, (int, float)) or not (0.0 <= node.p <= 1.0) or math.isnan(node.p):
        raise ValueError(f"{path}.p must be a probability in [0, 1], got {node.p!r}")
    mag = node.magnitude
    if isinstance(mag, tuple):
        if len(mag) != 2 or not all(isinstance(m, (int, float)) for m in mag):
            raise ValueError(f"{path}.magnitude as a range must be (lo, hi), got {mag!r}")
        lo, hi = mag
        if not (0.0 <= lo <= hi) or not math.isfinite(hi) or hi == 0:
            raise ValueError(f"{path}.magnitude range must satisfy 0 <= lo <= hi < inf, hi > 0, got {mag!r}")
    elif not isinstance(mag, (int, float)) or not (mag > 0) or math.isinf(mag):
        raise ValueError(f"{path}.magnitude must be a positive finite number, got {mag!r}")
    if node.exclusive_children:
        total = sum(c.p for c in node.children)
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"{path}.children are mutually exclusive but their probabilities sum to "
                f"{total:.6g} > 1"
            )
    for i, child in enumerate(node.children):
        _validate_node(child, f"{path}.children[{i}]")


def _validate_spec(spec: HierarchySpec) -> None:
    if not spec.roots:
        raise ValueError("HierarchySpec.roots is empty: give at least one feature")
    for i, root in enumerate(spec.roots):
        _validate_node(root, f"roots[{i}]")
    if not isinstance(spec.d, int) or spec.d < 1:
        raise ValueError(f"HierarchySpec.d must be a positive int, got {spec.d!r}")
    if spec.directions not in ("orthonormal", "random"):
        raise ValueError(
            f"HierarchySpec.directions must be 'orthonormal' or 'random', got {spec.directions!r}"
        )
    if not (0.0 <= spec.norm_jitter < 0.5):
        raise ValueError(f"HierarchySpec.norm_jitter must be in [0, 0.5), got {spec.norm_jitter!r}")


@dataclass
class _FlatNode:
    node: FeatureNode
    parent: int  # index of the parent feature, -1 for a root
    depth: int
    children: list[int] = field(default_factory=list)


@dataclass
class _SamplingPlan:
    """See :meth:`ToyHierarchy._build_sampling_plan`."""

    n_rows: int
    fire_row: Tensor  # [n_features] long: the uniform row each feature's firing test reads
    lo: Tensor  # [n_features] float32: fires when lo <= u < hi (and its parent fires)
    hi: Tensor
    levels: list[tuple[Tensor, Tensor]]  # per depth >= 1: (features, their parents)
    magnitude: Tensor  # [n_features] float32 fixed magnitudes (0 where drawn)
    mag_nodes: Tensor  # [n_drawn] long: features whose magnitude is Uniform(lo, hi)
    mag_row: Tensor  # [n_drawn] long: their uniform rows
    mag_lo: Tensor  # [n_drawn] float32
    mag_span: Tensor  # [n_drawn] float32: hi - lo


class ToyHierarchy:
    """A validated, seeded toy hierarchy: feature directions, sampling and analytic statistics.

    Features are numbered depth-first (a parent, then its subtree), so a parent and its children
    form a contiguous block.

    Attributes:
        features: ``[n_features, d]`` feature directions (with their jittered norms).
        parent_index: ``[n_features]`` long, index of each feature's parent, -1 for roots.
        firing_prob: ``[n_features]`` unconditional probability that each feature fires.
        names: one label per feature ("P0", "P0.C1", "S3", ...).

    Raises:
        ValueError: on an invalid spec, naming the field and the bad value.
    """

    def __init__(self, spec: HierarchySpec):
        _validate_spec(spec)
        self.spec = spec
        self._flat: list[_FlatNode] = []
        for root in spec.roots:
            self._flatten(root, parent=-1, depth=0)
        n = len(self._flat)
        if spec.directions == "orthonormal" and spec.d < n:
            raise ValueError(
                f"directions='orthonormal' needs d >= n_features, got d={spec.d} < "
                f"n_features={n}; use directions='random' for superposition"
            )
        g = torch.Generator().manual_seed(spec.seed)
        if spec.directions == "orthonormal":
            q, r = torch.linalg.qr(torch.randn(spec.d, spec.d, generator=g, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r))  # unique QR: uniformly random orthogonal matrix
            dirs = q.T[:n]
        else:
            dirs = torch.randn(n, spec.d, generator=g, dtype=torch.float64)
            dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        norms = 1.0 + spec.norm_jitter * torch.randn(n, 1, generator=g, dtype=torch.float64)
        self.features: Float[Tensor, "n_features d"] = (dirs * norms).float()
        self.parent_index = torch.tensor([f.parent for f in self._flat], dtype=torch.long)
        self.firing_prob = torch.tensor(self._firing_probs(), dtype=torch.float64)
        self.names = self._names()
        self._sampling_plan = self._build_sampling_plan()

    # ------------------------------------------------------------------ structure
    def _flatten(self, node: FeatureNode, parent: int, depth: int) -> None:
        idx = len(self._flat)
        self._flat.append(_FlatNode(node, parent, depth))
        if parent >= 0:
            self._flat[parent].children.append(idx)
        for child in node.children:
            self._flatten(child, idx, depth + 1)

    def _build_sampling_plan(self) -> _SamplingPlan:
        """Index tensors that turn one ``torch.rand(n_rows, batch)`` into a batch of coefficients.

        The rows are the draws of this procedure, in order: for each feature in depth-first
        order, a root draws one uniform per sample (it fires when ``u < p``); a feature with
        independent children then draws one row per child (child fires when its parent fires
        and ``u < p_child``); one with exclusive children draws a single row (child ``k`` fires
        when its parent fires and ``u`` falls in ``[cumsum(p)[k-1], cumsum(p)[k])``, so at most
        one does, and none with probability ``1 - sum(p)``). Then each feature with a
        ``(lo, hi)`` magnitude draws one row (``lo + (hi - lo) * u``). Thresholds are float32,
        as the comparisons of a float32 uniform with them are.
        """
        n = self.n_features
        fire_row = [0] * n
        lo = [-math.inf] * n
        hi = [0.0] * n
        row = 0
        for i, f in enumerate(self._flat):
            if f.parent < 0:
                fire_row[i], hi[i] = row, f.node.p
                row += 1
            if f.node.exclusive_children and f.children:
                edges = torch.cumsum(torch.tensor([self._flat[c].node.p for c in f.children]), 0).tolist()
                for k, c in enumerate(f.children):
                    fire_row[c], lo[c], hi[c] = row, (edges[k - 1] if k else -math.inf), edges[k]
                row += 1
            else:
                for c in f.children:
                    fire_row[c], hi[c] = row, self._flat[c].node.p
                    row += 1
        mag_nodes = [i for i, f in enumerate(self._flat) if isinstance(f.node.magnitude, tuple)]
        ranges = [self._flat[i].node.magnitude for i in mag_nodes]
        depth = max(f.depth for f in self._flat)
        levels = []
        for d in range(1, depth + 1):
            nodes = [i for i, f in enumerate(self._flat) if f.depth == d]
            levels.append((torch.tensor(nodes), self.parent_index[nodes]))
        return _SamplingPlan(
            n_rows=row + len(mag_nodes),
            fire_row=torch.tensor(fire_row),
            lo=torch.tensor(lo, dtype=torch.float32),
            hi=torch.tensor(hi, dtype=torch.float32),
            levels=levels,
            magnitude=torch.tensor(
                [0.0 if isinstance(f.node.magnitude, tuple) else f.node.magnitude for f in self._flat],
                dtype=torch.float32,
            ),
            mag_nodes=torch.tensor(mag_nodes, dtype=torch.long),
            mag_row=torch.arange(row, row + len(mag_nodes)),
            mag_lo=torch.tensor([a for a, _ in ranges], dtype=torch.float32),
            mag_span=torch.tensor([b - a for a, b in ranges], dtype=torch.float32),
        )

    def _firing_probs(self) -> list[float]:
        probs: list[float] = []
        for f in self._flat:
            probs.append(f.node.p * (probs[f.parent] if f.parent >= 0 else 1.0))
        return probs

    def _names(self) -> list[str]:
        names: list[str] = []
        root_count = {"P": 0, "S": 0}
        for i, f in enumerate(self._flat):
            if f.node.name:
                names.append(f.node.name)
            elif f.parent < 0:
                kind = "P" if f.node.children else "S"
                names.append(f"{kind}{root_count[kind]}")
                root_count[kind] += 1
            else:
                pos = self._flat[f.parent].children.index(i)
                names.append(f"{names[f.parent]}.C{pos}")
        return names

    @property
    def n_features(self) -> int:
        return len(self._flat)

    @property
    def d(self) -> int:
        return self.spec.d

    def children_of(self, i: int) -> list[int]:
        """Indices of feature ``i``'s direct children."""
        return list(self._flat[i].children)

    def blocks(self) -> list[tuple[int, int]]:
        """``(start, stop)`` index ranges of each root's subtree with children (for heatmaps)."""
        out = []
        i = 0
        while i < self.n_features:
            stop = i + 1
            while stop < self.n_features and self._flat[stop].depth > 0:
                stop += 1
            if stop - i > 1:
                out.append((i, stop))
            i = stop
        return out

    def expected_l0(self) -> float:
        """Analytic E[number of active features per sample] = sum of unconditional firing probs."""
        return float(self.firing_prob.sum())

    def input_scale(self, n: int = 200_000, seed: int = 0) -> float:
        """Nabeshima's input normalisation as one constant: ``sqrt(d) / E||x||``, with ``E||x||``
        the mean norm of ``n`` samples drawn with ``seed`` (samples with no active feature count,
        with norm 0). Multiplying inputs by it gives them a mean norm of ``sqrt(d)``, the fixed
        point of his running normaliser (``RunningAvgNormalizer`` in noanabeshima/matryoshka-saes
        ``sae.py``: ``x * sqrt(d) / EMA(mean ||x||)``, EMA decay 0.99 per step), so his sparsity
        coefficients and target L0 apply in these units
        (:func:`saelib.core.normalisation.mean_norm_scale`). Raises ValueError if ``n < 1`` or
        every sample is zero."""
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        x, _ = self.sample(n, torch.Generator().manual_seed(seed))
        return mean_norm_scale(x)

    def second_moment(self) -> Float[Tensor, "n_features n_features"]:
        """Analytic E[c cᵀ] of the feature coefficients c (magnitudes included), float64."""
        n = self.n_features
        mean_mag = torch.zeros(n, dtype=torch.float64)
        mean_sq = torch.zeros(n, dtype=torch.float64)
        for i, f in enumerate(self._flat):
            m = f.node.magnitude
            if isinstance(m, tuple):
                lo, hi = m
                mean_mag[i] = (lo + hi) / 2
                mean_sq[i] = (lo * lo + lo * hi + hi * hi) / 3
            else:
                mean_mag[i] = m
                mean_sq[i] = m * m
        joint = torch.zeros(n, n, dtype=torch.float64)
        ancestors = [self._ancestors(i) for i in range(n)]
        for i in range(n):
            for j in range(n):
                joint[i, j] = self._joint_prob(i, j, ancestors)
        out = joint * mean_mag[:, None] * mean_mag[None, :]
        out.diagonal().copy_(joint.diagonal() * mean_sq)
        return out

    def _ancestors(self, i: int) -> list[int]:
        chain = [i]
        while self._flat[chain[-1]].parent >= 0:
            chain.append(self._flat[chain[-1]].parent)
        return chain  # i, parent, grandparent, ...

    def _joint_prob(self, i: int, j: int, ancestors: list[list[int]]) -> float:
        """P(feature i fires and feature j fires)."""
        if i == j:
            return float(self.firing_prob[i])
        ai, aj = ancestors[i], ancestors[j]
        if j in ai:
            return float(self.firing_prob[i])
        if i in aj:
            return float(self.firing_prob[j])
        common = [a for a in ai if a in aj]
        if not common:
            return float(self.firing_prob[i] * self.firing_prob[j])
        lca = common[0]
        # children of the lowest common ancestor on the two paths
        ci, cj = ai[ai.index(lca) - 1], aj[aj.index(lca) - 1]
        if self._flat[lca].node.exclusive_children:
            return 0.0
        p = float(self.firing_prob[lca])
        for path, c in ((ai, ci), (aj, cj)):
            for k in path[: path.index(c) + 1]:
                p *= self._flat[k].node.p
        return p

    # ------------------------------------------------------------------ sampling
    def sample_coefficients(
        self, batch: int, generator: torch.Generator
    ) -> Float[Tensor, "batch n_features"]:
        """Draw feature coefficients (0 when a feature is off, its magnitude when it fires).

        Raises TypeError if ``batch`` is not an int, ValueError if it is negative.
        """
        try:
            batch = operator.index(batch)  # ints, numpy ints; not floats
        except TypeError:
            raise TypeError(f"batch (the number of samples) must be an int, got {batch!r}") from None
        if batch < 0:
            raise ValueError(f"batch (the number of samples) must be >= 0, got {batch}")
        plan = self._sampling_plan
        # every uniform the tree needs, in one call: row r is the r-th batch of draws of the
        # rule-by-rule procedure in _build_sampling_plan's docstring (the CPU generator fills a
        # tensor in order, so this equals those calls made one after another)
        u = torch.rand(plan.n_rows, batch, generator=generator)
        v = u[plan.fire_row]  # [n_features, batch]
        fires = (v >= plan.lo[:, None]) & (v < plan.hi[:, None])
        for nodes, parents in plan.levels:  # a child fires only where its parent fires
            fires[nodes] &= fires[parents]
        mags = plan.magnitude[:, None].expand(-1, batch).clone()
        if len(plan.mag_nodes):
            mags[plan.mag_nodes] = plan.mag_lo[:, None] + plan.mag_span[:, None] * u[plan.mag_row]
        return (fires.float() * mags).T.contiguous()

    def sample(
        self, batch: int, generator: torch.Generator
    ) -> tuple[Float[Tensor, "batch d"], Float[Tensor, "batch n_features"]]:
        """Draw ``(x, coefficients)``: inputs ``x = coefficients @ features``.

        Raises TypeError / ValueError as :meth:`sample_coefficients` for a bad ``batch``.
        """
        coeffs = self.sample_coefficients(batch, generator)
        return coeffs @ self.features, coeffs


# ---------------------------------------------------------------------- presets
def nabeshima_tree(
    d: int = 20,
    norm_jitter: float = 0.05,
    seed: int = 0,
    p_parent: float = 0.15,
    p_child: float = 0.2,
    p_singleton: float = 0.05,
    directions: str = "orthonormal",
) -> ToyHierarchy:
    """Nabeshima's Matryoshka toy tree (``tree.json`` in noanabeshima/matryoshka-saes).

    3 parents (p = 0.15) with 3 mutually exclusive children each (p = 0.2 given the parent, plus a
    "none" option at 0.4), and 8 independent singletons (p = 0.05): 20 features, magnitude 1,
    orthonormal directions in ``d`` = 20 dimensions. E[L0] = 3·0.15·1.6 + 8·0.05 = 1.12.
    The probabilities and embedding are parameters so widgets can vary them; ``d < 20`` with
    ``directions="random"`` gives a superposition variant.
    """
    parents = tuple(
        FeatureNode(p_parent, children=tuple(FeatureNode(p_child) for _ in range(3)), exclusive_children=True)
        for _ in range(3)
    )
    singletons = tuple(FeatureNode(p_singleton) for _ in range(8))
    spec = HierarchySpec(parents + singletons, d=d, directions=directions, norm_jitter=norm_jitter, seed=seed)
    return ToyHierarchy(spec)


def chanin_parent_children(
    p_parent: float = 0.25,
    p_child: float = 0.2,
    n_children: int = 2,
    exclusive: bool = True,
    d: int = 20,
    seed: int = 0,
) -> ToyHierarchy:
    """Chanin's simplified hierarchy (comment on Nabeshima 2024; Chanin et al. 2025, arXiv 2505.11756).

    One parent with ``n_children`` children that fire only with the parent (``p_child`` each,
    conditional on the parent), all magnitude 1, orthonormal in ``d`` dimensions. The thread says
    only "higher than the original post"; we choose p_parent = 0.25 and p_child = 0.2.
    """
    children = tuple(FeatureNode(p_child) for _ in range(n_children))
    root = FeatureNode(p_parent, children=children, exclusive_children=exclusive)
    return ToyHierarchy(HierarchySpec((root,), d=d, seed=seed))


def chanin_absorption_order(d: int = 20, seed: int = 0) -> ToyHierarchy:
    """Chanin's absorption-order case: parent p = 0.3 magnitude 2 (E[‖x‖²] share 1.2), one child
    p = 0.15 overall (0.5 given the parent) magnitude 10 (share 15.0). Source: Chanin's comment on Nabeshima 2024
    (REFERENCES.md)."""
    root = FeatureNode(0.3, magnitude=2.0, children=(FeatureNode(0.5, magnitude=10.0),))
    return ToyHierarchy(HierarchySpec((root,), d=d, seed=seed))


def instance_samplers(hierarchies: list[ToyHierarchy]) -> list:
    """One data function per instance, ``(batch, generator) -> x`` of shape ``[batch, d]`` drawing
    from ``hierarchies[i]``: the data source of :func:`saelib.core.train.train_sae` for a sweep of
    a data parameter with ``TrainConfig.independent_instances`` (each instance its own stream).

    Raises ValueError if the hierarchies differ in ``d`` or the list is empty.
    """
    dims = {h.d for h in hierarchies}
    if len(dims) != 1:
        raise ValueError(f"all hierarchies must share d, got {sorted(dims)}")
    return [lambda batch, generator, h=h: h.sample(batch, generator)[0] for h in hierarchies]


def stacked_sampler(hierarchies: list[ToyHierarchy]):
    """A data source for :func:`saelib.core.train.train_sae` giving instance ``i`` samples of
    ``hierarchies[i]``: ``(batch, generator) -> x`` of shape ``[batch, inst, d]``.

    Lets one batched training run sweep a data parameter (e.g. the child probability): the
    instances draw in turn from one generator (for one stream per instance see
    :func:`instance_samplers`). Raises ValueError if the hierarchies differ in ``d``.
    """
    samplers = instance_samplers(hierarchies)

    def sample(batch: int, generator: torch.Generator) -> Tensor:
        return torch.stack([f(batch, generator) for f in samplers], dim=1)

    return sample
