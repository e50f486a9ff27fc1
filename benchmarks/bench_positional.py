"""Cost of position-aware circuits against span-free ones: EAP-IG with the four role spans against span-free
EAP-IG on the same input, and a positional patched run against a span-free one keeping the same share of edges.

Interleaves the compared calls several times and reports ratios measured in this one run (min and median).

    python benchmarks/bench_positional.py --examples 4 --tokens 160 --ig-steps 5 --repeats 3
"""
import argparse, statistics

import torch

from summcircuit.attribute import attribute
from summcircuit.corrupt import build_pairs, pair_batches
from summcircuit.data import load_examples
from summcircuit.graph import CorruptedRun, Graph, run_with_patched_edges
from summcircuit.models import load_model

from common import timed, write_result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--share", type=float, default=0.1, help="share of edges kept in the patched runs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results/positional.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(a.model, device=a.device)
    pairs = build_pairs(load_examples("aclsum", "val", n=a.examples + 4), lm.tokenizer, max_source_tokens=a.tokens,
                        max_length=lm.spec.n_ctx, progress=False)[:a.examples]
    (clean, corr), = pair_batches(pairs, lm.tokenizer.pad_token_id, len(pairs))
    clean, corr = clean.to(lm.device), corr.to(lm.device)
    free, pos = Graph(lm.spec), Graph(lm.spec, "roles")
    run_free, run_pos = CorruptedRun.of(lm, clean, corr, free), CorruptedRun.of(lm, clean, corr, pos)
    mask_free = torch.rand(free.shape) < a.share
    mask_pos = torch.rand(pos.shape) < a.share
    kw = dict(method="eap-ig", ig_steps=a.ig_steps, batch_size=len(pairs), progress=False)
    calls = {"eap_ig_span_free": lambda: attribute(lm, pairs, spans="none", **kw),
             "eap_ig_roles": lambda: attribute(lm, pairs, spans="roles", **kw),
             "patched_span_free": lambda: run_with_patched_edges(lm, clean, corr, mask_free, free, corrupted_run=run_free),
             "patched_roles": lambda: run_with_patched_edges(lm, clean, corr, mask_pos, pos, corrupted_run=run_pos)}
    calls["patched_span_free"](); calls["patched_roles"]()            # warm-up
    rows = []
    for r in range(a.repeats):
        row = {name: timed(fn) for name, fn in calls.items()}
        rows.append(row)
        print(f"repeat {r}: " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items()))
    ratio = lambda num, den: [row[num] / row[den] for row in rows]
    ratios = {"eap_ig_roles / span_free": ratio("eap_ig_roles", "eap_ig_span_free"),
              "patched_roles / span_free": ratio("patched_roles", "patched_span_free")}
    result = {"model": a.model, "batch": list(clean.input_ids.shape), "ig_steps": a.ig_steps, "share": a.share,
              "spans": list(pos.spans), "repeats": rows,
              "ratios": {k: {"min": min(v), "median": statistics.median(v)} for k, v in ratios.items()}}
    write_result(result, a.out, omit=("repeats",))


if __name__ == "__main__":
    main()
