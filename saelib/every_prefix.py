"""The exact Matryoshka loss over every prefix, at a cost set by the active latents only.

A Matryoshka SAE (Nabeshima 2024; Bussmann et al. 2025, arXiv 2503.17547) asks every prefix
``latents[:m]`` to reconstruct the input. Sampling a few prefixes per step (Nabeshima: 10) saves
one decode per prefix; seed 000 wishes for *every* prefix, every step. This module computes the
weighted sum over all ``d_sae`` prefix errors exactly, without decoding any prefix.

Why it is cheap. Write ``e = x - b_dec``, ``u_j`` for decoder row ``j``, ``a_j`` for its activation
and ``w_m`` for the weight of prefix length ``m``. Latent ``j`` belongs to every prefix longer than
``j``, so its *tail weight* is ``T_j = sum_{m > j} w_m`` (non-increasing in ``j``). Expanding
every prefix's squared error and collecting terms::

    sum_m w_m ||e - sum_{j < m} a_j u_j||²
        = W ||e||² - 2 sum_j T_j a_j <e, u_j> + sum_{j,k} min(T_j, T_k) a_j a_k <u_j, u_k>

with ``W = sum_m w_m`` (a pair of latents shares exactly the prefixes that contain the later one,
whose tail weight is the smaller). Only latents with ``a_j != 0`` appear, in any order. Adding
``e`` as an extra row ``u_* = e`` with coefficient ``a_* = -1`` and tail weight ``W`` turns the
whole sum into one quadratic form ``a'ᵀ (M ∘ U Uᵀ) a'`` over the ``n_active + 1`` rows, with
``M_jk = min(T'_j, T'_k)``. Per sample this costs ``O(n_active · d_in)`` to gather rows and
``O(n_active² · d_in)`` for their Gram matrix, instead of ``O(d_sae · d_in)`` per prefix decode.

Gradients are exact with respect to ``x``, ``b_dec``, ``W_dec`` and the *nonzero* activations;
the gradient with respect to a zero activation is reported as 0. ReLU, TopK and BatchTopK pass no
gradient through a zero activation, so gradients reaching the encoder are exact for them (an
activation whose backward uses the gradient at inactive latents, such as JumpReLU's threshold
estimator, would need the dense path in :mod:`saelib.matryoshka`).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int64
from torch import Tensor

__all__ = ["active_latents", "sparse_prefix_loss"]


def active_latents(
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


def sparse_prefix_loss(
    x: Float[Tensor, "batch inst d_in"],
    acts: Float[Tensor, "batch inst d_sae"],
    W_dec: Float[Tensor, "inst d_sae d_in"],
    b_dec: Float[Tensor, "inst d_in"],
    weights: Float[Tensor, "inst d_sae"],
) -> Float[Tensor, " inst"]:
    """Per instance, ``mean_batch sum_m w_m ||x - acts[..., :m] @ W_dec[:m] - b_dec||²``, exactly.

    ``weights[i, m - 1]`` is the weight of prefix length ``m`` for instance ``i`` (any
    non-negative values: :func:`saelib.matryoshka.prefix_weights` gives ``"every"``, ``"random"``
    or ``"fixed"``). Equals :func:`saelib.matryoshka.matryoshka_recon_loss` but costs
    ``O(batch · inst · n_active · (n_active + d_in))`` time and ``O(batch · inst · n_active ·
    d_in)`` memory, where ``n_active`` is the largest row L0 of ``acts``: cheap for TopK /
    BatchTopK and trained ReLU SAEs, costly for a dense ReLU SAE early in training. See the
    module docstring for the derivation and which gradients are exact.

    Raises ValueError on mismatched shapes or negative weights.
    Source: the every-prefix Matryoshka loss wished for in seed 000 (block size 1).
    """
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
    weights = weights.to(W_dec.dtype)
    if (weights < 0).any():
        raise ValueError(f"prefix weights must be >= 0, got minimum {weights.min().item()}")

    rows = batch * inst
    idx, vals = active_latents(acts)  # [batch, inst, L]
    n_active = idx.shape[-1]
    tail = weights.flip(-1).cumsum(-1).flip(-1)  # T_j = sum_{m > j} w_m, [inst, d_sae]
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
