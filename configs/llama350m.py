"""llama_350m: the GaLore paper's C4 pre-training settings (lr 0.01, scale 0.25, T 200, rank 256, seq 256, bf16)."""

from configs.base import paper


def get_config():
  return paper("llama_350m", rank=256, steps=60000, grad_accum=4)
