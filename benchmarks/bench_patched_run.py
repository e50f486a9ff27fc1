"""Cost of one patched run (`run_with_patched_edges`, what every faithfulness point pays) against a plain forward.

Interleaves, several times, a plain forward of the clean batch and patched runs keeping a random share of the
edges; reports the ratios measured in this one run (min and median), never an absolute time alone.

    python benchmarks/bench_patched_run.py --examples 4 --tokens 160 --repeats 3
"""
import argparse, statistics

import torch

from summcircuit.corrupt import build_pairs, pair_batches
from summcircuit.data import load_examples
from summcircuit.graph import Graph, node_outputs, run_with_patched_edges
from summcircuit.models import load_model

from common import timed, write_result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results/patched_run.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(a.model, device=a.device)
    pairs = build_pairs(load_examples("aclsum", "val", n=a.examples), lm.tokenizer, "mask", max_source_tokens=a.tokens,
                        max_length=lm.spec.n_ctx, progress=False)
    (clean, corr), = pair_batches(pairs, lm.tokenizer.pad_token_id, len(pairs))
    clean, corr = clean.to(lm.device), corr.to(lm.device)
    graph = Graph(lm.spec)
    corrupted = node_outputs(lm, corr)                       # computed once per batch by the circuits stage too
    masks = {f: torch.rand(graph.edges.shape) < f for f in a.fractions}
    plain = lambda: lm.hf(clean.input_ids, attention_mask=clean.attention_mask)
    with torch.no_grad():
        plain(); run_with_patched_edges(lm, clean, corr, masks[a.fractions[0]], graph, corrupted)   # warm-up
        rows = []
        for r in range(a.repeats):
            row = {"plain_forward": timed(plain)}
            for f, m in masks.items(): row[f"patched_{f}"] = timed(lambda: run_with_patched_edges(lm, clean, corr, m, graph, corrupted))
            rows.append(row)
            print(f"repeat {r}: " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items()))
    ratios = {f: [row[f"patched_{f}"] / row["plain_forward"] for row in rows] for f in a.fractions}
    result = {"model": a.model, "batch": list(clean.input_ids.shape), "repeats": rows,
              "ratio_vs_plain_forward": {str(f): {"min": min(v), "median": statistics.median(v)} for f, v in ratios.items()}}
    write_result(result, a.out, omit=("repeats",))


if __name__ == "__main__":
    main()
