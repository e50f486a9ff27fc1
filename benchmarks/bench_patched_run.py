"""Cost of one patched run (`run_with_patched_edges`, what every faithfulness point pays) against a plain forward.

Interleaves, several times, a plain forward of the clean batch and patched runs on the default's positional graph
(the four role spans): connected random circuits of the sizes the stage scores after pruning (34, 110 and 337
edges: the default run's 0.1 / 0.2 / 0.5 % circuits), random shares of the edges, and every edge but one (an
exact-patching run). Reports the ratios measured in this one run (min and median), never an absolute time alone.

    python benchmarks/bench_patched_run.py --examples 4 --tokens 96 --repeats 3
"""
import argparse, random, statistics

import torch

from summcircuit.circuits import random_circuit
from summcircuit.corrupt import build_pairs, pair_batches
from summcircuit.data import load_examples
from summcircuit.graph import CorruptedRun, Graph, run_with_patched_edges
from summcircuit.models import load_model

from common import timed, write_result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--circuit-edges", type=int, nargs="+", default=[34, 110, 337])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 0.5])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results/patched_run.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(a.model, device=a.device)
    pairs = build_pairs(load_examples("aclsum", "test", n=a.examples + 4), lm.tokenizer, "swap", max_source_tokens=a.tokens,
                        max_length=lm.spec.n_ctx, progress=False)[:a.examples]
    (clean, corr), = pair_batches(pairs, lm.tokenizer.pad_token_id, len(pairs))
    clean, corr = clean.to(lm.device), corr.to(lm.device)
    graph = Graph(lm.spec, "roles")
    run = CorruptedRun.of(lm, clean, corr, graph)            # made once per batch by the circuits stage too
    clean_run = CorruptedRun.of(lm, clean, clean, graph)     # made once per batch by exact patching
    rng = random.Random(0)
    masks = {f"circuit_{n}_edges": random_circuit(graph, n, rng) for n in a.circuit_edges}
    masks |= {f"random_{f}": (torch.rand(graph.shape) < f) & graph.edges for f in a.fractions}
    all_but_one = graph.edges.clone()                        # the input's edge into the middle layer's MLP, salient span
    all_but_one[0, 0, graph.mlp_destination(lm.spec.n_layers // 2)] = False
    masks["all_but_one"] = all_but_one
    plain = lambda: lm.hf(clean.input_ids, attention_mask=clean.attention_mask)
    with torch.no_grad():
        plain(); run_with_patched_edges(lm, clean, corr, masks["all_but_one"], graph, corrupted_run=run)   # warm-up
        rows = []
        for r in range(a.repeats):
            row = {"plain_forward": timed(plain)}
            for name, m in masks.items(): row[name] = timed(lambda: run_with_patched_edges(lm, clean, corr, m, graph, corrupted_run=run))
            row["all_but_one_clean_cached"] = timed(lambda: run_with_patched_edges(lm, clean, corr, all_but_one, graph, corrupted_run=run,
                                                                                   clean_run=clean_run))
            rows.append(row)
            print(f"repeat {r}: " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items()))
    ratios = {name: [row[name] / row["plain_forward"] for row in rows] for name in [*masks, "all_but_one_clean_cached"]}
    result = {"model": a.model, "batch": list(clean.input_ids.shape), "spans": list(graph.spans),
              "edges": {name: int(m.sum()) for name, m in masks.items()}, "repeats": rows,
              "ratio_vs_plain_forward": {k: {"min": min(v), "median": statistics.median(v)} for k, v in ratios.items()}}
    write_result(result, a.out, omit=("repeats",))


if __name__ == "__main__":
    main()
