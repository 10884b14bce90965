"""llama_7b on one 24 GB GPU: the GaLore paper's 7B settings with 8-bit GaLore, layerwise updates and remat.

The paper's consumer-GPU recipe (its Fig. 1: 22.0 GB at 256 tokens per step): 8-bit Adam states in the
rank-1024 subspace, each decoder layer updated as soon as its gradient exists (no full gradient set),
layers stacked and swept with ``lax.scan`` (the step compiles in about the time of an AdamW step), on
one device (on a machine with several, make one visible: ``CUDA_VISIBLE_DEVICES=0``).

The token batch is the largest whose analytic total fits 24 GB (``dry_run.sequences_that_fit``, checked
by ``tests/train/test_dry_run.py``): 24 sequences of 256 tokens, one micro-batch (with layerwise
updates every layer's input is kept for the whole batch, so accumulation would not fit more). That is
6K tokens per step where the paper's 7B pre-training took 131K on several GPUs. Check it on your GPU
with ``python train.py --config configs/llama7b_24gb.py --dry_run_compile`` (no allocation). Compiled for an
H100 without one (``python -m bench.config_memory --compile_for h100``), XLA's peak is 22.92 GB
(``bench/results/config_memory-h100-llama7b_24gb.json``: 23.49 GB at 28 sequences, 24.07 GB at 32).
"""

from configs.base import paper

SEQUENCES_PER_STEP = 24  # x 256 tokens = sequences_that_fit(this config, 24.0)


def get_config():
  c = paper("llama_7b", rank=1024, steps=150000, grad_accum=1, lr=0.005, update_proj_gap=500,
            batch_size=SEQUENCES_PER_STEP)
  c.workdir = "workdir/llama7b_24gb"
  c.optimizer.name = "galore_adamw_8bit"
  # At 6K tokens a step, 500 steps take minutes: a refresh must take seconds (see llama7b.py).
  c.optimizer.refresh = "randomized"
  c.train.layerwise = True
  c.train.grad_clip = 1.0  # the reference's 7B clipping; layerwise clips by the global norm with a second sweep
  c.model.scan_layers = True
  c.model.remat = True  # no effect on the layerwise sweep (it recomputes each layer anyway); kept if layerwise is off
  return c
