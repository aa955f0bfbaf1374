"""Harvest throughput: saelib.lm.activations.harvest_activations against a bare forward pass of the
same model truncated at the same layer (``stop_at_layer``), on the same document-aligned rows and
the same length batching. Both in one process, alternated, medians over repeats.

    .venv/bin/python benchmarks/harvest_benchmark.py [--docs 200] [--layer 12] [--repeats 3]

Prints a Markdown table to paste into benchmarks/RESULTS.md (section "Activation harvesting").
Run it on a quiet machine: it uses every torch thread.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=200, help="training documents harvested")
    ap.add_argument("--layer", type=int, default=12, help="harvest blocks.<layer>.hook_resid_pre")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens-per-batch", type=int, default=4096)
    args = ap.parse_args()
    os.environ["SAELIB_CACHE_DIR"] = tempfile.mkdtemp(prefix="saelib-harvest-bench-")  # never read a cache

    from saelib.lm.activations import harvest_activations
    from saelib.data.corpus import load_wiki_leads, split_documents, tokenize_documents
    from saelib.lm.models import load_smollm2

    t0 = time.perf_counter()
    lm = load_smollm2()
    load_s = time.perf_counter() - t0
    split = split_documents(load_wiki_leads())
    docs = tokenize_documents(split.train_texts[: args.docs], lm.tokenizer, lm.bos_id, 512)
    hook = f"blocks.{args.layer}.hook_resid_pre"
    order = torch.argsort(docs.lengths, descending=True, stable=True).tolist()

    def bare() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            i = 0
            while i < len(order):
                w = int(docs.lengths[order[i]])
                n = max(1, args.tokens_per_batch // w)
                lm.model(docs.tokens[order[i : i + n], :w], stop_at_layer=args.layer)
                i += n
        return docs.n_tokens / (time.perf_counter() - t)

    def harvest() -> float:
        t = time.perf_counter()
        harvest_activations(lm, docs, [hook], tokens_per_batch=args.tokens_per_batch, use_cache=False, progress=False)
        return docs.n_tokens / (time.perf_counter() - t)

    bare(), harvest()  # warm-up (and the weights hash, computed once per model)
    rates: dict[str, list[float]] = {"bare forward (stop_at_layer)": [], "harvest_activations (to disk)": []}
    for _ in range(args.repeats):
        rates["bare forward (stop_at_layer)"].append(bare())
        rates["harvest_activations (to disk)"].append(harvest())
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"SmolLM2-135M (fp32), {hook}, {len(docs)} documents, {docs.n_tokens:,} tokens, "
          f"{args.tokens_per_batch} tokens per batch, {torch.get_num_threads()} torch threads, "
          f"{platform.processor() or platform.machine()}, model load {load_s:.0f} s\n")
    print("| path | tokens/s (median) | runs |\n|---|---|---|")
    for k, v in rates.items():
        print(f"| {k} | {med[k]:,.0f} | {', '.join(f'{x:,.0f}' for x in v)} |")
    ratio = med["harvest_activations (to disk)"] / med["bare forward (stop_at_layer)"]
    print(f"\nharvest / bare forward: {ratio:.2f}x")


if __name__ == "__main__":
    main()
