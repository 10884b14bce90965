"""Parameter and optimizer-state bytes per device under FSDP, from the shardings on abstract shapes (nothing allocated).

  python -m bench.sharding_bytes [--configs llama1b llama7b] [--fsdp 1 2 4 8] [--out PATH]

For each config (its dtypes, rank and gap) and each optimizer (galore_adamw, adamw), lays the
parameters and the optimizer state out on a ``(data=1, fsdp=k)`` mesh of CPU devices with
``galore_jax.train.sharding.Layout.build`` and sums, over leaves, the shard shape's bytes
(``NamedSharding.shard_shape``); GaLore's projector bases are also reported on their own. The data
axis only replicates these trees, so ``data`` does not change the numbers. Writes
bench/results/sharding-state-bytes.json.
"""

from __future__ import annotations

import importlib
import os
import sys

import jax

from bench import common
from galore_jax.optim import basis as projection
from galore_jax.train import config as training, sharding, steps

OPTIMIZERS = ("galore_adamw", "adamw")


def basis_bytes(state, shardings) -> int:
  """Bytes per device of the GaLore bases alone (the leaves under ``Basis`` nodes)."""
  is_basis = lambda x: isinstance(x, projection.Basis)
  states = [x for x in jax.tree.leaves(state, is_leaf=is_basis) if is_basis(x)]
  specs = [x for x in jax.tree.leaves(shardings, is_leaf=is_basis) if is_basis(x)]
  return sum(sharding.bytes_per_device(b, s) for b, s in zip(states, specs))


def measure(config_name: str, optimizer: str, fsdp: int) -> dict:
  cfg = importlib.import_module(f"configs.{config_name}").get_config()
  cfg.optimizer.name = optimizer
  tx = training.build_optimizer(cfg)
  params = steps.params_of(training.abstract_model(cfg))
  state = jax.eval_shape(tx.init, params)
  mesh = sharding.make_mesh(1, fsdp, devices=jax.devices()[:fsdp])
  layout = sharding.Layout.build(mesh, tx, params, cfg.mesh.min_shard_size)
  total = common.tree_bytes
  return {
      "config": config_name, "preset": cfg.model.preset, "optimizer": optimizer, "fsdp": fsdp,
      "rank": cfg.optimizer.rank if optimizer.startswith("galore") else None,
      "param_bytes_total": total(params), "param_bytes_per_device": sharding.bytes_per_device(params, layout.params),
      "opt_state_bytes_total": total(state),
      "opt_state_bytes_per_device": sharding.bytes_per_device(state, layout.opt_state),
      "galore_basis_bytes_per_device": basis_bytes(state, layout.opt_state),
  }


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--configs", nargs="+", default=["llama1b", "llama7b"], help="names of configs/<name>.py")
  ap.add_argument("--fsdp", nargs="+", type=int, default=[1, 2, 4, 8])
  ap.add_argument("--out", default=os.path.join(common.RESULTS, "sharding-state-bytes.json"))
  return ap


def parse(argv: list[str]):
  args = parser().parse_args(argv)
  configs_dir = os.path.join(common.ROOT, "configs")
  for name in args.configs:
    if not os.path.isfile(os.path.join(configs_dir, f"{name}.py")):
      common.fail(f"no config configs/{name}.py")
  if min(args.fsdp) < 1:
    common.fail(f"--fsdp {min(args.fsdp)} must be at least 1")
  return args


def cpu_devices(n: int) -> None:
  """At least ``n`` CPU devices: set before jax starts, or already there (e.g. the test suite's 8)."""
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # the backend has started: it keeps its devices
    pass
  if len(jax.devices("cpu")) < n:
    common.fail(f"--fsdp {n} needs {n} CPU devices; jax started with {len(jax.devices('cpu'))}")


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parse(argv)
  cpu_devices(max(args.fsdp))
  rows = []
  for config_name in args.configs:
    for optimizer in OPTIMIZERS:
      for fsdp in args.fsdp:
        row = measure(config_name, optimizer, fsdp)
        rows.append(row)
        print(f"{config_name:9s} {optimizer:13s} fsdp {fsdp}: params {row['param_bytes_per_device'] / 2**30:7.3f} GiB, "
              f"optimizer state {row['opt_state_bytes_per_device'] / 2**30:7.3f} GiB per device "
              f"(bases {row['galore_basis_bytes_per_device'] / 2**30:.3f} GiB)", flush=True)
  record = {**common.provenance(__spec__.name, argv), "rows": rows}
  print(f"wrote {common.write_json(args.out, record)}")
  return record


if __name__ == "__main__":
  main()
