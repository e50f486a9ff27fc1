"""LoRA: neutral module names, parameter counts (ours = peft's - masked = closed form), layer and head
restriction (only the chosen weights move), early stopping that keeps the best weights, bad input."""
import dataclasses
from itertools import combinations

import pytest

from conftest import run_alone_and_under_torchrun
import torch
from transformers import TrainerControl, TrainerState

from summcircuit.data import synthetic_examples
from summcircuit.evaluate import RougeConfig
from summcircuit.lora import (BakeoffConfig, KeepBest, add_lora, full, lora_circuit, lora_random, lora_targets, run_variant,
                              trainable_parameters, train_lora)
from summcircuit.models import load_model, tiny_model

CFG = BakeoffConfig(max_source_tokens=64, batch_size=2, max_steps=3, eval_every=3, patience=5,
                    warmup_steps=0, learning_rate=2e-2, lora_alpha=8, rouge=RougeConfig(max_new_tokens=4))
TRAIN, VAL = synthetic_examples(6), synthetic_examples(2, seed=9)
MODULE_SETS = [m for k in (1, 2, 3) for m in combinations(("q", "k", "v", "o", "mlp"), k)]


def hand_count(name, layers, modules, rank, heads=None):
    "Closed form from the tiny configs (d=32, 4 heads of 8, d_mlp: GPT-2 128, Llama 64 with 2 kv heads of 8)."
    d, dh = 32, 8
    H, KV, mlp = (4, 4, 128) if name == "tiny-gpt2" else (4, 2, 64)
    total = 0
    for l in layers:
        hs = range(H) if heads is None else heads.get(l, [])
        if heads is not None and not hs: continue
        kvs = {h // (H // KV) for h in hs}
        rows = {"q": len(hs) * dh, "k": len(kvs) * dh, "v": len(kvs) * dh}
        attn = [m for m in ("q", "k", "v") if m in modules]
        if name == "tiny-gpt2" and attn: total += rank * (d + sum(rows[m] for m in attn))   # one LoRA on c_attn
        else: total += sum(rank * (d + rows[m]) for m in attn)
        if "o" in modules: total += rank * (len(hs) * dh + d)
        if "mlp" in modules:
            total += rank * (d + mlp) * (2 if name == "tiny-gpt2" else 3)
    return total


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("modules", MODULE_SETS, ids="-".join)
def test_parameter_counts(name, modules):
    for layers, heads in (([0, 1, 2], None), ([2], None), (None, {1: [0, 3], 2: [2]})):
        lm = load_model(name, device="cpu")
        lo = add_lora(lm, layers, modules, heads, rank=4)
        expected = hand_count(name, layers or [0, 1, 2], modules, 4, heads)
        assert lo.trainable == lo.closed_form == expected
        assert lo.peft_count == trainable_parameters(lo.peft_model)        # peft's own count, whole matrices
        assert lo.trainable == lo.peft_count - lo.masked
        # the masked entries really are zero and stay zero
        for t in lo.targets:
            mod = lm.hf.get_submodule(t.path)
            if t.rows is not None: assert not mod.lora_B["default"].weight[~t.rows].any()
            if t.cols is not None: assert not mod.lora_A["default"].weight[:, ~t.cols].any()


def merged_changes(lm, lora, name):
    merged = lora.peft_model.merge_and_unload()
    base = tiny_model(name).state_dict()
    return {n: p - base[n] for n, p in merged.state_dict().items() if not torch.equal(p, base[n])}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_only_chosen_layers_move(name):
    lm = load_model(name, device="cpu")
    lora, outcome = train_lora(lm, TRAIN, VAL, layers=[0, 2], modules=("q", "v", "o", "mlp"), rank=4, cfg=CFG,
                               progress=False)
    changed = merged_changes(lm, lora, name)
    expected = {t.path + ".weight" for t in lora.targets}
    assert set(changed) == expected
    assert {int(n.split(".")[2]) for n in changed} == {0, 2}       # model.layers.<l>... / transformer.h.<l>...
    assert outcome.steps_run == 3 and [s for s, _ in outcome.curve] == [0, 3]


def test_heads_restriction_llama():
    "Heads {1: [2, 3]} of tiny Llama (2 query heads per kv head): q rows of heads 2, 3; k/v rows of kv head 1; o columns of heads 2, 3."
    lm = load_model("tiny-llama", device="cpu")
    lora, _ = train_lora(lm, TRAIN, VAL, heads={1: [2, 3]}, modules=("q", "k", "v", "o"), rank=4, cfg=CFG, progress=False)
    ch = merged_changes(lm, lora, "tiny-llama")
    assert set(ch) == {f"model.layers.1.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    rows_moved = lambda w: (w.abs().sum(1) > 0).nonzero().flatten().tolist()        # weights are [out, in]
    assert rows_moved(ch["model.layers.1.self_attn.q_proj.weight"]) == list(range(16, 32))
    assert rows_moved(ch["model.layers.1.self_attn.k_proj.weight"]) == list(range(8, 16))
    assert rows_moved(ch["model.layers.1.self_attn.v_proj.weight"]) == list(range(8, 16))
    assert rows_moved(ch["model.layers.1.self_attn.o_proj.weight"].T) == list(range(16, 32))


def test_gpt2_fused_qkv_choice():
    "GPT-2 `c_attn` is [in, q|k|v]: asking for k alone moves only the key columns."
    lm = load_model("tiny-gpt2", device="cpu")
    lora, _ = train_lora(lm, TRAIN, VAL, layers=[1], modules=("k",), rank=4, cfg=CFG, progress=False)
    ch = merged_changes(lm, lora, "tiny-gpt2")
    assert set(ch) == {"transformer.h.1.attn.c_attn.weight"}
    cols = (ch["transformer.h.1.attn.c_attn.weight"].abs().sum(0) > 0).nonzero().flatten().tolist()
    assert cols == list(range(32, 64))


def test_early_stopping_keeps_the_best_weights():
    model = torch.nn.Linear(2, 2)
    keep = KeepBest(model, patience=2)
    state, control = TrainerState(), TrainerControl()
    values = {}
    for step, loss in [(0, 3.0), (2, 2.0), (4, 2.5), (6, 2.6), (8, 1.0)]:
        state.global_step = step
        with torch.no_grad(): model.weight.fill_(step)
        values[step] = model.weight.clone()
        keep.on_evaluate(None, state, control, metrics={"eval_loss": loss})
        if control.should_training_stop: break
    assert step == 6 and keep.best_step == 2 and keep.best_loss == 2.0     # two evaluations without a new best
    keep.on_train_end(None, state, control)
    assert torch.equal(model.weight, values[2])
    assert keep.curve == [(0, 3.0), (2, 2.0), (4, 2.5), (6, 2.6)]


def test_run_variant_reports_counts_and_rouge():
    r = run_variant("tiny-llama", lora_circuit([(1, 0), (2, 3)]), TRAIN, VAL, synthetic_examples(3, seed=4),
                    CFG, seed=0, progress=False)
    assert r.layers == [1, 2] and r.heads == {"1": [0], "2": [3]}
    # q rows of one head and v rows of its kv head, at two layers: 2 * 8 * ((32 + 8) + (32 + 8))
    assert r.trainable_params == r.counts["closed_form"] == r.counts["library"] == 2 * 8 * 80
    assert len(r.rouge.predictions) == 3 and r.wall_s > 0
    everything = run_variant("tiny-llama", full(), TRAIN, VAL, synthetic_examples(2, seed=4), CFG, progress=False)
    assert everything.trainable_params == sum(p.numel() for p in tiny_model("tiny-llama").parameters())


def test_bad_input():
    lm = load_model("tiny-llama", device="cpu")
    with pytest.raises(IndexError, match="layers 0..2"):
        lora_targets(lm.spec, [3], ("q",))
    with pytest.raises(ValueError, match="unknown: use names from"):
        add_lora(lm, [0], ("gate",))
    with pytest.raises(IndexError, match="heads 0..3"):
        lora_targets(lm.spec, None, ("q",), heads={0: [4]})
    bogus = dataclasses.replace(lm.spec, o_proj="self_attn.out_proj")     # a module this model lacks
    lm.spec = bogus
    with pytest.raises(ValueError, match="has no module 'model.layers.0.self_attn.out_proj'"):
        add_lora(lm, [0], ("o",))
    with pytest.raises(ValueError, match="pick 1..3"):
        lora_random(5, 0).resolve(lm.spec)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bakeoff_under_two_gloo_processes_matches_one_process(tmp_path):
    """`run_bakeoff` under `torchrun --nproc_per_node 2` (gloo on CPU; each process takes half of the global batch of
    4) trains the variant to the validation curve of one process on the same global batch; only the lead process
    writes, and it writes what one process writes."""
    from pathlib import Path
    from summcircuit.core import load_json
    run_alone_and_under_torchrun(Path(__file__).parent / "ddp_bakeoff.py", tmp_path)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir()) \
        == ["base.json", "lora_targeted-s0.json"]
    a, b = (load_json(tmp_path / run / "lora_targeted-s0.json") for run in ("one", "two"))
    assert [s for s, _ in a["val_curve"]] == [s for s, _ in b["val_curve"]] == [0, 1, 2, 3]
    for (_, la), (_, lb) in zip(a["val_curve"], b["val_curve"]): assert lb == pytest.approx(la, abs=1e-5)
    assert abs(a["val_curve"][-1][1] - a["val_curve"][0][1]) > 1e-3     # training moved the loss (the test can fail)
    assert (a["best_step"], a["steps_run"], a["trainable_params"]) == (b["best_step"], b["steps_run"], b["trainable_params"])
    assert a["rouge"]["ids"] == b["rouge"]["ids"]


def test_bakeoff_command_needs_the_runs_analyses(tmp_path, capsys):
    "`summcircuit bakeoff` on a run without its differential analysis stops with the fix, before any training."
    from summcircuit.cli import main
    assert main(["bakeoff", "--config", "smoke", "--runs-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "differential analysis" in err and "targeted_layers" in err
    assert not (tmp_path / "smoke" / "peft").exists()
