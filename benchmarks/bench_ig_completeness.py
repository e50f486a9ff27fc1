"""How many EAP-IG steps the default needs: completeness per pair (the input node's edge scores over the measured
clean − corrupted gap; 1 for exact integrated gradients) for each rule and step count, and the cost of each
relative to the reference's five-step left sum, timed in this one run.

    python benchmarks/bench_ig_completeness.py --examples 8 --tokens 160 --steps 5 10 20
"""
import argparse, warnings

import numpy as np

from summcircuit.attribute import attribute
from summcircuit.corrupt import build_pairs
from summcircuit.data import load_examples
from summcircuit.models import load_model

from common import timed, write_result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--checkpoint", default=None, help="a fine-tuned checkpoint folder instead of the base model")
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--rules", nargs="+", default=["left", "midpoint"])
    ap.add_argument("--corruption", default="swap")
    ap.add_argument("--spans", default="roles")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results/ig_completeness.json")
    a = ap.parse_args()
    lm = load_model(a.checkpoint or a.model, device=a.device)
    pairs = build_pairs(load_examples("aclsum", "val", n=2 * a.examples), lm.tokenizer, a.corruption,
                        max_source_tokens=a.tokens, max_length=lm.spec.n_ctx, progress=False)[:a.examples]
    rows = {}
    for steps in a.steps:
        for rule in a.rules:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                att = None
                def run():
                    nonlocal att
                    att = attribute(lm, pairs, "eap-ig", ig_steps=steps, ig_rule=rule, spans=a.spans, batch_size=1, progress=False)
                seconds = timed(run)
            c = np.array(att.completeness)
            rows[f"{rule}-{steps}"] = {"seconds": seconds, "completeness": c.tolist(), "median": float(np.median(c)),
                                       "within_10%": float(np.mean(np.abs(c - 1) <= 0.1)),
                                       "within_20%": float(np.mean(np.abs(c - 1) <= 0.2)),
                                       "mean_abs_error": float(np.mean(np.abs(c - 1)))}
            print(f"{rule:8s} {steps:3d} steps: median {np.median(c):.3f}, within 10% {rows[f'{rule}-{steps}']['within_10%']:.0%}, "
                  f"mean |1 - c| {np.mean(np.abs(c - 1)):.3f}, {seconds:.0f} s")
    base = rows.get(f"left-{a.steps[0]}", next(iter(rows.values())))["seconds"]
    for r in rows.values(): r["cost_vs_first_left"] = r["seconds"] / base
    write_result({"model": a.checkpoint or a.model, "pairs": len(pairs), "spans": a.spans, "corruption": a.corruption,
                  "gaps": att.gaps, "by_rule_and_steps": rows}, a.out)


if __name__ == "__main__":
    main()
