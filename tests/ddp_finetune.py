"""Fine-tune the tiny random Llama with `summcircuit.finetune.finetune` into the folder given as the argument: run
alone, or by each process of `torchrun --nproc_per_node 2` (gloo on CPU). Used by `tests/test_finetune.py`."""
import sys

from summcircuit.data import synthetic_examples
from summcircuit.finetune import TrainingConfig, finetune
from summcircuit.models import load_model

# 4 documents and a global batch of 4: every step sees all of them, whatever order a sampler draws them in
cfg = TrainingConfig(max_source_tokens=64, n_train=4, n_val=2, batch_size=4, max_steps=3, checkpoint_every=3,
                     warmup_steps=0, learning_rate=3e-3)
finetune(load_model("tiny-llama", device="cpu"), synthetic_examples(4, seed=0), synthetic_examples(2, seed=7),
         sys.argv[1], cfg, seed=0, progress=False)
import torch.distributed as dist                                  # noqa: E402
if dist.is_initialized(): dist.destroy_process_group()            # else gloo aborts at exit
