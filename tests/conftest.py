"""Shared fixtures: tiny models wrapped the way `load_model` wraps them, and aligned clean/corrupted batches."""
import os, sys

import pytest
from nnsight import NNsight

sys.path.insert(0, os.path.dirname(__file__))
from reference_forward import tiny_gpt2, tiny_llama  # noqa: E402

from summcircuit.data import Batch, build_prompt, collate, synthetic_examples
from summcircuit.models import LoadedModel, arch_spec, byte_tokenizer, load_model


def wrap(hf) -> LoadedModel:
    "Wrap a plain HF model (e.g. the reference module's tiny models, biases randomized) as `load_model` does."
    return LoadedModel(NNsight(hf), byte_tokenizer(), arch_spec(hf.config), hf.config.model_type)


MODELS = {"tiny-gpt2": lambda: load_model("tiny-gpt2", device="cpu"),
          "tiny-llama": lambda: load_model("tiny-llama", device="cpu"),
          "ref-gpt2": lambda: wrap(tiny_gpt2(initializer_range=0.2, n_positions=1024)),
          "ref-llama": lambda: wrap(tiny_llama(initializer_range=0.2, max_position_embeddings=1024))}


@pytest.fixture(params=list(MODELS))
def lm(request) -> LoadedModel:
    "Each of the four tiny models."
    return MODELS[request.param]()


@pytest.fixture(params=["ref-gpt2", "ref-llama"])
def ref_lm(request) -> LoadedModel:
    "The two tiny models with every bias and norm randomized (for the costlier tests)."
    return MODELS[request.param]()


def padded_batch(lm: LoadedModel, n: int = 3, seed: int = 0) -> Batch:
    "Synthetic prompts of different lengths, right-padded (vocabulary capped for the reference models)."
    prompts = [build_prompt(e, lm.tokenizer) for e in synthetic_examples(n, seed=seed)]
    b = collate(prompts, lm.tokenizer.pad_token_id)
    assert b.attention_mask.sum(1).unique().numel() > 1, "want sequences of different lengths"
    return b


def corrupted_copy(batch: Batch, start: int, stop: int, token_id: int = ord("_")) -> Batch:
    "Positions [start, stop) replaced by `token_id`: aligned with `batch` by construction."
    ids = batch.input_ids.clone()
    ids[:, start:stop] = token_id
    return Batch(ids, batch.attention_mask, batch.target_mask, batch.ids)


def run_alone_and_under_torchrun(script, tmp_path, timeout: int = 500) -> None:
    """Run `script FOLDER` as one process into `tmp_path/one` and as two gloo processes (`torchrun
    --nproc_per_node 2`, CPU) into `tmp_path/two`; fail with the end of its stderr if either run fails."""
    import socket, subprocess
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(port), str(script), str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert two.returncode == 0, two.stderr[-3000:]
