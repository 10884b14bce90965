"""A 5M-parameter Llama trained with GaLore in a few minutes on 2 CPU cores (the default config).

Data: the embedded corpus (this machine's Python standard library source), a byte-level BPE trained
on it and cached in the workdir.
"""

from configs.base import base


def get_config():
  c = base()
  c.workdir = "workdir/tiny"
  c.model.preset = "llama_20m"
  c.model.vocab_size = 4096
  c.model.max_position_embeddings = 256
  c.data.seq_len = 128
  c.data.max_bytes = 3_000_000
  c.train.batch_size = 16
  c.train.steps = 400
  c.train.lr = 0.01
  c.train.warmup_steps = 40
  c.train.log_every = 10
  c.optimizer.rank = 64
  c.optimizer.update_proj_gap = 100
  c.eval.every = 100
  c.eval.batches = 4
  c.checkpoint.every = 100
  return c
