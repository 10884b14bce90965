"""Render a run's metrics.jsonl (loss, eval loss, learning rate, tokens/s) to a PNG.

  python plot.py --workdir workdir/tiny [--out workdir/tiny/metrics.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from galore_jax.train.metrics import read_metrics  # noqa: E402


def series(rows, key):
  points = [(r["step"], r[key]) for r in rows if key in r]
  return [p[0] for p in points], [p[1] for p in points]


def plot(workdir: str, out: str) -> str:
  """Write the figure to ``out`` (``.png`` added when it has no extension, as matplotlib does) and return its path."""
  if os.path.isdir(out):
    raise ValueError(f"--out {out!r} is a directory; give a file name such as {os.path.join(out, 'metrics.png')!r}")
  if not os.path.splitext(out)[1]:
    out += ".png"
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  if not rows:
    raise ValueError(f"no metrics in {os.path.join(workdir, 'metrics.jsonl')!r}")
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  axes[0].plot(*series(rows, "loss"), label="train loss")
  axes[0].plot(*series(rows, "eval_loss"), "o-", label="eval loss")
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("cross-entropy (nats/token)")
  axes[0].legend()
  axes[1].plot(*series(rows, "lr"))
  axes[1].set_xlabel("step")
  axes[1].set_ylabel("learning rate")
  axes[2].plot(*series(rows, "tokens_per_sec"))
  axes[2].set_xlabel("step")
  axes[2].set_ylabel("tokens / s")
  fig.suptitle(workdir)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  try:
    print(plot(args.workdir, args.out or os.path.join(args.workdir, "metrics.png")))
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
