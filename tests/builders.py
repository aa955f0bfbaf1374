"""Builders shared by several test files: small SAEs, a random Matryoshka decoding problem, a tiny
language model with a word-level tokenizer and a free TCP port. Plain functions, imported as ``from tests.builders import
...``; the shared fixtures (seeding, one torch thread, a cache folder, SAELens) are in
``tests/conftest.py``.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import torch

from saelib.core.sae import SAE, SAEConfig

if TYPE_CHECKING:  # imported where used: a file that needs only an SAE does not load transformer_lens
    from tokenizers import Tokenizer

    from saelib.lm.models import LanguageModel

# ------------------------------------------------------------------------------------- SAEs


def build_sae_cfg(**kw) -> SAEConfig:
    """A small SAE config (``d_in`` 5, ``d_sae`` 7, 3 instances, seed 0); keyword arguments override."""
    return SAEConfig(**{"d_in": 5, "d_sae": 7, "n_inst": 3, "seed": 0, **kw})


def random_bias_sae(architecture: str = "relu", *, d_in: int = 6, d_sae: int = 10, n_inst: int = 3,
                    k: int | None = None, d_out: int | None = None, apply_b_dec_to_input: bool = True,
                    use_b_dec: bool = True, trained_threshold: bool = True) -> SAE:
    """An SAE (seed 1, in eval mode) with ``W_enc``/``W_dec`` moved off their initialisation and random
    non-zero biases drawn from the global torch generator, so a save or load that drops a parameter
    changes the output. ``k`` defaults to 3 for TopK and BatchTopK; a BatchTopK SAE with
    ``trained_threshold`` gets a threshold per instance at the median positive pre-activation of 256
    random inputs, so its inference-mode encoding differs from its training-mode one."""
    if architecture != "relu" and k is None:
        k = 3
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, n_inst=n_inst, architecture=architecture, k=k, d_out=d_out,
                    apply_b_dec_to_input=apply_b_dec_to_input, use_b_dec=use_b_dec, seed=1)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.W_dec.add_(0.3 * torch.randn_like(sae.W_dec))
        sae.b_enc.copy_(0.2 * torch.randn_like(sae.b_enc))
        if use_b_dec:
            sae.b_dec.copy_(0.5 * torch.randn_like(sae.b_dec))
        if architecture == "batchtopk" and trained_threshold:
            pre = sae.pre_acts(torch.randn(256, d_in))  # [batch, inst, d_sae]
            sae.threshold.copy_(torch.stack([pre[:, i][pre[:, i] > 0].median() for i in range(n_inst)]))
    return sae.eval()


def matryoshka_problem(batch: int, inst: int, d_sae: int, d_in: int, dtype: torch.dtype = torch.float64,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(x [batch, inst, d_in], acts [batch, inst, d_sae], W_dec [inst, d_sae, d_in],
    b_dec [inst, d_in])`` from a generator seeded with ``seed``; ``acts`` are ReLU'd normals, so
    about half are exactly zero (asserted: some zero, some positive)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, inst, d_in, generator=g, dtype=dtype)
    acts = torch.relu(torch.randn(batch, inst, d_sae, generator=g, dtype=dtype))
    assert (acts == 0).any() and (acts > 0).any()
    W_dec = torch.randn(inst, d_sae, d_in, generator=g, dtype=dtype)
    b_dec = torch.randn(inst, d_in, generator=g, dtype=dtype)
    return x, acts, W_dec, b_dec


# ------------------------------------------------------------------------------- language model
WORDS = ["<|endoftext|>", "a", "b", "c", "d", "e", "f", "g"]  # token id = position; 0 is BOS


def word_level_tokenizer() -> Tokenizer:
    """A tokenizer with one token per word of :data:`WORDS`, split on whitespace (unknown words: "a")."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def tiny_language_model(tokenizer: Tokenizer, *, n_layers: int, d_model: int, d_head: int, d_mlp: int,
                        seed: int = 0) -> LanguageModel:
    """A randomly initialised (``seed``) HookedTransformer over :data:`WORDS` (2 heads, GELU, LayerNorm,
    ``n_ctx`` 16) in eval mode, wrapped as the LanguageModel ``"tiny"`` with BOS id 0."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saelib.lm.models import LanguageModel

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, d_head=d_head, n_heads=2, d_mlp=d_mlp,
                                  d_vocab=len(WORDS), n_ctx=16, act_fn="gelu", normalization_type="LN", seed=seed)
    return LanguageModel("tiny", HookedTransformer(cfg).eval(), tokenizer, 0, {})


# ------------------------------------------------------------------------------------ processes
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server or process group started next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
