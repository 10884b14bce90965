"""llama_1b: the GaLore paper's C4 pre-training settings (lr 0.01, scale 0.25, T 200, rank 512, seq 256, bf16)."""

from configs.base import base


def get_config():
  c = base()
  c.workdir = "workdir/llama1b"
  c.model.preset = "llama_1b"
  c.model.param_dtype = "bfloat16"
  c.model.dtype = "bfloat16"
  c.data.seq_len = 256
  c.data.packing = False  # the reference truncates/pads each document
  c.train.batch_size = 512  # 131K tokens per step
  c.train.grad_accum = 16
  c.train.steps = 100000
  c.train.warmup_steps = 10000
  c.train.lr = 0.01
  c.optimizer.rank = 512  # the paper's table says 512; its 1B script used 1024
  c.optimizer.update_proj_gap = 200
  c.optimizer.scale = 0.25
  c.optimizer.basis_dtype = "bfloat16"
  c.optimizer.moment_dtype = "bfloat16"
  return c
