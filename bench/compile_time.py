"""Compile time of the real train step on abstract shapes: AdamW vs GaLore with each refresh (nothing allocated).

  python bench/compile_time.py [--preset llama_130m] [--vocab 1024] [--seq_len 64]

The GaLore step carries the refresh inside `lax.cond` branches (one per group of equal shapes, with a loop
over the group's leaves); this measures what that costs the compiler, with `batch_refresh` (one batched call
per group) and `stagger` (leaves of a group due on different steps). Writes
bench/results/compile_time-<backend>-<preset>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from galore_jax import galore_adamw  # noqa: E402
from galore_jax.train import steps as train_steps  # noqa: E402
from galore_jax.models import llama  # noqa: E402

RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--preset", default="llama_130m", choices=sorted(RANKS))
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--seq_len", type=int, default=64)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()

  cfg = llama.preset(args.preset, vocab_size=args.vocab, max_position_embeddings=args.seq_len)
  model = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.graphdef(model), train_steps.params_of(model)
  batch = {k: jax.ShapeDtypeStruct((1, args.seq_len), np.float32 if k == "loss_mask" else np.int32)
           for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
  rank = RANKS[args.preset]
  variants = {
      "adamw": optax.adamw(1e-3),
      "galore svd": galore_adamw(1e-3, rank=rank),
      "galore svd + batch_refresh": galore_adamw(1e-3, rank=rank, batch_refresh=True),
      "galore randomized": galore_adamw(1e-3, rank=rank, refresh="randomized"),
      "galore randomized + batch_refresh": galore_adamw(1e-3, rank=rank, refresh="randomized", batch_refresh=True),
      "galore randomized + stagger": galore_adamw(1e-3, rank=rank, refresh="randomized", stagger=True),
  }
  results = {}
  for name, tx in variants.items():
    step = train_steps.make_steps(graphdef, tx, grad_accum=1, packed=False).train
    start = time.perf_counter()
    step.lower(params, jax.eval_shape(tx.init, params), batch).compile()
    results[name] = {"compile_s": time.perf_counter() - start}
    print(f"{name:<36} {results[name]['compile_s']:6.1f} s", flush=True)
  for r in results.values():
    r["ratio_to_adamw"] = r["compile_s"] / results["adamw"]["compile_s"]
  device = jax.devices()[0]
  record = {"date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
            "backend": jax.default_backend(), "device": device.device_kind, "cpu_count": os.cpu_count(),
            "versions": {"jax": jax.__version__, "optax": optax.__version__, "flax": flax.__version__,
                         "python": platform.python_version()},
            "preset": args.preset, "rank": rank, "kernels": 7 * cfg.num_hidden_layers, "results": results}
  out = args.out or f"bench/results/compile_time-{jax.default_backend()}-{args.preset}.json"
  with open(out, "w") as f:
    json.dump(record, f, indent=1)
  print(json.dumps({k: round(v["ratio_to_adamw"], 2) for k, v in results.items()}))


if __name__ == "__main__":
  main()
