"""Fine-tuning: loss on summary tokens only, the checkpoint index, exact resume, and refusing bad input."""
import os, sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from conftest import run_alone_and_under_torchrun, wrap  # noqa: E402

from summcircuit.core import load_json
from summcircuit.data import SummaryExample, collate, synthetic_examples
from summcircuit.finetune import (INDEX_NAME, SummaryCollator, TrainingConfig, finetune, load_checkpoints,
                                  training_prompts)
from summcircuit.models import load_model

CFG = TrainingConfig(max_source_tokens=64, batch_size=2, max_steps=8, checkpoint_every=3, learning_rate=3e-3,
                     warmup_steps=1)
TRAIN, VAL = synthetic_examples(10, seed=1), synthetic_examples(3, seed=2)


def dropout_gpt2():
    "A tiny GPT-2 *with* dropout, so an exact resume also needs the random state restored."
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=257, n_embd=32, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.1, embd_pdrop=0.1,
                     attn_pdrop=0.1, bos_token_id=256, eos_token_id=256, pad_token_id=256)
    lm = wrap(GPT2LMHeadModel(cfg).eval())
    lm.name = "dropout-gpt2"
    return lm


class Crash(TrainerCallback):
    def __init__(self, step): self.step = step
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step: raise KeyboardInterrupt(f"simulated crash at step {self.step}")


def test_labels_are_summary_tokens_only():
    lm = load_model("tiny-llama", device="cpu")
    prompts = training_prompts(TRAIN[:3], lm.tokenizer, lm.spec, 64)
    inputs = SummaryCollator(lm.tokenizer.pad_token_id)(prompts)
    with torch.no_grad(): out = lm.hf(**inputs)
    # independent: cross-entropy of each summary token given the tokens before it, pooled over tokens
    nll = []
    for b, p in enumerate(prompts):
        for t in range(p.summary_start, len(p)):
            nll.append(-torch.log_softmax(out.logits[b, t - 1], -1)[p.input_ids[t]])
    torch.testing.assert_close(out.loss, torch.stack(nll).mean(), rtol=1e-5, atol=1e-6)
    summary_positions = {(b, t) for b, p in enumerate(prompts) for t in range(p.summary_start, len(p))}
    labelled = {tuple(x) for x in (inputs["labels"] != -100).nonzero().tolist()}
    assert labelled == summary_positions


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path):
    whole = dropout_gpt2()
    finetune(whole, TRAIN, VAL, tmp_path / "whole", CFG, seed=3, progress=False)
    crashed = dropout_gpt2()
    with pytest.raises(KeyboardInterrupt):        # dies mid-epoch (5 steps per epoch), after checkpoint 3
        finetune(crashed, TRAIN, VAL, tmp_path / "crash", CFG, seed=3, callbacks=[Crash(5)], progress=False)
    assert [c.step for c in load_checkpoints(tmp_path / "crash")] == [0, 3]
    resumed = dropout_gpt2()                       # a fresh process would start from the base weights
    run = finetune(resumed, TRAIN, VAL, tmp_path / "crash", CFG, seed=3, progress=False)
    assert [c.step for c in run.checkpoints] == [0, 3, 6, 8]
    for (n, p), q in zip(resumed.hf.named_parameters(), whole.hf.parameters()):
        assert torch.equal(p, q), n
    base = dropout_gpt2()
    assert any(not torch.equal(p, q) for p, q in zip(resumed.hf.parameters(), base.hf.parameters()))
    # the resumed run's log has every step once
    steps = [h["step"] for h in run.log_history if "loss" in h]
    assert steps == list(range(1, 9))


def test_index_val_loss_and_checkpoint_folders(tmp_path):
    lm = load_model("tiny-llama", device="cpu")
    finetune(lm, TRAIN, VAL, tmp_path / "r" / "finetune", CFG, progress=False)
    index = load_json(tmp_path / "r" / "finetune" / INDEX_NAME)
    assert [e["step"] for e in index] == [0, 3, 6, 8] and index[0]["path"] == "tiny-llama"
    assert [e["path"] for e in index[1:]] == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    cks = load_checkpoints(tmp_path / "r")
    val = training_prompts(VAL, lm.tokenizer, lm.spec, 64)
    for ck in cks:
        m = load_model(ck.path, device="cpu")          # every checkpoint (and the base) loads with load_model
        # independent validation loss: per evaluation batch, cross-entropy over summary tokens; batches
        # weighted by their size (how Trainer averages eval_loss)
        total, n = 0.0, 0
        for s in range(0, len(val), CFG.batch_size):
            chunk = val[s:s + CFG.batch_size]
            b = collate(chunk, m.tokenizer.pad_token_id)
            with torch.no_grad(): logits = m.hf(b.input_ids, attention_mask=b.attention_mask).logits
            tgt = b.input_ids[:, 1:].masked_fill(~b.target_mask[:, 1:], -100)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
            total, n = total + loss.item() * len(chunk), n + len(chunk)
        assert ck.val_loss == pytest.approx(total / n, rel=1e-5), ck.step
    final = load_model(cks[-1].path, device="cpu")
    for p, q in zip(final.hf.parameters(), lm.hf.parameters()): assert torch.equal(p, q)
    assert cks[-1].val_loss < cks[0].val_loss
    assert (tmp_path / "r" / "finetune" / "checkpoint-8" / "optimizer.pt").exists()
    assert not (tmp_path / "r" / "finetune" / "checkpoint-3" / "optimizer.pt").exists()


def test_epochs_and_gradient_accumulation(tmp_path):
    cfg = TrainingConfig(max_source_tokens=64, batch_size=2, grad_accum=2, max_steps=None, epochs=2,
                         checkpoint_every=2, learning_rate=1e-3, warmup_steps=0)
    run = finetune(load_model("tiny-gpt2", device="cpu"), TRAIN, VAL, tmp_path / "e", cfg, progress=False)
    assert cfg.total_steps(10) == 6                      # 5 batches -> 3 steps per epoch, 2 epochs
    assert [c.step for c in run.checkpoints] == [0, 2, 4, 6]


def snapshot(folder):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_input_fails_clearly_and_overwrites_nothing(tmp_path):
    lm = load_model("tiny-llama", device="cpu")
    folder = tmp_path / "r" / "finetune"
    cfg = TrainingConfig(max_source_tokens=64, batch_size=2, max_steps=2, checkpoint_every=1, learning_rate=1e-3)
    finetune(lm, TRAIN[:4], VAL, folder, cfg, progress=False)
    before = snapshot(folder)
    with pytest.raises(ValueError, match="train split is empty"):
        finetune(lm, [], VAL, folder, cfg)
    with pytest.raises(ValueError, match="val split is empty"):
        finetune(lm, TRAIN, [], folder, cfg)
    with pytest.raises(ValueError, match="lower max_source_tokens"):
        finetune(lm, TRAIN, VAL, folder, TrainingConfig(max_source_tokens=4096))
    long_summary = SummaryExample("long", ["A short source."], "word " * 300)     # 1500 bytes > 1024 context
    with pytest.raises(ValueError, match="'long'.*exceeds the model's context"):
        finetune(lm, [long_summary], VAL, folder, cfg)
    with pytest.raises(ValueError, match="other parameters"):
        finetune(lm, TRAIN[:4], VAL, folder, TrainingConfig(max_source_tokens=64, batch_size=2, max_steps=3,
                                                            checkpoint_every=1, learning_rate=1e-3))
    assert snapshot(folder) == before                    # nothing already saved was touched
    with pytest.raises(FileNotFoundError, match="papermill nbs/stages/finetune.ipynb"):
        load_checkpoints(tmp_path / "other-run")
    (folder / "checkpoint-1" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="checkpoint-1 .step 1. has no model weights"):
        load_checkpoints(tmp_path / "r")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_gloo_processes_match_one_process(tmp_path):
    """`finetune` under `torchrun --nproc_per_node 2` (gloo on CPU; each process takes half of the global batch of 4)
    ends with the weights, checkpoint index and validation losses of one process on the same global batch."""
    from safetensors.torch import load_file
    run_alone_and_under_torchrun(Path(__file__).parent / "ddp_finetune.py", tmp_path)
    index_one, index_two = load_json(tmp_path / "one" / INDEX_NAME), load_json(tmp_path / "two" / INDEX_NAME)
    assert [c["step"] for c in index_one] == [c["step"] for c in index_two] == [0, 3]
    for a, b in zip(index_one, index_two): assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)
    w_one = load_file(tmp_path / "one" / "checkpoint-3" / "model.safetensors")
    w_two = load_file(tmp_path / "two" / "checkpoint-3" / "model.safetensors")
    w_base = load_model("tiny-llama", device="cpu").hf.state_dict()
    assert w_one.keys() == w_two.keys()
    moved = max((w_one[k] - w_base[k]).abs().max().item() for k in w_one)
    assert moved > 1e-3                                        # training changed the weights (the test can fail)
    for k in w_one: torch.testing.assert_close(w_two[k], w_one[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_summcircuit_finetune_under_torchrun_is_what_the_stage_then_finds(tmp_path):
    """`torchrun --nproc_per_node 2 $(which summcircuit) finetune --config smoke` fine-tunes into the run folder;
    the stage (`finetune_stage` with the pipeline's parameters, as its notebook calls it) then finds it finished
    and trains nothing: every checkpoint file is left as it was."""
    import socket, subprocess
    from summcircuit.finetune import finetune_stage
    from summcircuit.core import project_root
    from summcircuit.pipeline import STAGES, load_config, stage_parameters
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), str(Path(sys.executable).parent / "summcircuit"), "finetune", "--config",
                          "smoke", "--runs-root", str(tmp_path)], env=env, capture_output=True, text=True, timeout=500,
                         cwd=project_root())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stdout and res.stdout.count("fine-tuned in") == 1    # one process reports
    folder = tmp_path / "smoke" / "finetune"
    index = load_json(folder / INDEX_NAME)
    assert [c["step"] for c in index] == [0, 2, 4]
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    params = stage_parameters(STAGES[0], load_config("smoke", configs_dir=project_root() / "configs"), project_root() / "nbs")
    os.environ["SUMMCIRCUIT_RUNS"] = str(tmp_path)
    try: result = finetune_stage(**params, progress=False)
    finally: del os.environ["SUMMCIRCUIT_RUNS"]
    assert [c.step for c in result.checkpoints] == [0, 2, 4]
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == stamps
