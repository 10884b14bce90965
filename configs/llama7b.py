"""llama_7b: the GaLore paper's C4 pre-training settings (lr 0.005, scale 0.25, T 500, rank 1024, seq 256, bf16)."""

from configs.base import base


def get_config():
  c = base()
  c.workdir = "workdir/llama7b"
  c.model.preset = "llama_7b"
  c.model.param_dtype = "bfloat16"
  c.model.dtype = "bfloat16"
  c.data.seq_len = 256
  c.data.packing = False  # the reference truncates/pads each document
  c.train.batch_size = 512  # 131K tokens per step
  c.train.grad_accum = 64  # 8 sequences per micro-batch
  c.train.steps = 150000
  c.train.warmup_steps = 15000
  c.train.lr = 0.005
  c.optimizer.rank = 1024
  c.optimizer.update_proj_gap = 500
  c.optimizer.scale = 0.25
  c.optimizer.basis_dtype = "bfloat16"
  c.optimizer.moment_dtype = "bfloat16"
  # One GPU: bf16 weights and states, the reference's clipping for 7B. See README "Llama-7B on one GPU".
  c.train.grad_clip = 1.0
  c.model.remat = True
  return c
