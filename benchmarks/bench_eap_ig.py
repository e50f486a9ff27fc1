"""EAP-IG cost on the embedded SmolLM2-135M against its floor, and peak memory.

The floor (DESIGN.md) is `ig_steps + 1` plain forward+backward passes of the same model on the same input:
the reference implementation needs (m + 2) forwards and m backwards. We time both *interleaved*, several
times, and report ratios measured in this one run (min and median), never a single absolute time: CPU
timings here swing several-fold between identical runs. Two floors are reported: a plain training-style
backward (weight gradients included, what a naive implementation pays) and an activations-only backward
(weights frozen, what attribution needs). Peak memory is the process's resident-set peak during one
attribution (sampled), with the model's own footprint reported beside it.

    python benchmarks/bench_eap_ig.py --tokens 512 --ig-steps 5 --repeats 3 --memory-tokens 1024
"""
import argparse, statistics, threading, time

import psutil
import torch

from summcircuit.attribute import attribute, destination_gradients, edge_scores, frozen_parameters
from summcircuit.corrupt import make_pair
from summcircuit.data import collate, load_aclsum, summary_logprob
from summcircuit.graph import Graph, node_outputs
from summcircuit.models import load_model

from common import timed, write_result


def pair_of_length(lm, tokens: int):
    "A clean/corrupted ACLSum pair whose source fills `tokens` tokens (whole sentences)."
    for ex in load_aclsum("train"):
        p = make_pair(ex, lm.tokenizer, "mask", max_source_tokens=tokens, max_length=lm.spec.n_ctx)
        if p.clean.summary_start >= 0.9 * tokens: return p
    raise RuntimeError(f"no ACLSum document fills {tokens} source tokens")


def floor(lm, batch, passes: int, weights: bool):
    "`passes` plain forward+backward passes of the task metric."
    hf = lm.hf
    for _ in range(passes):
        if weights:
            summary_logprob(hf(batch.input_ids, attention_mask=batch.attention_mask).logits, batch).sum().backward()
            hf.zero_grad(set_to_none=True)
        else:
            with frozen_parameters(hf):
                emb = hf.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
                summary_logprob(hf(inputs_embeds=emb, attention_mask=batch.attention_mask).logits, batch).sum().backward()


def peak_rss(fn, interval=0.05):
    "Peak resident memory (bytes) of this process while `fn` runs."
    proc, peak, done = psutil.Process(), [proc_rss := psutil.Process().memory_info().rss], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(interval)
    th = threading.Thread(target=sample); th.start()
    try: fn()
    finally: done.set(); th.join()
    return peak[0], proc_rss


def memory_at(lm, tokens: int, ig_steps: int) -> dict:
    "Peak memory of one EAP-IG attribution of one example of `tokens` source tokens."
    pm = pair_of_length(lm, tokens)
    if lm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        attribute(lm, [pm], "eap-ig", ig_steps=ig_steps, progress=False)
        return {"tokens": len(pm.clean.input_ids), "cuda_peak_GiB": torch.cuda.max_memory_allocated() / 2**30}
    batch = collate([pm.clean], lm.tokenizer.pad_token_id)
    floor_peak, floor_before = peak_rss(lambda: floor(lm, batch, 1, True))   # one plain forward+backward, for scale
    peak, before = peak_rss(lambda: attribute(lm, [pm], "eap-ig", ig_steps=ig_steps, progress=False))
    return {"tokens": len(pm.clean.input_ids), "peak_rss_GiB": peak / 2**30,
            "rss_before_GiB (model loaded)": before / 2**30, "increase_GiB": (peak - before) / 2**30,
            "plain_forward_backward_increase_GiB": (floor_peak - floor_before) / 2**30}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--ig-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-tokens", type=int, default=1024)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results/eap_ig.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(a.model, device=a.device)
    pair = pair_of_length(lm, a.tokens)
    clean, corr = (collate([p], lm.tokenizer.pad_token_id).to(lm.device) for p in (pair.clean, pair.corrupted))
    T, m = clean.input_ids.shape[1], a.ig_steps
    print(f"{a.model}: {T} tokens ({pair.clean.summary_start} source), ig_steps={m}, {torch.get_num_threads()} threads, device {lm.device}")
    result = {"model": a.model, "tokens": T, "ig_steps": m}
    if a.memory_tokens:   # first, in a process that has done nothing else: the allocator holds no earlier peaks
        result["memory"] = memory_at(lm, a.memory_tokens, m)
        print("memory:", result["memory"])
    if a.repeats < 1: return write_result(result, a.out)
    run = lambda: attribute(lm, [pair], "eap-ig", ig_steps=m, progress=False)
    run(); floor(lm, clean, 1, True)                                     # warm-up
    rows = []
    for r in range(a.repeats):                                           # interleaved
        rows.append({"ours": timed(run), "floor_weights": timed(lambda: floor(lm, clean, m + 1, True)),
                     "floor_activations": timed(lambda: floor(lm, clean, m + 1, False))})
        print(f"repeat {r}: " + ", ".join(f"{k} {v:.1f} s" for k, v in rows[-1].items()))
    ratios = {k: [row["ours"] / row[k] for row in rows] for k in ("floor_weights", "floor_activations")}
    # where the time goes, one pass each
    g = Graph(lm.spec)
    parts = {"node_outputs x2": timed(lambda: (node_outputs(lm, clean), node_outputs(lm, corr))),
             f"destination_gradients x{m}": timed(lambda: [destination_gradients(lm, clean, graph=g) for _ in range(m)])}
    z = node_outputs(lm, clean); gr = destination_gradients(lm, clean, graph=g)[0]
    parts["edge_scores"] = timed(lambda: edge_scores(g, z, gr))
    result |= {"repeats": rows,
              "ratio_vs_floor_weights": {"min": min(ratios["floor_weights"]), "median": statistics.median(ratios["floor_weights"])},
              "ratio_vs_floor_activations": {"min": min(ratios["floor_activations"]), "median": statistics.median(ratios["floor_activations"])},
              "breakdown_s": parts}
    write_result(result, a.out, omit=("repeats",))


if __name__ == "__main__":
    main()
