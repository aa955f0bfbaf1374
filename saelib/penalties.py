"""Sparsity penalties on SAE latent activations.

Every penalty is applied to the decoder-norm-scaled activation ``a_j * ||W_dec[j]||`` (so that
shrinking the encoder while growing the decoder cannot cheat the penalty; Anthropic, "Towards
Monosemanticity" April 2024 update) and returned per latent, averaged over the batch, so that a
Matryoshka loss can weight latents by how many prefixes contain them.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = ["PENALTIES", "per_latent_penalty"]


def _l1(scaled: Tensor) -> Tensor:
    return scaled


PENALTIES: dict[str, Callable[[Tensor], Tensor]] = {
    "l1": _l1,  # Laplace prior
}


def per_latent_penalty(
    acts: Float[Tensor, "batch inst d_sae"],
    decoder_norms: Float[Tensor, "inst d_sae"],
    kind: str = "l1",
) -> Float[Tensor, "inst d_sae"]:
    """Mean over the batch of ``penalty(a_j * ||W_dec[j]||)`` for every latent.

    Pass ones as ``decoder_norms`` to penalise raw activations.

    Raises ValueError for an unknown ``kind`` (the known ones are the keys of ``PENALTIES``).
    """
    if kind not in PENALTIES:
        raise ValueError(f"unknown sparsity penalty {kind!r}; choose one of {sorted(PENALTIES)}")
    return PENALTIES[kind](acts * decoder_norms).mean(dim=0)
