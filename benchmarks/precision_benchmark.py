"""Mixed precision (bf16) against float32, on this machine: matmul roofs, an SAE step at language-model
size (saelib and SAELens, each in float32 and with its own bf16 autocast), harvesting SmolLM2 to layer
13, and SmolLM2's held-out loss in both precisions.

    .venv/bin/python benchmarks/precision_benchmark.py [--quick]

Where bf16 is fast (or with ``--parts science``) it also trains 07's SAE and one of 06's transcoders in
both precisions to show bf16 leaves the science alone (FVU, L0, dead fraction, decoder MCC against
two float32 seeds; loss recovered). Writes ``benchmarks/precision_results.json`` and ``benchmarks/PRECISION.md`` (machine, CPU model and
its bf16 hardware, medians, ratios). Run it on a quiet machine: it uses every torch thread, and
compares only numbers measured in this one run.

On a CPU without bf16 hardware (no AMX, no AVX512-BF16) bf16 products run in software, far slower
than float32; there the bf16 rows are measured with fewer steps and tokens (said in the output),
since they only show why ``precision="auto"`` picks float32 there.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
LR, BETAS, L1 = 4e-4, (0.9, 0.999), 5.0
SIZES = {  # name: (d_in, d_sae, batch)
    "07's SAE (576 / 4608 / 1024)": (576, 4608, 1024),
    "benchmark LM size (512 / 4096 / 4096)": (512, 4096, 4096),
}
MATMULS = {  # the products of one SAE step at the benchmark's LM size, and a square one
    "4096 x 4096 x 4096": (4096, 4096, 4096),
    "4096 x 512 x 4096 (encode)": (4096, 512, 4096),
    "4096 x 4096 x 512 (decode)": (4096, 4096, 512),
    "512 x 4096 x 4096 (dW_enc)": (512, 4096, 4096),
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_time(fn: Callable[[], None], repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def matmul_roofs(repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, (m, k, n) in MATMULS.items():
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        row = {}
        for dtype in (torch.float32, torch.bfloat16):
            if dtype == torch.bfloat16 and not FAST and m * k * n > 4096 * 4096 * 512:
                row["bfloat16"] = None  # software bf16: minutes for this product, and nothing to learn
                continue
            x, y = a.to(dtype), b.to(dtype)
            med, _ = median_time(lambda: torch.mm(x, y), repeats if dtype == torch.float32 or FAST else 1)
            row[str(dtype).removeprefix("torch.")] = 2 * m * k * n / med / 1e9
        out[name] = row
    return out


def lm_like_batches(d_in: int, batch: int, n: int = 4) -> list[torch.Tensor]:
    """20 of 8192 random unit features per sample, Exp(1) magnitudes (as in run_benchmarks.py)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(8192, d_in, generator=g), dim=-1)
    out = []
    for _ in range(n):
        idx = torch.randint(8192, (batch, 20), generator=g)
        out.append((feats[idx] * -torch.rand(batch, 20, 1, generator=g).log()).sum(1))
    return out


def saelib_step(d_in: int, d_sae: int, pool: list[torch.Tensor], precision: str, steps: int) -> float:
    from saelib.core.sae import SAE, SAEConfig
    from saelib.core.train import TrainConfig, train_sae

    it = itertools.cycle(pool)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, seed=0))
    cfg = TrainConfig(steps=steps, batch_size=len(pool[0]), lr=LR, betas=BETAS, warmup_steps=1, decay_frac=0.0,
                      l1_coeff=L1, l1_warmup_frac=0.0, log_every=steps, progress=False, precision=precision,
                      retain_cpu_memory=True)
    t0 = time.perf_counter()
    train_sae(sae, lambda b, g: next(it), cfg)
    return (time.perf_counter() - t0) / steps


def saelens_step(d_in: int, d_sae: int, pool: list[torch.Tensor], autocast: bool, steps: int) -> float:
    import sae_lens.training.sae_trainer as trainer_module
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from tqdm.auto import tqdm

    trainer_module.tqdm = functools.partial(tqdm, disable=True)
    it = itertools.cycle(pool)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=L1))
    cfg = SAETrainerConfig(total_training_samples=steps * len(pool[0]), train_batch_size_samples=len(pool[0]), lr=LR,
                           lr_end=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], lr_scheduler_name="constant",
                           autocast=autocast, device="cpu", logger=LoggingConfig(log_to_wandb=False))
    trainer = trainer_module.SAETrainer(cfg, sae, it)
    t0 = time.perf_counter()
    trainer.fit()
    return (time.perf_counter() - t0) / steps


def sae_steps(quick: bool) -> dict:
    out = {}
    for name, (d_in, d_sae, batch) in SIZES.items():
        pool = lm_like_batches(d_in, batch)
        rows = {}
        big = batch * d_in * d_sae > 1024 * 576 * 4608
        for label, fn in {
            "saelib float32": lambda s: saelib_step(d_in, d_sae, pool, "float32", s),
            "saelib bfloat16": lambda s: saelib_step(d_in, d_sae, pool, "bfloat16", s),
            "SAELens float32": lambda s: saelens_step(d_in, d_sae, pool, False, s),
            "SAELens autocast (bf16)": lambda s: saelens_step(d_in, d_sae, pool, True, s),
        }.items():
            slow = ("bf16" in label or "bfloat16" in label) and not FAST
            if slow and big:  # software bf16: minutes per step at this size
                rows[label] = None
                continue
            steps = 1 if slow else (2 if quick else 6)
            repeats = 1 if slow or quick else 3
            fn(1)  # warm-up
            runs = [fn(steps) for _ in range(repeats)]
            rows[label] = {"s_per_step": statistics.median(runs), "runs": runs, "steps": steps,
                           "samples_per_s": batch / statistics.median(runs),
                           "step_gflop": 6 * 2 * batch * d_in * d_sae / 1e9}
        out[name] = rows
    return out


def harvest_and_loss(n_docs_harvest: int, n_docs_loss: int) -> dict:
    from saelib.data.corpus import load_wiki_leads, split_documents, tokenize_documents
    from saelib.lm.activations import harvest_activations
    from saelib.lm.models import load_smollm2, mean_next_token_loss

    lm = load_smollm2()
    split = split_documents(load_wiki_leads())
    hook = "blocks.12.hook_resid_pre"
    docs = tokenize_documents(split.train_texts[:n_docs_harvest], lm.tokenizer, lm.bos_id, 512)
    out: dict = {"harvest_tokens": docs.n_tokens, "hook": hook}
    # warm-up: the model's weight fingerprint (hashed once per model) and the first forward's allocations
    harvest_activations(lm, tokenize_documents(split.train_texts[-1:], lm.tokenizer, lm.bos_id, 512), [hook],
                        use_cache=False, progress=False)
    stores = {}
    for precision in ("float32", "bfloat16"):
        t0 = time.perf_counter()
        stores[precision] = harvest_activations(lm, docs, [hook], use_cache=False, progress=False, precision=precision)
        out[f"harvest_{precision}_tokens_per_s"] = docs.n_tokens / (time.perf_counter() - t0)
    a, b = stores["float32"][hook], stores["bfloat16"][hook]
    rel = ((a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12))[stores["float32"].pos > 0]
    out["harvest_median_rel_err"] = float(rel.median())
    held = tokenize_documents(split.heldout_texts[:n_docs_loss], lm.tokenizer, lm.bos_id, 512)
    losses = {}
    for precision in ("float32", "bfloat16"):
        total, count = 0.0, 0
        for i in range(len(held)):  # one document per forward: no padding to predict
            n = int(held.lengths[i])
            if n < 2:
                continue
            loss = mean_next_token_loss(lm.model, held.tokens[i : i + 1, :n], precision=precision)
            total, count = total + loss * (n - 1), count + n - 1
        losses[precision] = total / count
    out.update(loss_tokens=count, loss_float32=losses["float32"], loss_bfloat16=losses["bfloat16"])
    return out


def same_science(n_train_docs: int, n_eval_docs: int, steps: int, sm_steps: int) -> dict:
    """(b) an SAE at 07's settings trained in float32 and in bf16 from the same seed, beside a second
    float32 seed; (c) one transcoder (notebook 06's settings, one layer) spliced in float32 and in bf16."""
    from saelib.core.metrics import cosine_matrix, mcc
    from saelib.core.sae import SAE, SAEConfig
    from saelib.core.train import TrainConfig, train_sae
    from saelib.core.transcoder import mlp_hook_names
    from saelib.data.corpus import load_wiki_leads, split_documents, tokenize_split
    from saelib.experiments import sparse_mlp as tc
    from saelib.experiments.polysemanticity import sae_statistics
    from saelib.lm.activations import harvest_activations
    from saelib.lm.models import load_smollm2

    lm = load_smollm2()
    train_docs, eval_docs = tokenize_split(split_documents(load_wiki_leads()), lm.tokenizer, lm.bos_id, 512,
                                           n_train_docs, n_eval_docs, seed=0)
    hook = "blocks.12.hook_resid_pre"
    train, held = harvest_activations(lm, train_docs, [hook], progress=False), harvest_activations(lm, eval_docs, [hook], progress=False)
    scale = train.normalisation_scale(hook)
    out: dict = {"train_tokens": int(train.rows().numel()), "eval_tokens": int(held.rows().numel()), "steps": steps}
    saes = {}
    for name, (precision, seed) in {"float32": ("float32", 0), "bfloat16": ("bfloat16", 0), "float32 seed 1": ("float32", 1)}.items():
        sae = SAE(SAEConfig(d_in=lm.model.cfg.d_model, d_sae=4608, seed=seed))  # 07's settings
        cfg = TrainConfig(steps=steps, batch_size=1024, lr=3e-3, betas=(0.9, 0.999), penalty="l1", l1_coeff=5.0,
                          target_l0=32, l1_adapt_eps=3e-3, seed=seed, progress=False, precision=precision)
        t0 = time.perf_counter()
        train_sae(sae, train.sampler(hook, scale), cfg)
        q = sae_statistics(sae, held[hook], held.pos > 0, scale)
        saes[name] = sae
        out[name] = {"seconds": time.perf_counter() - t0, "FVU": q["FVU"], "L0": q["L0"], "dead_frac": q["dead_frac"]}
    dec = {k: v.W_dec[0].detach() for k, v in saes.items()}
    out["mcc_bf16_vs_float32"] = mcc(cosine_matrix(dec["bfloat16"], dec["float32"]))
    out["mcc_two_float32_seeds"] = mcc(cosine_matrix(dec["float32 seed 1"], dec["float32"]))
    layer = 9  # one of notebook 06's layers
    hooks = mlp_hook_names(lm.model, layer)
    store = harvest_activations(lm, train_docs, list(hooks), progress=False)
    x, y = store[hooks[0]][store.rows()].float(), store[hooks[1]][store.rows()].float()
    for precision in ("float32", "bfloat16"):
        cfg = tc.SparseMLPConfig(S_values=(2.0,), d_sae=1536, steps=sm_steps, batch_size=512, seed=0, progress=False,
                                 precision=precision)
        sm = tc.train_sparse_mlps(x, y, cfg, layer=layer, hooks=hooks)
        r = tc.spliced_losses(lm.model, eval_docs, sm, y.mean(0), progress=False, precision=precision)
        out[f"transcoder_{precision}"] = {"recovered": r.recovered[0], "kl": r.kl_sparse[0], "l0": r.l0[0],
                                          "loss_orig": r.loss_orig, "n_tokens": r.n_tokens}
    return out


def render(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Mixed precision (bf16) vs float32",
        "",
        f"Command: `.venv/bin/python benchmarks/precision_benchmark.py{' --quick' if res['quick'] else ''}`",
        "",
        f"Machine: {m['cpu']}, bf16 hardware: **{m['bf16']}**, {m['threads']} torch threads; torch {m['torch']}; "
        f"{m['date']}; load average at start {m['load']}. `precision=\"auto\"` resolves to **{m['auto']}** here.",
        "",
        "## Matmul roofs (GFLOP/s)",
        "",
        "| product (m x k x n) | float32 | bf16 | bf16 / float32 |",
        "|---|---|---|---|",
    ]
    for name, r in res["matmul"].items():
        if r["bfloat16"] is None:
            lines.append(f"| {name} | {r['float32']:,.0f} | not measured (no bf16 hardware) | |")
        else:
            lines.append(f"| {name} | {r['float32']:,.0f} | {r['bfloat16']:,.0f} | {r['bfloat16'] / r['float32']:.2f}x |")
    roof = max(v for r in res["matmul"].values() for v in r.values() if v is not None)
    lines += ["", "## One SAE training step (ReLU + L1, Adam, float32 master weights)", "",
              "| size | run | s / step | samples/s | vs saelib float32 | fraction of the fastest roof above |",
              "|---|---|---|---|---|---|"]
    for size, rows in res["sae_steps"].items():
        base = rows["saelib float32"]["s_per_step"]
        for label, r in rows.items():
            if r is None:
                lines.append(f"| {size} | {label} | not measured (software bf16: minutes per step) | | | |")
                continue
            frac = r["step_gflop"] / r["s_per_step"] / roof
            lines.append(f"| {size} | {label} ({r['steps']} steps x {len(r['runs'])}) | {r['s_per_step']:.3f} | "
                         f"{r['samples_per_s']:,.0f} | {base / r['s_per_step']:.2f}x | {100 * frac:.0f} % |")
        if rows["SAELens autocast (bf16)"] and rows["saelib bfloat16"]:
            ratio = rows["SAELens autocast (bf16)"]["s_per_step"] / rows["saelib bfloat16"]["s_per_step"]
            lines.append(f"| {size} | saelib bf16 / SAELens autocast (samples/s) | | | {ratio:.2f}x | |")
        ratio = rows["SAELens float32"]["s_per_step"] / rows["saelib float32"]["s_per_step"]
        lines.append(f"| {size} | saelib float32 / SAELens float32 (samples/s) | | | {ratio:.2f}x | |")
    h = res["lm"]
    lines += ["", "## SmolLM2-135M: harvest to layer 13 and held-out loss", "",
              f"Harvest of `{h['hook']}` over {h['harvest_tokens']:,} training tokens: float32 "
              f"{h['harvest_float32_tokens_per_s']:,.0f} tokens/s, bf16 {h['harvest_bfloat16_tokens_per_s']:,.0f} tokens/s "
              f"(**{h['harvest_bfloat16_tokens_per_s'] / h['harvest_float32_tokens_per_s']:.2f}x**); median relative "
              f"error of a token's bf16 activation vector {100 * h['harvest_median_rel_err']:.2f} %.",
              "",
              f"Held-out loss over {h['loss_tokens']:,} predicted tokens: float32 {h['loss_float32']:.4f} nats, "
              f"bf16 {h['loss_bfloat16']:.4f} nats (difference {h['loss_bfloat16'] - h['loss_float32']:+.4f}; "
              f"budget 0.01 nats: {'met' if abs(h['loss_bfloat16'] - h['loss_float32']) <= 0.01 else 'NOT met'}).", ""]
    if "science" in res:
        sc = res["science"]
        lines += ["## Same science in bf16", "",
                  f"(b) SAEs at 07's settings (d_sae 4608, L0 32, batch 1024, {sc['steps']} steps) on {sc['train_tokens']:,} "
                  f"training tokens, statistics on {sc['eval_tokens']:,} held-out tokens:", "",
                  "| run | FVU | L0 | dead fraction | seconds |", "|---|---|---|---|---|"]
        for name in ("float32", "bfloat16", "float32 seed 1"):
            r = sc[name]
            lines.append(f"| {name} | {r['FVU']:.4f} | {r['L0']:.1f} | {r['dead_frac']:.3f} | {r['seconds']:.0f} |")
        lines += ["", f"Decoder MCC, bf16 vs float32 from the same seed: **{sc['mcc_bf16_vs_float32']:.3f}**; two float32 "
                  f"seeds (the yardstick of \"the same SAE\"): {sc['mcc_two_float32_seeds']:.3f}.", "",
                  "(c) one transcoder (layer 9, S = 2, d_sae 1536): loss recovered float32 "
                  f"{sc['transcoder_float32']['recovered']:.3f}, bf16 {sc['transcoder_bfloat16']['recovered']:.3f} "
                  f"(L0 {sc['transcoder_float32']['l0']:.1f} vs {sc['transcoder_bfloat16']['l0']:.1f}; "
                  f"{sc['transcoder_float32']['n_tokens']:,} predicted tokens).", ""]
    return "\n".join(lines)


FAST = False


def main() -> None:
    global FAST
    from saelib.core.precision import cpu_bf16_support, resolve_precision

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and documents, for development")
    ap.add_argument("--harvest-docs", type=int, default=None, help="training documents harvested")
    ap.add_argument("--loss-docs", type=int, default=None, help="held-out documents for the loss")
    ap.add_argument("--render-only", action="store_true", help="rewrite PRECISION.md from precision_results.json")
    ap.add_argument("--parts", default=None,
                    help="comma-separated parts among matmul, sae, lm, science to measure (the others are kept from "
                         "precision_results.json); default: all, science only where bf16 is fast")
    ap.add_argument("--science-docs", type=int, default=2000, help="training documents of the same-science runs")
    ap.add_argument("--science-steps", type=int, default=1000, help="SAE steps of the same-science runs (07: 1000)")
    ap.add_argument("--science-transcoder-steps", type=int, default=600, help="transcoder steps (06: 600)")
    args = ap.parse_args()
    if args.render_only:
        res = json.loads((HERE / "precision_results.json").read_text())
        (HERE / "PRECISION.md").write_text(render(res))
        return
    os.environ["SAELIB_CACHE_DIR"] = tempfile.mkdtemp(prefix="saelib-precision-bench-")  # never read a cache
    FAST = cpu_bf16_support() != "none" or torch.cuda.is_available()
    harvest_docs = args.harvest_docs or (200 if FAST else 8)
    loss_docs = args.loss_docs or (100 if FAST else 6)
    res = {
        "quick": args.quick,
        "machine": {"cpu": cpu_model(), "bf16": cpu_bf16_support(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                    "load": ", ".join(f"{v:.1f}" for v in os.getloadavg()), "auto": resolve_precision("auto")},
    }
    parts = set(args.parts.split(",")) if args.parts else {"matmul", "sae", "lm"} | ({"science"} if FAST else set())
    if args.parts:  # keep the parts not measured again, and say when each was measured
        old = json.loads((HERE / "precision_results.json").read_text())
        res.update({k: old[k] for k in ("matmul", "sae_steps", "lm", "science") if k in old})
        res["machine"]["date"] += f" ({', '.join(sorted(parts))}; the rest {old['machine']['date']})"
    if "matmul" in parts:
        res["matmul"] = matmul_roofs(1 if args.quick else 3)
        print(json.dumps(res["matmul"], indent=1), flush=True)
    if "sae" in parts:
        res["sae_steps"] = sae_steps(args.quick)
        print(json.dumps(res["sae_steps"], indent=1), flush=True)
    if "lm" in parts:
        res["lm"] = harvest_and_loss(harvest_docs, loss_docs)
    if "science" in parts:
        res["science"] = same_science(args.science_docs, 40, args.science_steps, args.science_transcoder_steps)
    (HERE / "precision_results.json").write_text(json.dumps(res, indent=1) + "\n")
    (HERE / "PRECISION.md").write_text(render(res))
    print(render(res))


if __name__ == "__main__":
    main()
