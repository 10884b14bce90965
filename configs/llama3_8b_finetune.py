"""Fine-tune a local Hugging Face Llama-3-8B checkpoint with GaLore (rank 128, as the paper's fine-tuning runs).

Point it at a directory with config.json, safetensors and tokenizer files:
  python train.py --config configs/llama3_8b_finetune.py --config.model.hf_checkpoint=/path/to/Meta-Llama-3-8B \
      --config.data.path=/path/to/my_corpus
The tokenizer is the checkpoint's own (data.tokenizer unset); --config.data.tokenizer=DIR takes another.
"""

from configs.base import base


def get_config():
  c = base()
  c.workdir = "workdir/llama3_8b_finetune"
  c.model.preset = "llama3_8b"
  c.model.hf_checkpoint = "checkpoints/Meta-Llama-3-8B"
  c.model.param_dtype = "bfloat16"
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.data.seq_len = 1024
  c.data.packing = True
  c.train.batch_size = 16
  c.train.grad_accum = 4
  c.train.steps = 2_000
  c.train.lr = 1e-5
  c.train.warmup_steps = 100
  c.train.min_lr_ratio = 0.0
  c.train.grad_clip = 1.0
  c.optimizer.rank = 128
  c.optimizer.update_proj_gap = 200
  c.optimizer.scale = 2.0
  c.optimizer.basis_dtype = "bfloat16"
  c.optimizer.moment_dtype = "bfloat16"
  c.eval.every = 200
  c.checkpoint.every = 500
  return c
