"""Defaults shared by every config; a config file starts from `base()` (or `paper()`) and changes what differs."""

from ml_collections import config_dict

from galore_jax.train import config

placeholder = config_dict.placeholder


def base() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.workdir = "workdir/run"
  c.seed = 0

  c.model = config_dict.ConfigDict()
  c.model.preset = "llama_60m"
  c.model.hf_checkpoint = placeholder(str)  # a local HF Llama directory to start from
  # Field overrides of the preset (None = the preset's value).
  c.model.vocab_size = placeholder(int)
  c.model.hidden_size = placeholder(int)
  c.model.intermediate_size = placeholder(int)
  c.model.num_hidden_layers = placeholder(int)
  c.model.num_attention_heads = placeholder(int)
  c.model.num_key_value_heads = placeholder(int)
  c.model.max_position_embeddings = placeholder(int)
  c.model.tie_word_embeddings = placeholder(bool)
  c.model.param_dtype = "float32"
  c.model.dtype = "float32"
  c.model.remat = False
  c.model.remat_policy = "nothing_saveable"
  c.model.scan_layers = False

  c.data = config_dict.ConfigDict()
  c.data.path = placeholder(str)  # None: the embedded corpus (the Python standard library's source)
  c.data.tokenizer = placeholder(str)  # None: a byte-level BPE trained on the corpus, cached in the workdir
  c.data.seq_len = 256
  c.data.packing = True
  c.data.validation_fraction = 0.05
  # Caps on what is read of data.path, a prefix of its documents; 0 = none (the embedded corpus stops at 8 MB).
  c.data.max_documents = 0
  c.data.max_bytes = 0
  c.data.tokenizer_train_bytes = 1_000_000_000  # a trained tokenizer learns from a sample this big; 0 = all
  c.data.text_field = "text"

  c.train = config_dict.ConfigDict()
  c.train.batch_size = 512  # sequences per optimizer step
  c.train.grad_accum = 1  # micro-batches per optimizer step
  c.train.steps = 10_000
  c.train.lr = 0.01
  c.train.warmup_steps = 1_000
  c.train.min_lr_ratio = 0.1
  c.train.grad_clip = 0.0  # global-norm clipping; 0 = off (the reference's default)
  c.train.layerwise = False  # update each layer as soon as its gradient exists (no full gradient tree)
  c.train.log_every = 10
  # A step whose loss or gradient norm is NaN/inf: "skip" (the step changes nothing: weights, moments, GaLore
  # bases) or "stop" (the run ends at the first one). Either way it is logged and never checkpointed.
  c.train.nonfinite = "skip"
  c.train.max_nonfinite_steps = 3  # "skip": this many non-finite steps in a row end the run (exit code 3)

  c.optimizer = config_dict.ConfigDict()
  # galore_adamw_8bit, galore_adafactor, fira_adamw, apollo_adamw, apollo_mini, golore_adamw, q_galore_adamw, adamw,
  # adamw_8bit
  c.optimizer.name = "galore_adamw"
  # GaLore: every field of galore_jax.GaLoreOptions but target / dimension_numbers (docs/optimizer.md), with its
  # default: rank 128, update_proj_gap 200, scale 0.25, proj_type "std", on_refresh "keep", basis_dtype "float32",
  # refresh "svd", refresh_seed 0, stagger / batch_refresh / adaptive_gap False. fira_adamw reads them all (scale is
  # Fira's alpha); apollo_* read neither scale nor refresh (apollo_scale and apollo_proj below), apollo_mini no rank
  # (APOLLO-Mini is rank 1); golore_adamw always carries the first moment (on_refresh "project_first", the
  # reference's); q_galore_adamw always has basis_dtype "int4" (groups of basis_group_size, default 256) and
  # adaptive_gap on.
  c.optimizer.update(config.galore_option_defaults())
  c.optimizer.norm_growth_limit = 1.01  # fira_adamw, apollo_*: growth factor of the norm-growth limiter; 0 = off
  c.optimizer.apollo_scale = placeholder(float)  # apollo_*: the reference's --apollo_scale (applied as its square
  #   root); None = the method's: 1 (apollo_adamw), 128 (apollo_mini)
  c.optimizer.apollo_scale_type = "channel"  # apollo_adamw: "channel" or "tensor" (apollo_mini: always tensor)
  c.optimizer.apollo_proj = "random"  # apollo_*: "random" (Gaussian, re-drawn every update_proj_gap) or "svd"
  c.optimizer.golore_switch_step = placeholder(int)  # golore_adamw: first step of random bases; None = 80% of
  #   train.steps (the reference's --rand_ratio 0.8)
  c.optimizer.apollo_scale_front = False  # apollo_*: multiply by sqrt(apollo_scale) before the limiter
  c.optimizer.weight_decay = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-6
  c.optimizer.moment_dtype = placeholder(str)
  c.optimizer.adafactor_beta1 = placeholder(float)  # galore_adafactor: None = no first moment (the reference)
  c.optimizer.block_size = 256  # 8-bit states: 256 or 2048 elements per absmax block
  c.optimizer.min_8bit_size = 4096  # 8-bit states: smaller leaves keep fp32 moments

  c.eval = config_dict.ConfigDict()
  c.eval.every = 500
  c.eval.batches = 8
  c.eval.batch_size = placeholder(int)  # None: train.batch_size // train.grad_accum

  c.mesh = config_dict.ConfigDict()  # data parallel x FSDP over all devices (galore_jax/train/sharding.py)
  c.mesh.data = 1  # batch-only axis; -1 = all devices that mesh.fsdp leaves
  c.mesh.fsdp = -1  # batch + parameters + optimizer state; -1 = all remaining devices (1 on one device)
  c.mesh.axis_types = "auto"  # or "explicit" (the step body then runs under jax.sharding.auto_axes)
  c.mesh.min_shard_size = 2**14  # parameters with fewer elements are replicated

  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every = 1_000
  c.checkpoint.keep = 2
  c.checkpoint.async_save = True
  # None: resume from the latest checkpoint. N: resume from saved step N (e.g. when the latest is damaged, or
  # to retry after a divergence); the later steps are moved to <workdir>/checkpoints.set_aside, not deleted.
  c.checkpoint.resume_step = placeholder(int)
  return c


def paper(preset: str, *, rank: int, steps: int, grad_accum: int, lr: float = 0.01, update_proj_gap: int = 200,
          batch_size: int = 512) -> config_dict.ConfigDict:
  """The GaLore paper's C4 pre-training settings: bf16, seq 256, 512 sequences (131K tokens) per step,
  scale 0.25, warmup over the first 10% of steps; padded rows as the reference (no packing)."""
  c = base()
  c.workdir = f"workdir/{preset.replace('_', '')}"
  c.model.preset = preset
  c.model.param_dtype = "bfloat16"
  c.model.dtype = "bfloat16"
  c.data.seq_len = 256
  c.data.packing = False  # the reference truncates/pads each document
  c.train.batch_size = batch_size
  c.train.grad_accum = grad_accum
  c.train.steps = steps
  c.train.warmup_steps = steps // 10
  c.train.lr = lr
  c.optimizer.rank = rank
  c.optimizer.update_proj_gap = update_proj_gap
  c.optimizer.scale = 0.25
  c.optimizer.basis_dtype = "bfloat16"
  c.optimizer.moment_dtype = "bfloat16"
  return c
