"""Adafactor (galore_jax.optim.adafactor) step for step against galore-torch 1.0's GaLoreAdafactor."""


import jax
import jax.numpy as jnp
import optax
import pytest

from galore_jax import galore, galore_adafactor, scale_by_adafactor_hf

torch = pytest.importorskip("torch")
galore_torch = pytest.importorskip("galore_torch")

from torch_reference import SHAPES, optax_deltas, relative_error, setup_problem, torch_deltas  # noqa: E402

RANK, GAP, SCALE = 3, 4, 0.25
CONFIGS = {
    "relative_step": dict(),  # the reference's defaults: lr=None, relative step, scale_parameter
    "lr_beta1_wd": dict(lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.1),
    "noscale_clip": dict(scale_parameter=False, clip_threshold=0.5),
    "warmup": dict(warmup_init=True),
}


def torch_updates(problem, proj_type, config):
  group = {"rank": RANK, "update_proj_gap": GAP, "scale": SCALE, "proj_type": proj_type}
  return torch_deltas(lambda groups: galore_torch.GaLoreAdafactor(groups, **config), problem, group)


def jax_updates(problem, proj_type, config):
  config = dict(config)
  lr = config.pop("lr", None)
  return optax_deltas(galore_adafactor(lr, rank=RANK, update_proj_gap=GAP, scale=SCALE, proj_type=proj_type, **config),
                      problem)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_updates_match_reference_until_second_refresh(shape_name, config):
  problem = setup_problem(SHAPES[shape_name], steps=3 * GAP)
  if config == "warmup":  # steps of ~1e-9: small weights, so that torch's deltas are measured exactly
    problem = problem._replace(weight=problem.weight * 1e-7, bias=problem.bias * 1e-7)
  ref = torch_updates(problem, "std", CONFIGS[config])
  ours = jax_updates(problem, "std", CONFIGS[config])
  grads = problem.grads
  for step in range(GAP):  # bases from step 0, before the second refresh at step GAP
    assert relative_error(ours[step][0], ref[step][0]) <= 1e-3, f"weight update, step {step}"
  for step in range(len(grads)):  # the non-GaLore bias: full-rank Adafactor all along
    assert relative_error(ours[step][1], ref[step][1]) <= 1e-3, f"bias update, step {step}"


def test_weight_decay_is_exercised():
  problem = setup_problem(SHAPES["tall"], steps=2)
  with_wd = jax_updates(problem, "std", CONFIGS["lr_beta1_wd"])
  without = jax_updates(problem, "std", dict(CONFIGS["lr_beta1_wd"], weight_decay=0.0))
  assert relative_error(with_wd[0][1], without[0][1]) > 1e-3


def test_factoring_follows_the_projected_shape():
  params = {"attn": jnp.zeros((12, 8)), "norm": jnp.zeros((8,))}
  tx = galore(scale_by_adafactor_hf(beta1=0.9), rank=3, update_proj_gap=4)
  state = tx.init(params).inner_state
  # Flax (in 12, out 8), std: the smaller (output) side is projected, low-rank (12, 3).
  assert state.m["attn"].shape == (12, 3)
  assert state.v_row["attn"].shape == (12,) and state.v_col["attn"].shape == (3,)
  assert isinstance(state.v["attn"], optax.MaskedNode)
  assert state.v["norm"].shape == (8,) and isinstance(state.v_row["norm"], optax.MaskedNode)
  assert all(x.size > 0 for x in jax.tree.leaves(state))


def test_arguments():
  with pytest.raises(ValueError, match="Cannot combine manual `learning_rate` and `relative_step=True`"):
    galore_adafactor(1e-3, relative_step=True)
  with pytest.raises(ValueError, match="learning_rate is required when relative_step=False"):
    galore_adafactor(None, relative_step=False)
  with pytest.raises(ValueError, match="`warmup_init=True` requires `relative_step=True`"):
    galore_adafactor(1e-3, warmup_init=True)
  tx = galore_adafactor(rank=2)
  params = {"mlp": jnp.ones((4, 6))}
  with pytest.raises(ValueError, match="galore_adafactor needs params"):
    tx.update(params, tx.init(params))
