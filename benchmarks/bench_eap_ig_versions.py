"""EAP-IG on a long input: this version's ways of scoring against an earlier commit's `attribute`, time and memory.

The earlier version comes out of this repository's history (`git archive REV summcircuit`) into a temporary
folder as the package `summcircuit_REV`, so both versions run on one loaded model in one process. Variants:
`baseline` (the earlier commit), `auto` (this version's default: the whole gradient sum when it fits in
`STREAM_ABOVE_BYTES`, else the last layers' summed and the rest streamed), `streamed` (every pass scored as it
comes) and `summed` (the passes' gradients summed, scored once). Times are interleaved, `--repeats` times, and
reported as ratios to the baseline within each repeat (min and median): single CPU times here swing by 30%.
Peak memory: each variant alone in a fresh process (resident-set peak while it runs), scores compared.

    python benchmarks/bench_eap_ig_versions.py --baseline 6419808 --tokens 1024 --ig-steps 5 --repeats 4
"""
import argparse, importlib, json, statistics, subprocess, sys, tempfile
from pathlib import Path

import torch

from summcircuit.attribute import attribute
from summcircuit.models import load_model

from bench_eap_ig import pair_of_length, peak_rss
from common import timed, write_result

VARIANTS = ("baseline", "auto", "streamed", "summed")
ROOT = Path(__file__).resolve().parents[1]


def baseline_attribute(rev: str, folder: Path):
    "`attribute` of commit `rev`, from a copy of its `summcircuit` package in `folder`."
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "summcircuit"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=tar, check=True)
    (folder / "summcircuit").rename(folder / f"summcircuit_{rev}")
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"summcircuit_{rev}.attribute").attribute


def runner(variant: str, lm, pair, ig_steps: int, baseline):
    "A call that makes `variant`'s EAP-IG attribution of `pair`."
    if variant == "baseline": return lambda: baseline(lm, [pair], "eap-ig", ig_steps=ig_steps, progress=False)
    stream = {"auto": None, "streamed": True, "summed": False}[variant]
    return lambda: attribute(lm, [pair], "eap-ig", ig_steps=ig_steps, progress=False, stream_scores=stream)


def memory_of(variant: str, a) -> dict:
    "Peak memory of one attribution by `variant`, in this (fresh) process."
    lm = load_model(a.model, device="cpu")
    pair = pair_of_length(lm, a.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        run = runner(variant, lm, pair, a.ig_steps, baseline_attribute(a.baseline, Path(tmp)) if variant == "baseline" else None)
        out = {}
        peak, before = peak_rss(lambda: out.update(att=run()))
    return {"peak_rss_GiB": peak / 2**30, "increase_GiB": (peak - before) / 2**30,
            "sum_abs_scores": float(out["att"].scores.abs().sum())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--baseline", default="6419808", help="the earlier commit")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)     # the fresh-process half
    ap.add_argument("--out", default="benchmarks/results/eap_ig_versions.json")
    a = ap.parse_args()
    if a.memory_of: return print(json.dumps(memory_of(a.memory_of, a)))
    memory = {}
    for v in a.variants:                                                 # each in a process that did nothing else
        args = [sys.executable, __file__, "--memory-of", v, "--model", a.model, "--baseline", a.baseline,
                "--tokens", str(a.tokens), "--ig-steps", str(a.ig_steps)]
        memory[v] = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(v, memory[v], flush=True)
    lm = load_model(a.model, device="cpu")
    pair = pair_of_length(lm, a.tokens)
    with tempfile.TemporaryDirectory() as tmp:
        baseline = baseline_attribute(a.baseline, Path(tmp))
        runs = {v: runner(v, lm, pair, a.ig_steps, baseline) for v in a.variants}
        torch.testing.assert_close(runs["auto"]().scores, runs["baseline"]().scores, atol=1e-4, rtol=1e-3)   # also a warm-up
        rows = []
        for r in range(a.repeats):
            rows.append({v: timed(run) for v, run in runs.items()})
            print(f"repeat {r}: " + ", ".join(f"{v} {t:.1f} s" for v, t in rows[-1].items()), flush=True)
    ratios = {v: [row[v] / row["baseline"] for row in rows] for v in a.variants if v != "baseline"}
    write_result({"model": a.model, "tokens": len(pair.clean.input_ids), "ig_steps": a.ig_steps, "baseline": a.baseline,
                  "threads": torch.get_num_threads(), "memory": memory, "times_s": rows,
                  "time_ratio_to_baseline": {v: {"per_repeat": r, "min": min(r), "median": statistics.median(r)}
                                             for v, r in ratios.items()}}, a.out)


if __name__ == "__main__":
    main()
