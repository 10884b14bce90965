"""llama_1b: the GaLore paper's C4 pre-training settings (lr 0.01, scale 0.25, T 200, rank 512, seq 256, bf16)."""

from configs.base import paper


def get_config():
  return paper("llama_1b", rank=512, steps=100000, grad_accum=16)  # the paper's table says 512; its 1B script used 1024
