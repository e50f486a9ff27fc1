"""A one-variant LoRA bake-off of the tiny random Llama into the folder given as the argument: run alone, or by each
process of `torchrun --nproc_per_node 2` (gloo on CPU). Used by `tests/test_lora.py`."""
import sys

from summcircuit.data import synthetic_examples
from summcircuit.evaluate import RougeConfig
from summcircuit.lora import BakeoffConfig, lora_targeted, run_bakeoff

# 4 documents and a global batch of 4: every step sees all of them, whatever order a sampler draws them in
cfg = BakeoffConfig(max_source_tokens=64, n_train=4, n_val=2, batch_size=4, max_steps=3,
                    eval_every=1, patience=10, warmup_steps=0, learning_rate=2e-2, lora_alpha=8,
                    rouge=RougeConfig(n_eval=2, max_new_tokens=4, gen_batch_size=2))
run_bakeoff("tiny-llama", [lora_targeted([0, 1])], synthetic_examples(4, seed=0), synthetic_examples(2, seed=7),
            synthetic_examples(2, seed=9), sys.argv[1], cfg, progress=False)
import torch.distributed as dist                                  # noqa: E402
if dist.is_initialized(): dist.destroy_process_group()            # else gloo aborts at exit
