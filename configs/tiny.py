"""A few-million-parameter Llama trained with GaLore in a few minutes on 2 CPU cores (the default)."""

from configs.base import base


def get_config():
  c = base()
  c.workdir = "workdir/tiny"
  c.model.preset = "llama_9m"
  c.model.vocab_size = 2048
  c.model.num_hidden_layers = 2
  c.model.max_position_embeddings = 256
  c.data.seq_len = 128
  c.data.max_bytes = 2_000_000
  c.train.batch_size = 16
  c.train.steps = 300
  c.train.lr = 0.01
  c.train.warmup_steps = 30
  c.train.log_every = 10
  c.optimizer.rank = 32
  c.optimizer.update_proj_gap = 50
  c.eval.every = 100
  c.eval.batches = 4
  c.checkpoint.every = 100
  return c
