"""What XLA holds at the peak of the Llama-7B train step (CPU buffer assignment, nothing allocated), per variant.

  python -m bench.xla_peak [--layers 2 4] [--variants adamw galore_adamw] [--dtypes bfloat16 float32]
                           [--top 12] [--out PATH]

Each (variant, layers, dtype) is compiled in its own process with ``XLA_FLAGS=--xla_dump_to=<tmp>``
(``bench.compile_7b``'s configs: ``configs/llama7b.py`` at 256 tokens per step, the first N layers);
XLA's live-range dump names the values live at the peak of its schedule. They are grouped by the
fusion that produced them (``copy_convert_fusion`` ...) and shape; parameters and optimizer state
are one group, ``argument``. ``--dtypes float32`` compiles the same step with fp32 weights, states
and bases: XLA:CPU then needs no bf16->fp32 copies for its matmuls, so the difference between the
two dtypes is what the CPU's bf16 handling adds. ``temp_gb`` is XLA's temporaries
(``memory_analysis``); with two layer counts, ``temp_gb_per_layer`` is the slope and
``temp_gb_at_32_layers`` the linear extrapolation.
Writes ``bench/results/xla-peak-7b-<backend>.json``.

  python -m bench.xla_peak --from_dump xla-dump-memory-7b.tgz [--top 12]

reads dumps made elsewhere instead (``bench.memory --xla_dump``, packed by ``bench/gpu_7b.sh``: one folder per
variant): each train step's peak composition from its live-range dump, printed as one JSON line per dump.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile

from bench import common, compile_7b

ARGUMENT_PREFIXES = ("params", "opt_state", "batch")


def peak_groups(live_range: str, hlo: str, top: int) -> tuple[float, list[dict]]:
  """Bytes live at the schedule's peak and their largest groups (producing fusion kind, shape)."""
  shapes = dict(re.findall(r"^\s+%(\S+) = (\S+)", hlo, re.M))
  entry = re.search(r"^ENTRY \S+ \((.*)\) -> ", hlo, re.M)  # the step's arguments, whatever jax named them
  arguments = set(re.findall(r"(?:^|, )([^\s:,()]+): ", entry.group(1))) if entry else set()
  section = live_range[live_range.index("(peak):"):]
  section = section[:section.index("Stack trace")] if "Stack trace" in section else section
  sizes, counts = collections.Counter(), collections.Counter()
  for name, size in re.findall(r"^\s+(\S+)\{[^}]*\}: (\d+) bytes", section, re.M):
    kind = "argument" if name in arguments or name.startswith(ARGUMENT_PREFIXES) else re.sub(r"\.\d+$", "", name)
    key = (kind, shapes.get(name, "?").split("{")[0])
    sizes[key] += int(size)
    counts[key] += 1
  groups = [{"kind": kind, "shape": shape, "count": counts[kind, shape], "gb": size / 1e9}
            for (kind, shape), size in sizes.most_common(top)]
  return sum(sizes.values()) / 1e9, groups


def _occupied(spans: list[tuple[str, int, int, tuple[int, int]]], at: int) -> list[tuple[str, int, int]]:
  """The regions ``(name, offset, size)`` of the temp allocation in use at time ``at``, one value per region: a
  loop's carried values, its body's parameters and the tuples holding them are aliases of one buffer (the
  defining value is kept)."""
  aliases = ("arg_tuple", "while", "tuple", "get-tuple-element", "bitcast", "conditional")
  regions = {}
  for name, offset, size, (start, end) in spans:
    if start <= at <= end:
      kept = regions.get((offset, size))
      if kept is None or (kept.startswith(aliases) and not name.startswith(aliases)):
        regions[offset, size] = name
  return [(name, offset, size) for (offset, size), name in regions.items()]


def _union_bytes(regions: list[tuple[str, int, int]]) -> int:
  total, reach = 0, 0
  for _, offset, size in sorted(regions, key=lambda r: r[1]):
    total += max(0, offset + size - max(offset, reach))
    reach = max(reach, offset + size)
  return total


def temp_peak(buffer_assignment: str, live_range: str, top: int) -> tuple[float, list[dict]]:
  """Bytes of XLA's temporaries in use at their peak and their largest groups (fusion kind, shape).

  The live-range dump's own peak sums every value live then, so a value computed in place of another (a
  donated argument updated in place, a loop's carry and its body's parameter) counts twice there. Here only the
  ``preallocated-temp`` allocation counts, as the bytes of it in use at each step of the schedule (its values'
  offsets and live ranges): what the temporaries' size is made of (the allocation can be a little larger, the
  heap's packing leaves gaps).
  """
  block = re.search(r"^allocation \d+: size \d+, preallocated-temp:\n((?: value: .*\n?)*)", buffer_assignment, re.M)
  if not block:
    return 0.0, []
  values = re.findall(r"<\d+ (\S+?)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (\S+)", block.group(1))
  own_shape = {name: re.sub(r"\{[^}]*\}", "", shape) for name, _, _, shape in values}  # a tuple's element: its own
  ranges = {name: (int(a), int(b)) for name, a, b in re.findall(r"^\s+(\S+\{[^}]*\}):(\d+)-(\d+)$", live_range, re.M)}
  key = lambda name: name if "{" in name else name + "{}"
  spans = [(name, int(offset), int(size), ranges[key(name)]) for name, size, offset, _ in values if key(name) in ranges]
  events = sorted({start for *_, (start, _) in spans})
  at = max(events, key=lambda t: _union_bytes(_occupied(spans, t)), default=0)
  occupied = _occupied(spans, at)
  sizes, counts = collections.Counter(), collections.Counter()
  for name, _, size in occupied:
    group = (re.sub(r"\.\d+$", "", name.split("{")[0]), own_shape[name])
    sizes[group] += size
    counts[group] += 1
  groups = [{"kind": kind, "shape": shape, "count": counts[kind, shape], "gb": size / 1e9}
            for (kind, shape), size in sizes.most_common(top)]
  return _union_bytes(occupied) / 1e9, groups


def dumped_peak(live_range_path: str, top: int) -> dict:
  """:func:`peak_groups` and :func:`temp_peak` of one XLA live-range dump, from the final HLO and the buffer
  assignment dumped beside it."""
  texts = {}
  for key, suffix in (("live", "-live-range.txt"), ("hlo", ".txt"), ("assignment", "-buffer-assignment.txt")):
    path = live_range_path.replace("-live-range.txt", suffix)
    texts[key] = open(path).read() if os.path.exists(path) else ""
  live_gb, groups = peak_groups(texts["live"], texts["hlo"], top)
  temp_gb, temp_groups = temp_peak(texts["assignment"], texts["live"], top)
  return {"live_at_peak_gb": live_gb, "peak_groups": groups, "temp_at_peak_gb": temp_gb,
          "temp_peak_groups": temp_groups}


def measure(variant: str, layers: int, dtype: str, top: int) -> dict:
  """Compile one variant in a child process that dumps XLA's buffer assignment; its peak's composition."""
  with tempfile.TemporaryDirectory() as dump:
    env = {**os.environ, "XLA_FLAGS": f"--xla_dump_to={dump}"}
    cmd = [sys.executable, "-m", "bench.xla_peak", "--one", variant, str(layers), dtype]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=common.ROOT)
    if result.returncode:
      raise RuntimeError(f"{variant}: {result.stderr[-2000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    train = [p for p in glob.glob(os.path.join(dump, "*train*-live-range.txt"))]
    if len(train) != 1:
      raise RuntimeError(f"expected one train step dump, found {train}")
    record.update(dumped_peak(train[0], top))
  return record


def dump_rows(path: str, top: int) -> list[dict]:
  """:func:`dumped_peak` of every live-range dump under ``path`` (a folder or a .tgz of one); none: ``[]``."""
  with tempfile.TemporaryDirectory() as unpacked:
    folder = path
    if os.path.isfile(path):
      with tarfile.open(path) as archive:
        archive.extractall(unpacked, filter="data")
      folder = unpacked
    return [{"dump": os.path.relpath(live_path, folder), **dumped_peak(live_path, top)}
            for live_path in sorted(glob.glob(os.path.join(folder, "**", "*-live-range.txt"), recursive=True))]


def from_dump(path: str, top: int) -> list[dict]:
  """:func:`dump_rows`, refusing a path that holds no dump."""
  rows = dump_rows(path, top)
  if not rows:
    common.fail(f"--from_dump {path!r} holds no XLA live-range dump (*-live-range.txt)")
  return rows


def compile_one(variant: str, layers: int, dtype: str) -> dict:
  import jax
  from flax import nnx

  from bench import compile_7b
  from galore_jax.train import config, dry_run, steps

  cfg = compile_7b.config_for(variant, layers)
  if dtype == "float32":
    cfg.model.param_dtype = cfg.model.dtype = "float32"
    cfg.optimizer.moment_dtype = cfg.optimizer.basis_dtype = "float32"
  abstract = config.abstract_model(cfg)
  params = steps.params_of(abstract)
  tx = config.build_optimizer(cfg)
  opt_state = jax.eval_shape(tx.init, params)
  step = steps.make_steps(nnx.graphdef(abstract), tx, grad_accum=1, packed=False,
                          report_overlap=cfg.optimizer.name.startswith("galore"),
                          layerwise_updates=cfg.train.layerwise).train
  memory = step.lower(params, opt_state, dry_run.abstract_batch(cfg)).compile().memory_analysis()
  return {"variant": variant, "layers": layers, "dtype": dtype, "temp_gb": memory.temp_size_in_bytes / 1e9,
          "argument_gb": memory.argument_size_in_bytes / 1e9, "optimizer_state_gb": common.tree_bytes(opt_state) / 1e9,
          "params_gb": common.tree_bytes(params) / 1e9}


def parser() -> common.ArgumentParser:
  ap = common.ArgumentParser(__doc__)
  ap.add_argument("--layers", type=common.int_within(1, 32), nargs="+", default=[2, 4])
  ap.add_argument("--variants", nargs="+", default=["adamw", "galore_adamw"], choices=list(compile_7b.VARIANTS))
  ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
  ap.add_argument("--top", type=common.int_within(0), default=12)
  ap.add_argument("--out", default=None)
  ap.add_argument("--from_dump", default=None, help="read the live-range dumps in this folder or .tgz instead")
  ap.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)
  return ap


def main(argv: list[str] | None = None) -> dict | None:
  argv = sys.argv[1:] if argv is None else argv
  args = parser().parse_args(argv)
  if args.one:
    print(json.dumps(compile_one(args.one[0], int(args.one[1]), args.one[2])))
    return None
  if args.from_dump:
    if not os.path.exists(args.from_dump):
      common.fail(f"--from_dump {args.from_dump!r} does not exist")
    for row in from_dump(args.from_dump, args.top):
      print(json.dumps(row))
    return None
  results = []
  for dtype in args.dtypes:
    for variant in args.variants:
      rows = [measure(variant, n, dtype, args.top) for n in args.layers]
      if len(rows) >= 2:
        slope = (rows[-1]["temp_gb"] - rows[0]["temp_gb"]) / (rows[-1]["layers"] - rows[0]["layers"])
        for r in rows:
          r["temp_gb_per_layer"] = slope
          r["temp_gb_at_32_layers"] = rows[-1]["temp_gb"] + slope * (32 - rows[-1]["layers"])
      for r in rows:
        print(f"{variant:<40} {dtype:<9} L={r['layers']:<3} temp {r['temp_gb']:6.2f} GB", flush=True)
      results += rows
  record = {**common.provenance(__spec__.name, argv), "commit": compile_7b.commit(), "preset": "llama_7b",
            "tokens_per_step": 256, "results": results}
  common.write_json(args.out or os.path.join(common.RESULTS, f"xla-peak-7b-{record['backend']}.json"), record)
  return record


if __name__ == "__main__":
  main()
