"""llama_60m: the GaLore paper's C4 pre-training settings (lr 0.01, scale 0.25, T 200, rank 128, seq 256, bf16)."""

from configs.base import base


def get_config():
  c = base()
  c.workdir = "workdir/llama60m"
  c.model.preset = "llama_60m"
  c.model.param_dtype = "bfloat16"
  c.model.dtype = "bfloat16"
  c.data.seq_len = 256
  c.data.packing = False  # the reference truncates/pads each document
  c.train.batch_size = 512  # 131K tokens per step
  c.train.grad_accum = 4  # 128 sequences per micro-batch
  c.train.steps = 10000
  c.train.warmup_steps = 1000
  c.train.lr = 0.01
  c.optimizer.rank = 128
  c.optimizer.update_proj_gap = 200
  c.optimizer.scale = 0.25
  c.optimizer.basis_dtype = "bfloat16"
  c.optimizer.moment_dtype = "bfloat16"
  return c
