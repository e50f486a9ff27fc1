"""Step time of full fine-tuning vs LoRA on the embedded SmolLM2-135M, plus the no-grad validation forward and
batched greedy generation, at several source-token budgets. Used to size the CPU defaults of
`summcircuit.finetune.TrainingConfig`, `summcircuit.evaluate.RougeConfig` and `summcircuit.lora.BakeoffConfig`.

CPU timings here swing several-fold with the load of other processes, so the compared steps are interleaved
(full, LoRA, eval, for each length, then the next repeat) and the report gives min and median seconds and the
median of the per-repeat LoRA/full ratios. The min is the best estimate of an unloaded machine.

    python benchmarks/bench_training_step.py --lengths 128 160 192 --batch-size 4 --repeats 5 --out bench.json
"""
from __future__ import annotations
import argparse, json, os, statistics, time

import torch

from summcircuit.data import load_aclsum
from summcircuit.evaluate import generate_summaries
from summcircuit.finetune import SummaryCollator, training_prompts
from summcircuit.lora import add_lora
from summcircuit.models import load_model


def train_step(model, opt, inputs, params) -> float:
    "One optimizer step as the Trainer takes it: forward, backward, gradient clipping, AdamW step."
    t = time.perf_counter()
    loss = model(**inputs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 160, 192], help="max_source_tokens values")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--gen-docs", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--out", default=None, help="write the measurements as JSON here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    docs = load_aclsum("train", n=args.batch_size)
    runs = {}
    for kind in ("full", "lora"):
        lm = load_model(args.model, device="cpu")
        model = add_lora(lm, rank=args.rank).peft_model if kind == "lora" else lm.hf
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        runs[kind] = (lm, model, torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01), params)
    tok, spec = runs["full"][0].tokenizer, runs["full"][0].spec
    batches = {L: SummaryCollator(tok.pad_token_id)(training_prompts(docs, tok, spec, L)) for L in args.lengths}
    for kind, (lm, model, opt, params) in runs.items():      # warm-up: allocates AdamW state, not timed
        train_step(model, opt, batches[args.lengths[0]], params)
    times = {(k, L): [] for k in ("full", "lora", "eval") for L in args.lengths}
    for r in range(args.repeats):
        for L, inputs in batches.items():
            for kind, (lm, model, opt, params) in runs.items():
                times[(kind, L)].append(train_step(model, opt, inputs, params))
            model = runs["full"][1]
            model.eval()
            t = time.perf_counter()
            with torch.no_grad(): model(**inputs)
            times[("eval", L)].append(time.perf_counter() - t)
            model.train()
        print(f"repeat {r + 1}/{args.repeats} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    gen_docs = load_aclsum("val", n=args.gen_docs)
    base = load_model(args.model, device="cpu")
    gen = {}
    for L in args.lengths:
        t = time.perf_counter()
        generate_summaries(base, gen_docs, L, args.gen_tokens, batch_size=args.gen_docs, progress=False)
        gen[L] = time.perf_counter() - t
    report = {"batch_size": args.batch_size, "repeats": args.repeats, "load_average_end": os.getloadavg(),
              "tokens": {L: list(b["input_ids"].shape) for L, b in batches.items()}, "per_length": {}}
    print(f"\nbatch {args.batch_size}; seconds per optimizer step (min / median over {args.repeats} interleaved repeats)")
    print("source tokens  batch shape   full step      LoRA step      LoRA/full (median)  eval fwd (min)  "
          f"generate {args.gen_docs}x{args.gen_tokens} tok")
    for L in args.lengths:
        f, l, e = times[("full", L)], times[("lora", L)], times[("eval", L)]
        ratio = statistics.median(b / a for a, b in zip(f, l))
        report["per_length"][L] = {"full": f, "lora": l, "eval": e, "lora_over_full_median": ratio, "generate_s": gen[L]}
        print(f"{L:13d}  {str(tuple(batches[L]['input_ids'].shape)):12s}  {min(f):5.2f} / {statistics.median(f):5.2f}  "
              f"{min(l):5.2f} / {statistics.median(l):5.2f}  {ratio:18.2f}  {min(e):14.2f}  {gen[L]:8.1f}")
    if args.out:
        with open(args.out, "w") as fh: json.dump(report, fh, indent=1)
    return report


if __name__ == "__main__":
    main()
