"""The Python examples of README.md and docs/ run as written: a reader's own names (``params``, ``grads``,
``input_ids_BS``, a checkpoint path) are filled in, and sizes made tiny by replacing a preset's name or a path.
So the front page and the guides cannot drift from the API they show."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_examples(doc: str) -> list[str]:
  with open(os.path.join(ROOT, doc)) as f:
    return re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)


def run_example(code: str, doc: str, namespace: dict, replace: dict | None = None) -> dict:
  for old, new in (replace or {}).items():
    assert old in code, f"{doc}: the example no longer says {old!r}"
    code = code.replace(old, new)
  exec(compile(code, doc, "exec"), namespace)  # noqa: S102 - our own documentation
  return namespace


def tiny_params(seed: int = 0) -> dict:
  """A Llama-like tree: the ``attn``/``mlp`` kernels are what galore_adamw projects, the embedding is not."""
  keys = iter(jax.random.split(jax.random.key(seed), 4))
  return {"embed": jax.random.normal(next(keys), (50, 16)),
          "layers_0": {"attn": {"q_proj": {"kernel": jax.random.normal(next(keys), (16, 16))}},
                       "mlp": {"up_proj": {"kernel": jax.random.normal(next(keys), (16, 40))}}},
          "norm": jnp.ones(16)}


@pytest.mark.parametrize("doc", ["README.md", "docs/optimizer.md"])
def test_the_optimizer_examples_run_and_project(doc):
  from galore_jax.optim import introspect

  (code,) = python_examples(doc)
  params, grads = tiny_params(0), tiny_params(1)
  ns = run_example(code, doc, {"params": params, "grads": grads})
  updates = ns["updates"]
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  # The example's last optimizer is the composed chain: its GaLore step holds bases for the two kernels only.
  (galore_state,) = introspect.galore_states(ns["state"])
  assert sorted(galore_state.bases) == ["layers_0/attn/q_proj/kernel", "layers_0/mlp/up_proj/kernel"]


def test_the_model_guide_examples_run(tmp_path):
  """docs/model.md in order, as a reader runs it: a preset model and generation, an HF checkpoint in and out,
  then the GaLore fine-tuning step on that model (called twice here)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from galore_jax.models import hf

  torch.manual_seed(0)
  transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(tmp_path / "base")
  preset, weights, fine_tune = python_examples("docs/model.md")
  rng = np.random.default_rng(0)
  ns = {"input_ids_BS": rng.integers(0, 101, (2, 8)), "prompt_ids_BP": rng.integers(0, 101, (1, 4)), "tokenizer": None}

  run_example(preset, "docs/model.md", ns, {'llama.preset("llama_60m")': 'llama.preset("llama_9m")'})
  assert ns["logits_BSV"].shape == (2, 8, 32000) and ns["tokens"].shape[0] == 1

  run_example(weights, "docs/model.md", ns, {"path/to/Meta-Llama-3-8B": str(tmp_path / "base"),
                                             "out/my-llama": str(tmp_path / "out")})
  assert hf.from_hf(tmp_path / "out").config == ns["model"].config

  run_example(fine_tune, "docs/model.md", ns)
  batch = {"inputs": ns["input_ids_BS"][:, :-1], "targets": ns["input_ids_BS"][:, 1:]}
  kernel = lambda: np.asarray(ns["model"].layers[0].mlp.up_proj.kernel[...])
  before = kernel()
  losses = [float(ns["train_step"](ns["model"], ns["optimizer"], batch)) for _ in range(2)]
  assert all(np.isfinite(losses)) and not np.array_equal(before, kernel())
