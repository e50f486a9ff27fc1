"""Does memory hold steady over a long attribution loop? (nnsight users report growth across traces.)

Runs EAP-IG on `--batches` consecutive single-example batches and records the process's resident memory
after each; reports the growth between the first and the last tenth of the loop, and writes the series.

    python benchmarks/bench_memory_loop.py --model smollm2-135m --tokens 128 --batches 50
"""
import argparse, statistics

import psutil

from summcircuit.attribute import attribute
from summcircuit.corrupt import build_pairs
from summcircuit.data import load_examples
from summcircuit.models import load_model

from common import write_result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="aclsum")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--ig-steps", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/memory_loop.json")
    a = ap.parse_args()
    lm = load_model(a.model, device="cpu")
    pairs = build_pairs(load_examples(a.dataset, "train", n=a.batches), lm.tokenizer, max_source_tokens=a.tokens, progress=False)
    pairs = (pairs * ((a.batches + len(pairs) - 1) // len(pairs)))[:a.batches]
    proc, rss = psutil.Process(), []
    for i, p in enumerate(pairs):
        attribute(lm, [p], "eap-ig", ig_steps=a.ig_steps, progress=False)
        rss.append(proc.memory_info().rss / 2**20)
        if i % 10 == 0: print(f"batch {i}: {rss[-1]:.0f} MiB")
    k = max(1, len(rss) // 10)
    first, last = statistics.mean(rss[:k]), statistics.mean(rss[-k:])
    result = {"model": a.model, "tokens": a.tokens, "batches": len(rss), "rss_MiB_first_tenth": first,
              "rss_MiB_last_tenth": last, "growth_MiB": last - first, "peak_MiB": max(rss), "series_MiB": rss}
    write_result(result, a.out, omit=("series_MiB",))


if __name__ == "__main__":
    main()
