"""Feature trees across SAE widths: masked cosine similarity (MCS) between the latents of two SAEs,
the parent -> child DAG it induces, its best-parent tree, and a tree drawing.

**Directed MCS** (Nabeshima 2024, LessWrong "Matryoshka Sparse Autoencoders", tree methodology):
for a latent ``A`` of a narrower SAE and ``B`` of a wider one, the cosine similarity of their
activation vectors over the tokens where ``B`` is active, times ``max(B) / max(A)``; an edge
``A -> B`` is kept when the score is at least 0.6. From a parent in S/1 the children are found in
S/2, then theirs in S/3. A latent may pass the threshold with several parents, so the result is a
DAG; it is drawn as a tree by keeping each latent's best-scoring parent.

**Symmetric MCS** ("Towards Monosemanticity", Bricken et al. 2023): the larger of the two
cosines restricted to the tokens where ``A`` is active and where ``B`` is active, without the
scale factor.

Both are computed for every pair of latents at once from three matrix products over tokens
(no loop over pairs): with ``M_B = [B > 0]``,
``cos_B[i, j] = (A^T B)[i, j] / (sqrt((A^2)^T M_B)[i, j] * ||B_j||)``. Activations must be
non-negative (ReLU / TopK latents). Their scale matters for the factor ``max(B)/max(A)``: pass
activations multiplied by the decoder-row norms when the decoders are not unit-norm.

Graph nodes are ``(level, latent)`` pairs (level 0 = narrowest SAE) with attributes ``level``,
``latent``, ``label``, ``max_act``, ``frequency``; edges carry ``score`` (the MCS used),
``directed``/``symmetric`` (both scores), ``cosine`` (the directed score without the factor
``max(B)/max(A)``), ``outside`` (fraction of the child's active tokens on
which the parent is silent) and ``outside_mass`` (the same, weighted by the child's activation).
A child firing where its parent does not is a candidate absorption case (Chanin et al. 2024,
"A is for Absorption", arXiv 2409.14507).

**Minimum support** (this project's addition; Nabeshima's method has none). The directed cosine is
taken over the child's tokens only, so a child ``B`` that fires on one token has cosine 1 with
*every* latent active on that token, and on two tokens nearly so: such a child links to many
unrelated parents. ``min_support=N`` (:func:`directed_mcs`, :func:`build_feature_dag`) counts a
link ``A -> B`` only when ``B`` is active on at least ``N`` tokens; :func:`build_feature_dag`
records how many links the floor removes. How to choose ``N``: by Cauchy-Schwarz the cosine is at
most ``sqrt(s)``, ``s`` the share of ``B``'s squared activation on the tokens where ``A`` also
fires, so a cosine of 0.6 needs ``A`` under at least 36 % of ``B``'s activation. For a parent
unrelated to ``B``, active on a fraction ``p`` of tokens, and ``B`` with alike activations on ``n``
tokens, that share is ``k / n`` with ``k`` ~ Binomial(n, p): mean ``p``, spread ``sqrt(p (1 - p) /
n) <= 1 / (2 sqrt(n))``. At ``n = 1`` a chance link has probability ``p`` (every latent active on
the token links); 0.36 lies ``z`` spreads above ``p`` once ``n >= (z / (2 (0.36 - p)))^2``, i.e.
``n >= 21`` for ``z = 3`` and ``p = 0.03`` (a typical density, L0 / d_sae = 32 / 1152). Uneven
activations make chance links somewhat likelier than that, and there are ``d_a · d_b`` pairs
(millions). Measured on independent random latents (parents of density ``p``, children with
activations uniform in [0.5, 1], 120,000 pairs): a chance score >= 0.6 for 2.4 % of pairs at
``n = 1`` (``p = 0.03``), 2e-4 at ``n = 10``, none at ``n = 20``; for denser parents at ``n = 20``,
about 1e-5 (``p = 0.05``) and 6e-4 (``p = 0.1``), at ``n = 30`` none and 3e-5. :data:`MIN_SUPPORT`
= 20 is the recommended floor (30 where dense parents matter): it costs little, since a latent active
on fewer than 20 of some 10^5 held-out tokens (density < 2e-4) is too rare to place in a tree
anyway. The floor counts tokens, not activation mass: a child whose activation sits on one or two
of its tokens can still pass by chance, and a parent that fires almost everywhere is not filtered
(the factor ``max(B)/max(A)`` is a separate matter).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch
from jaxtyping import Float
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from ..core.metrics import active
from .bootstrap import ConfidenceInterval, bootstrap_ci

__all__ = [
    "MCS_THRESHOLD",
    "MIN_SUPPORT",
    "LinkSummary",
    "link_summary",
    "directed_mcs",
    "symmetric_mcs",
    "fraction_outside",
    "build_feature_dag",
    "descendants_dag",
    "best_parent_tree",
    "multi_parent_latents",
    "absorption_candidates",
    "longest_chain",
    "descendants_at_level",
    "duplicate_groups",
    "top_token_labels",
    "tree_layout",
    "draw_feature_tree",
    "draw_subtree",
    "plot_mcs_comparison",
]

#: Nabeshima's threshold on directed MCS.
MCS_THRESHOLD = 0.6
#: Recommended minimum support: a child latent must fire on at least this many tokens for a link to
#: count (see the module docstring for why 20).
MIN_SUPPORT = 20

Node = tuple[int, int]


# ---------------------------------------------------------------------------- pairwise scores
_CHECK_ROWS = 8192  # rows per chunk of the input checks


def _check_pair(acts_a: Tensor, acts_b: Tensor) -> None:
    if acts_a.ndim != 2 or acts_b.ndim != 2:
        raise ValueError(f"activations must be [n_tokens, d_sae], got {tuple(acts_a.shape)} and {tuple(acts_b.shape)}")
    if acts_a.shape[0] != acts_b.shape[0]:
        raise ValueError(f"both SAEs must be evaluated on the same tokens, got {acts_a.shape[0]} and {acts_b.shape[0]}")
    if acts_a.shape[0] == 0:
        raise ValueError(f"need activations on at least one token, got n_tokens=0 (shapes {tuple(acts_a.shape)} and {tuple(acts_b.shape)})")
    for name, t in (("acts_a", acts_a), ("acts_b", acts_b)):
        for start in range(0, t.shape[0], _CHECK_ROWS):  # in row chunks: no [n_tokens, d_sae] temporaries
            chunk = t[start : start + _CHECK_ROWS]
            if not torch.isfinite(chunk).all():
                raise ValueError(f"{name} contains NaN/inf")
            if (chunk < 0).any():
                raise ValueError(f"{name} has negative activations; MCS assumes ReLU/TopK latents (min {t.min().item()})")


def _check_min_support(min_support: int | None) -> None:
    if min_support is not None and (isinstance(min_support, bool) or not isinstance(min_support, int)
                                    or min_support < 1):
        raise ValueError(f"min_support must be None or a positive number of tokens, got {min_support!r}")


def _support(acts: Tensor, chunk_size: int = _CHECK_ROWS) -> Tensor:
    """``[d_sae]`` (int64): the number of tokens on which each latent is active, counted in row
    chunks (no ``[n_tokens, d_sae]`` temporary)."""
    return sum((active(acts[start : start + chunk_size]).sum(0) for start in range(0, acts.shape[0], chunk_size)),
               torch.zeros(acts.shape[1], dtype=torch.long, device=acts.device))


def _sparse_rows(t: Tensor) -> sp.csr_matrix:
    """``t`` (``[rows, d]``, mostly zeros: SAE activations) as a float64 scipy CSR matrix."""
    rows, cols = t.nonzero(as_tuple=True)
    return sp.csr_matrix((t[rows, cols].double().numpy(), (rows.numpy(), cols.numpy())), shape=tuple(t.shape))


def _masked_sums(
    acts_a: Tensor, acts_b: Tensor, chunk_size: int
) -> dict[str, Tensor]:
    """Token sums needed by the MCS variants and :func:`fraction_outside`, accumulated in float64 over
    token chunks as sparse products (SAE activations are sparse: a product costs about
    ``sum_t nnz_a(t) nnz_b(t)``, not ``n_tokens d_a d_b``)."""
    d_a, d_b = acts_a.shape[1], acts_b.shape[1]
    names = ("dot", "a2_on_b", "b2_on_a", "on_a_dot_on_b", "on_a_dot_b")
    sums = {name: np.zeros((d_a, d_b)) for name in names}
    a2, b2, b_mass, b_count = np.zeros(d_a), np.zeros(d_b), np.zeros(d_b), np.zeros(d_b)
    for start in range(0, acts_a.shape[0], chunk_size):
        a = _sparse_rows(acts_a[start : start + chunk_size].cpu())  # [chunk, d_a]
        b = _sparse_rows(acts_b[start : start + chunk_size].cpu())  # [chunk, d_b]
        a_on, b_on = (a > 0).astype(np.float64), (b > 0).astype(np.float64)
        at, at_on = a.T.tocsr(), a_on.T.tocsr()
        sums["dot"] += (at @ b).toarray()  # sum_t a_ti b_tj
        sums["a2_on_b"] += (at.multiply(at) @ b_on).toarray()  # sum_t a_ti^2 [b_tj > 0]
        sums["b2_on_a"] += (at_on @ b.multiply(b)).toarray()  # sum_t b_tj^2 [a_ti > 0]
        sums["on_a_dot_on_b"] += (at_on @ b_on).toarray()  # tokens where both fire
        sums["on_a_dot_b"] += (at_on @ b).toarray()  # b's mass where a fires
        a2 += np.asarray(a.multiply(a).sum(0)).ravel()
        b2 += np.asarray(b.multiply(b).sum(0)).ravel()
        b_mass += np.asarray(b.sum(0)).ravel()
        b_count += np.asarray(b_on.sum(0)).ravel()
    out = {name: torch.from_numpy(v) for name, v in sums.items()}
    out["a2"], out["b2"] = torch.from_numpy(a2), torch.from_numpy(b2)  # [d_a], [d_b]: sum_t a_ti^2, sum_t b_tj^2
    out["b_mass"], out["b_count"] = torch.from_numpy(b_mass), torch.from_numpy(b_count)  # sum_t b_tj, sum_t [b_tj > 0]
    return out


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def directed_mcs(
    acts_a: Float[Tensor, "n_tokens d_a"],
    acts_b: Float[Tensor, "n_tokens d_b"],
    scale_by_max: bool = True,
    chunk_size: int = 8192,
    min_support: int | None = None,
) -> Float[Tensor, "d_a d_b"]:
    """Directed masked cosine similarity of every latent ``i`` of A with every latent ``j`` of B.

    ``score[i, j] = cos(A_i, B_j over tokens where B_j > 0) * max(B_j) / max(A_i)`` (the factor
    only if ``scale_by_max``). Zero where ``A_i`` is silent on all of ``B_j``'s tokens, or where
    either latent never fires, and, with ``min_support``, in every column ``j`` whose ``B_j`` is
    active on fewer than ``min_support`` tokens (None: no floor; :data:`MIN_SUPPORT` = 20 is the
    recommended one, see the module docstring). With the factor the score can exceed 1. Source:
    Nabeshima 2024 (see the module docstring); the support floor is this project's.

    Raises ValueError if the token counts differ or are 0, an input is not 2-D, activations
    are negative or non-finite, or ``min_support`` is not None or a positive integer.
    """
    _check_min_support(min_support)
    _check_pair(acts_a, acts_b)
    return _directed(_masked_sums(acts_a, acts_b, chunk_size), acts_a, acts_b, scale_by_max, min_support)


def _directed(s: dict[str, Tensor], acts_a: Tensor, acts_b: Tensor, scale_by_max: bool,
              min_support: int | None) -> Tensor:
    cos = _safe_div(s["dot"], s["a2_on_b"].sqrt() * s["b2"].sqrt()[None, :])
    if scale_by_max:
        max_a = acts_a.amax(0).double()  # [d_a]
        max_b = acts_b.amax(0).double()  # [d_b]
        cos = cos * _safe_div(max_b[None, :], max_a[:, None].expand(-1, len(max_b)))
    if min_support is not None:
        cos = cos.masked_fill((s["b_count"] < min_support)[None, :], 0.0)  # b_count: B_j's support
    return cos.float()


def symmetric_mcs(
    acts_a: Float[Tensor, "n_tokens d_a"],
    acts_b: Float[Tensor, "n_tokens d_b"],
    chunk_size: int = 8192,
) -> Float[Tensor, "d_a d_b"]:
    """Original MCS ("Towards Monosemanticity"): the larger of the activation cosines restricted to
    the tokens where ``A_i`` is active and to those where ``B_j`` is active. In ``[0, 1]``.

    Raises ValueError as :func:`directed_mcs`.
    """
    _check_pair(acts_a, acts_b)
    return _symmetric(_masked_sums(acts_a, acts_b, chunk_size))


def _symmetric(s: dict[str, Tensor]) -> Tensor:
    on_b = _safe_div(s["dot"], s["a2_on_b"].sqrt() * s["b2"].sqrt()[None, :])
    on_a = _safe_div(s["dot"], s["a2"].sqrt()[:, None] * s["b2_on_a"].sqrt())
    return torch.maximum(on_a, on_b).float()


def fraction_outside(
    acts_a: Float[Tensor, "n_tokens d_a"],
    acts_b: Float[Tensor, "n_tokens d_b"],
    weighted: bool = False,
    chunk_size: int = 8192,
) -> Float[Tensor, "d_a d_b"]:
    """Share of latent ``B_j``'s firing that happens where ``A_i`` is silent (0 for a dead ``B_j``).

    ``weighted=False``: the fraction of the tokens where ``B_j`` fires. ``weighted=True``: the
    fraction of ``B_j``'s activation mass, ``sum_t b_tj [a_ti = 0] / sum_t b_tj``, which discounts
    weak firing. Raises ValueError as :func:`directed_mcs`.
    """
    _check_pair(acts_a, acts_b)
    return _outside(_masked_sums(acts_a, acts_b, chunk_size), weighted)


def _outside(s: dict[str, Tensor], weighted: bool) -> Tensor:
    inside = s["on_a_dot_b"] if weighted else s["on_a_dot_on_b"]
    total = s["b_mass"] if weighted else s["b_count"]  # [d_b]
    return _safe_div(total[None, :] - inside, total[None, :].expand_as(inside)).float()


# ---------------------------------------------------------------------------- graphs
def build_feature_dag(
    acts: Sequence[Float[Tensor, "n_tokens d_sae"]],
    threshold: float = MCS_THRESHOLD,
    score: Literal["directed", "symmetric"] = "directed",
    labels: Sequence[Sequence[str]] | None = None,
    chunk_size: int = 8192,
    min_support: int | None = None,
) -> nx.DiGraph:
    """Parent -> child DAG between consecutive SAEs ``acts[0]`` (narrowest) ... ``acts[-1]``.

    Every latent that ever fires is a node ``(level, latent)``; an edge links latent ``i`` at
    level ``l`` to latent ``j`` at level ``l + 1`` when ``score[i, j] >= threshold``, with ``score``
    the directed (default) or symmetric MCS, and, with ``min_support``, the child ``(l + 1, j)``
    is active on at least ``min_support`` tokens (None: no floor, as Nabeshima; :data:`MIN_SUPPORT`
    = 20 recommended, see the module docstring). Edge scores are the unfloored ones. Dead latents
    are left out. ``labels[l][j]`` becomes the ``label`` attribute of node ``(l, j)`` (default
    ``"l/j"``).

    The graph records the floor: ``dag.graph["min_support"]`` (the argument) and
    ``dag.graph["removed_by_support"]``, a list with one count per pair of consecutive levels of the
    links that pass the threshold but not the floor (all 0 without one); print their sum.

    Raises ValueError for fewer than two SAEs, zero or mismatched token counts, an unknown
    ``score``, label lists of the wrong length, or ``min_support`` not None or a positive integer.
    """
    _check_min_support(min_support)
    if len(acts) < 2:
        raise ValueError(f"need activations of at least two SAEs, got {len(acts)}")
    if score not in ("directed", "symmetric"):
        raise ValueError(f"score must be 'directed' or 'symmetric', got {score!r}")
    if labels is not None:
        if len(labels) != len(acts):
            raise ValueError(f"labels has {len(labels)} levels but acts has {len(acts)}")
        for level, (lab, a) in enumerate(zip(labels, acts)):
            if len(lab) != a.shape[1]:
                raise ValueError(f"labels[{level}] has {len(lab)} entries but SAE {level} has {a.shape[1]} latents")
    dag = nx.DiGraph(min_support=min_support, removed_by_support=[0] * (len(acts) - 1))
    for level, a in enumerate(acts):
        if a.ndim != 2:
            raise ValueError(f"acts[{level}] must be [n_tokens, d_sae], got {tuple(a.shape)}")
        if a.shape[0] == 0:
            raise ValueError(f"acts[{level}] has no tokens (n_tokens=0, shape {tuple(a.shape)}): nothing to compare")
        max_act = a.amax(0)
        freq = _support(a).float() / a.shape[0]  # = active(a).float().mean(0), without the dense float copy
        for j in torch.nonzero(max_act > 0).flatten().tolist():
            dag.add_node(
                (level, j),
                level=level,
                latent=j,
                label=str(labels[level][j]) if labels is not None else f"{level}/{j}",
                max_act=float(max_act[j]),
                frequency=float(freq[j]),
            )
    for level in range(len(acts) - 1):
        a, b = acts[level], acts[level + 1]
        _check_pair(a, b)
        sums = _masked_sums(a, b, chunk_size)  # once per pair of levels: every score below reads them
        directed = _directed(sums, a, b, scale_by_max=True, min_support=None)
        cosine = _directed(sums, a, b, scale_by_max=False, min_support=None)
        symmetric = _symmetric(sums)
        outside = _outside(sums, weighted=False)
        outside_mass = _outside(sums, weighted=True)
        chosen = directed if score == "directed" else symmetric
        links = chosen >= threshold  # [d_a, d_b]
        if min_support is not None:
            weak = links & (sums["b_count"] < min_support)[None, :]  # links of a child below the floor
            dag.graph["removed_by_support"][level] = sum(
                (level, i) in dag and (level + 1, j) in dag for i, j in torch.nonzero(weak).tolist())
            links = links & ~weak
        for i, j in torch.nonzero(links).tolist():
            if (level, i) in dag and (level + 1, j) in dag:
                dag.add_edge(
                    (level, i),
                    (level + 1, j),
                    score=float(chosen[i, j]),
                    directed=float(directed[i, j]),
                    cosine=float(cosine[i, j]),
                    symmetric=float(symmetric[i, j]),
                    outside=float(outside[i, j]),
                    outside_mass=float(outside_mass[i, j]),
                )
    return dag


def descendants_dag(dag: nx.DiGraph, root: Node) -> nx.DiGraph:
    """The sub-DAG of ``root`` and everything reachable from it. Raises KeyError for an unknown root."""
    if root not in dag:
        raise KeyError(f"root {root!r} is not a node of the DAG")
    return dag.subgraph({root} | nx.descendants(dag, root)).copy()


def best_parent_tree(dag: nx.DiGraph) -> nx.DiGraph:
    """Keep only each node's highest-scoring incoming edge (ties: the lowest parent index), as
    Nabeshima does to render the DAG. All nodes and their attributes are kept."""
    tree = nx.DiGraph()
    tree.add_nodes_from(dag.nodes(data=True))
    for node in dag.nodes:
        parents = sorted(dag.in_edges(node, data="score"), key=lambda e: (-e[2], e[0]))
        if parents:
            parent, _, _ = parents[0]
            tree.add_edge(parent, node, **dag.edges[parent, node])
    return tree


def multi_parent_latents(dag: nx.DiGraph) -> list[tuple[Node, list[tuple[Node, float]]]]:
    """Latents with more than one parent: ``[(node, [(parent, score), ...best first]), ...]``,
    sorted by level then latent."""
    out = []
    for node in sorted(dag.nodes):
        parents = sorted(((p, s) for p, _, s in dag.in_edges(node, data="score")), key=lambda e: (-e[1], e[0]))
        if len(parents) > 1:
            out.append((node, parents))
    return out


def absorption_candidates(
    dag: nx.DiGraph, min_outside: float = 0.3, by: Literal["mass", "tokens"] = "mass"
) -> list[dict[str, Any]]:
    """Edges whose child fires without its parent: ``outside_mass`` (``by="mass"``) or
    ``outside`` (``by="tokens"``) at least ``min_outside``.

    Returns dicts ``{"parent", "child", "score", "outside", "outside_mass"}`` sorted by the chosen
    measure, largest first. Raises ValueError unless ``0 <= min_outside <= 1`` and ``by`` is known.
    """
    if not (0.0 <= min_outside <= 1.0):
        raise ValueError(f"min_outside must be in [0, 1], got {min_outside!r}")
    if by not in ("mass", "tokens"):
        raise ValueError(f"by must be 'mass' or 'tokens', got {by!r}")
    key = "outside_mass" if by == "mass" else "outside"
    rows = [
        {"parent": p, "child": c, "score": d["score"], "outside": d["outside"], "outside_mass": d["outside_mass"]}
        for p, c, d in dag.edges(data=True)
        if d[key] >= min_outside
    ]
    return sorted(rows, key=lambda r: (-r[key], r["parent"], r["child"]))


def longest_chain(graph: nx.DiGraph) -> list[Node]:
    """The longest directed path (a parent -> child -> grandchild ... chain); ``[]`` if empty."""
    if graph.number_of_nodes() == 0:
        return []
    return list(nx.dag_longest_path(graph, weight=None))


def descendants_at_level(graph: nx.DiGraph, root: Node, level: int) -> list[Node]:
    """Sorted descendants of ``root`` at ``level``. Raises KeyError for an unknown root."""
    if root not in graph:
        raise KeyError(f"root {root!r} is not a node of the graph")
    return sorted(n for n in nx.descendants(graph, root) if n[0] == level)


def duplicate_groups(acts: Float[Tensor, "n_tokens d_sae"], threshold: float = 0.95) -> list[list[int]]:
    """Group the alive latents of ONE SAE that are near-copies of each other: connected components
    of the graph linking latents whose activation vectors (over all tokens) have cosine similarity
    at least ``threshold``. (Unlike MCS, a child firing on a subset of its parent's tokens is not
    a copy: its unmasked cosine with the parent is at most the square root of that subset's share
    of the parent's squared activation.)

    A decoder-norm-weighted L1 penalty costs the same whether a direction is carried by one latent
    or spread over several identical ones, so wide L1 SAEs can grow such copies. Returns the
    groups (each sorted; singletons included) sorted by their first latent.

    Raises ValueError for activations that are not 2-D, negative or non-finite.
    """
    _check_pair(acts, acts)
    alive = torch.nonzero(acts.amax(0) > 0).flatten()
    a = acts[:, alive].double()
    unit = a / a.norm(dim=0, keepdim=True)
    sim = unit.T @ unit  # [n_alive, n_alive]
    g = nx.Graph()
    g.add_nodes_from(alive.tolist())
    for i, j in torch.nonzero(torch.triu(sim >= threshold, diagonal=1)).tolist():
        g.add_edge(int(alive[i]), int(alive[j]))
    return sorted(sorted(c) for c in nx.connected_components(g))


def top_token_labels(
    acts: Float[Tensor, "n_tokens d_sae"],
    token_ids: Tensor,
    decode: Callable[[Sequence[int]], list[str]],
    k: int = 3,
    n_top: int = 20,
) -> list[str]:
    """A label per latent: its ``k`` most frequent tokens among its ``n_top`` highest activations,
    e.g. ``"·the / ·a / ·an"`` (spaces shown as ``·``, newlines as ``\\n``); ``"dead"`` for a latent
    that never fires. Ties keep the order of first appearance by activation.

    ``token_ids[t]`` is the token at which ``acts[t]`` was read; ``decode`` maps ids to one string
    each (e.g. :meth:`saelib.lm.models.LanguageModel.decode`). Raises ValueError if the lengths differ
    or ``k``/``n_top`` are not positive.
    """
    if acts.ndim != 2 or token_ids.shape != (acts.shape[0],):
        raise ValueError(f"acts must be [n_tokens, d_sae] and token_ids [n_tokens], got {tuple(acts.shape)}, {tuple(token_ids.shape)}")
    if k < 1 or n_top < 1:
        raise ValueError(f"k and n_top must be positive, got k={k}, n_top={n_top}")
    vals, idx = acts.topk(min(n_top, acts.shape[0]), dim=0)  # [n_top, d_sae], highest first
    top_ids = token_ids[idx]  # [n_top, d_sae]
    needed = sorted({int(t) for t in top_ids[vals > 0].tolist()})
    text = dict(zip(needed, decode(needed))) if needed else {}
    labels = []
    for j in range(acts.shape[1]):
        ids = top_ids[:, j][vals[:, j] > 0].tolist()
        if not ids:
            labels.append("dead")
            continue
        common = [t for t, _ in Counter(ids).most_common(k)]  # Counter keeps first-seen order on ties
        labels.append(" / ".join(text[t].replace(" ", "·").replace("\n", "\\n") for t in common))
    return labels


# ---------------------------------------------------------------------------- drawing
def tree_layout(tree: nx.DiGraph, x: dict[Node, float] | None = None) -> dict[Node, tuple[float, float]]:
    """Positions ``{node: (x, y)}`` with ``y = -level``.

    Without ``x``: leaves are placed 0, 1, 2, ... in depth-first order (children by latent
    index) and every parent sits at the mean of its children, so subtrees do not cross. With
    ``x``: those horizontal positions are used as given (e.g. a latent's mean ground-truth value).

    Raises ValueError if ``tree`` has a node with several parents, or ``x`` misses a node.
    """
    if any(tree.in_degree(n) > 1 for n in tree.nodes):
        raise ValueError("tree_layout needs a forest (one parent per node); use best_parent_tree first")
    if x is not None:
        missing = [n for n in tree.nodes if n not in x]
        if missing:
            raise ValueError(f"x has no position for nodes {missing[:5]}")
        return {n: (float(x[n]), -float(n[0])) for n in tree.nodes}
    pos: dict[Node, tuple[float, float]] = {}
    next_leaf = [0.0]

    def place(node: Node) -> float:
        children = sorted(tree.successors(node))
        if not children:
            xs = next_leaf[0]
            next_leaf[0] += 1.0
        else:
            xs = float(np.mean([place(c) for c in children]))
        pos[node] = (xs, -float(node[0]))
        return xs

    for root in sorted(n for n in tree.nodes if tree.in_degree(n) == 0):
        place(root)
    return pos


def draw_feature_tree(
    tree: nx.DiGraph,
    *,
    x: dict[Node, float] | None = None,
    level_names: Sequence[str] | None = None,
    extra_edges: nx.DiGraph | None = None,
    show_labels: bool = True,
    ax: Axes | None = None,
    title: str = "",
    xlabel: str = "",
) -> Figure:
    """Draw a feature tree (or forest) level by level, each node labelled with its ``label``.

    Edges are drawn with width and opacity growing with their ``score``; ``extra_edges`` (e.g.
    the full DAG) adds the non-tree edges between drawn nodes as dashed grey lines, so
    multi-parent latents stay visible. ``level_names`` names the rows (e.g. ``["S/1", "S/2",
    "S/3"]``). Positions come from :func:`tree_layout` (``x`` optional). Draws into ``ax`` if given
    (and returns its figure), else into a new figure.

    Raises ValueError as :func:`tree_layout`, or if ``level_names`` is too short.
    """
    pos = tree_layout(tree, x)
    levels = sorted({n[0] for n in tree.nodes})
    if level_names is not None and levels and len(level_names) <= max(levels):
        raise ValueError(f"level_names has {len(level_names)} names but the tree reaches level {max(levels)}")
    if ax is None:
        n_leaves = max(1, sum(1 for n in tree.nodes if tree.out_degree(n) == 0))
        width = float(np.clip(1.6 * n_leaves if x is None else 10.0, 6.0, 16.0))
        fig = Figure(figsize=(width, 1.2 + 1.1 * max(1, len(levels))), layout="constrained")
        ax = fig.add_subplot()
    if extra_edges is not None:
        for p, c in extra_edges.edges:
            if p in pos and c in pos and not tree.has_edge(p, c):
                (x0, y0), (x1, y1) = pos[p], pos[c]
                ax.plot([x0, x1], [y0, y1], ls="--", lw=0.8, color="0.6", zorder=1)
    for p, c, d in tree.edges(data=True):
        (x0, y0), (x1, y1) = pos[p], pos[c]
        s = float(np.clip(d.get("score", 1.0), 0.0, 1.0))
        ax.plot([x0, x1], [y0, y1], color="tab:blue", lw=0.5 + 2.0 * s, alpha=0.3 + 0.7 * s, zorder=2)
    if pos:
        nodes = sorted(pos)
        xs = [pos[n][0] for n in nodes]
        ys = [pos[n][1] for n in nodes]
        ax.scatter(xs, ys, s=30, color="black", zorder=3)
        if show_labels:
            for n in nodes:
                ax.annotate(
                    tree.nodes[n].get("label", f"{n[0]}/{n[1]}"),
                    pos[n],
                    xytext=(0, 6),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=20 if x is None else 60,
                    zorder=4,
                )
    ax.set_yticks([-lv for lv in levels])
    ax.set_yticklabels([level_names[lv] if level_names is not None else f"level {lv}" for lv in levels])
    if levels:
        ax.set_ylim(-max(levels) - 0.5, -min(levels) + 0.8)
    if x is None:
        ax.set_xticks([])
    ax.set_xlabel(xlabel)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(title)
    return ax.get_figure(root=True)


def draw_subtree(
    graph: nx.DiGraph,
    root: Node,
    max_level: int | None = None,
    dag: nx.DiGraph | None = None,
    **kwargs: Any,
) -> Figure:
    """Draw ``root`` and its descendants in ``graph`` (a best-parent tree) down to ``max_level``
    (all levels if None) with :func:`draw_feature_tree`; ``dag`` adds the other DAG edges among
    the drawn nodes as dashed lines. Extra keyword arguments go to :func:`draw_feature_tree`
    (``x`` may hold positions for more nodes than are drawn). A widget can wrap this function.

    Raises KeyError for an unknown root.
    """
    sub = descendants_dag(graph, root)
    if max_level is not None:
        sub = sub.subgraph([n for n in sub.nodes if n[0] <= max_level]).copy()
    x = kwargs.pop("x", None)
    if x is not None:
        x = {n: x[n] for n in sub.nodes}
    return draw_feature_tree(sub, x=x, extra_edges=dag, **kwargs)


def plot_mcs_comparison(
    directed: Float[Tensor, "d_a d_b"],
    symmetric: Float[Tensor, "d_a d_b"],
    threshold: float = MCS_THRESHOLD,
    title: str = "",
) -> Figure:
    """Scatter of symmetric against directed MCS for every latent pair of two SAEs, with the
    threshold on each axis; the four quadrants count the pairs linked by both, by one, or by
    neither score. Raises ValueError if the shapes differ."""
    if directed.shape != symmetric.shape:
        raise ValueError(f"directed {tuple(directed.shape)} and symmetric {tuple(symmetric.shape)} must match")
    d = directed.detach().flatten().double().numpy()
    s = symmetric.detach().flatten().double().numpy()
    keep = (d > 0.05) | (s > 0.05)  # the bulk of unrelated pairs sits at 0
    fig = Figure(figsize=(5.0, 4.6), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(d[keep], s[keep], s=4, alpha=0.3, color="tab:blue", linewidths=0, rasterized=True)
    ax.axvline(threshold, color="0.3", lw=0.8, ls="--")
    ax.axhline(threshold, color="0.3", lw=0.8, ls="--")
    counts = {
        "both": int(((d >= threshold) & (s >= threshold)).sum()),
        "directed only": int(((d >= threshold) & (s < threshold)).sum()),
        "symmetric only": int(((d < threshold) & (s >= threshold)).sum()),
    }
    ax.text(0.98, 0.02, "\n".join(f"{k}: {v}" for k, v in counts.items()), transform=ax.transAxes,
            ha="right", va="bottom", fontsize=8)
    ax.set_xlabel("directed MCS (x max(B)/max(A))")
    ax.set_ylabel("symmetric MCS")
    ax.set_title(title)
    return fig


@dataclass
class LinkSummary:
    """What notebook 08 reads off a feature DAG (:func:`link_summary`).

    Attributes:
        n_links: links in the DAG.
        removed_by_support: links that passed the threshold but not the support floor.
        by_factor: links whose cosine alone is below the threshold (they pass only through the
            factor ``max(B)/max(A) > 1``).
        inside: links whose child fires mostly (on more than half of its tokens) where its
            parent fires.
        multi: :func:`multi_parent_latents` of the DAG.
        tree: :func:`best_parent_tree` of the DAG.
        chain: :func:`longest_chain` of the tree.
        inside_frac, by_factor_frac: the two fractions of links with bootstrap intervals over
            links (``unit="links"``; links sharing a latent are not independent, so these
            intervals understate the uncertainty); None when there is no link.
    """

    n_links: int
    removed_by_support: int
    by_factor: list[tuple[Node, Node]]
    inside: list[tuple[Node, Node]]
    multi: list[tuple[Node, list[tuple[Node, float]]]]
    tree: nx.DiGraph
    chain: list[Node]
    inside_frac: ConfidenceInterval | None
    by_factor_frac: ConfidenceInterval | None


def link_summary(dag: nx.DiGraph, threshold: float = MCS_THRESHOLD, n_boot: int = 1000, seed: int = 0) -> LinkSummary:
    """The links of a DAG from :func:`build_feature_dag` counted the ways notebook 08 checks
    Nabeshima's trees: which pass only through the factor ``max(B)/max(A)`` (cosine below
    ``threshold``), which children fire mostly inside their parent's support (``outside < 0.5``),
    the latents with several parents and the longest best-parent chain, with bootstrap intervals of
    the two fractions over links."""
    links = list(dag.edges(data=True))
    by_factor = [(p, c) for p, c, d in links if d["cosine"] < threshold]
    inside = [(p, c) for p, c, d in links if d["outside"] < 0.5]
    tree = best_parent_tree(dag)

    def frac(flags: list[float]) -> ConfidenceInterval | None:
        return bootstrap_ci(flags, n_boot=n_boot, seed=seed, unit="links") if flags else None

    return LinkSummary(len(links), sum(dag.graph.get("removed_by_support", [0])), by_factor, inside,
                       multi_parent_latents(dag), tree, longest_chain(tree),
                       frac([float(d["outside"] < 0.5) for _, _, d in links]),
                       frac([float(d["cosine"] < threshold) for _, _, d in links]))
