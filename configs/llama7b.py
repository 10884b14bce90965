"""llama_7b: the GaLore paper's C4 pre-training settings (lr 0.005, scale 0.25, T 500, rank 1024, seq 256, bf16)."""

from configs.base import paper


def get_config():
  c = paper("llama_7b", rank=1024, steps=150000, grad_accum=64, lr=0.005,
            update_proj_gap=500)  # 8 sequences/micro-batch
  # One GPU: bf16 weights and states, the reference's clipping for 7B. See docs/training.md "Llama-7B on one GPU".
  c.train.grad_clip = 1.0
  c.model.remat = True
  return c
