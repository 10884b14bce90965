"""Every bench script's documented invocation is valid: the defaults its usage line documents are the parser's, its
list defaults name things that exist, and a bad entry is one line `error: ...` with exit code 2 (issue 20)."""

import importlib
import os
import re
import shlex
import subprocess
import time

import pytest

from bench import common, compile_time, exact_refresh, memory, refresh, skip_nonfinite, speed, step_time, tiny_quality

SCRIPTS = ["adam8bit_chunks", "compile_7b", "compile_time", "config_memory", "data_pipeline", "exact_refresh",
           "family_memory", "memory", "quantized_bases", "refresh", "refresh_parts", "report", "sharding_bytes",
           "skip_nonfinite", "skip_time", "speed", "step_time", "tiny_quality", "train_run", "xla_peak"]
METAVAR = re.compile(r"[A-Z][A-Z_=]*|a,b|.*[<|].*")  # N, PATH, KEY=VALUE, a,b, float32|bfloat16, ...<backend>


def documented_defaults(module) -> dict[str, str]:
  """``{dest: value}`` of every ``[--flag value]`` in the module's usage lines whose value is a literal."""
  usage = module.__doc__.split("\n\n")[1]
  found = re.findall(r"\[--(\w+) ([^\]]+)\]", usage)
  return {flag: value for flag, value in found if not METAVAR.fullmatch(value) and "..." not in value}


def as_documented(value) -> str:
  return " ".join(map(str, value)) if isinstance(value, list) else str(value)


@pytest.mark.parametrize("name", SCRIPTS)
def test_usage_line_documents_the_parsers_defaults(name):
  module = importlib.import_module(f"bench.{name}")
  assert module.__doc__.split("\n\n")[1].lstrip().startswith(f"python -m bench.{name}")
  defaults = vars(module.parser().parse_args([]))
  documented = documented_defaults(module)
  for flag, value in documented.items():
    dest = "overrides" if flag == "set" else flag
    assert as_documented(defaults[dest]) == value, (name, flag)


def test_usage_lines_document_the_main_defaults():
  """The check above is not vacuous: the defaults a user meets first are all in a usage line."""
  assert documented_defaults(refresh) == {"preset": "llama_1b", "layers": "1", "model": "llama_20m",
                                          "quality_steps": "200", "train_steps": "300"}
  assert documented_defaults(memory) == {"presets": "llama_7b llama_1b", "tokens": "256"}
  assert documented_defaults(speed) == {"preset": "llama_20m", "tokens": "4096", "seq_len": "256", "steps": "10"}


def test_default_lists_resolve_to_known_names():
  """parse([]) validates without running anything heavy; every default name exists."""
  assert refresh.parse([]).fast == list(refresh.FAST)
  assert refresh.parse([]).rank == 512 and refresh.parse([]).exact_layers == 1
  assert exact_refresh.parse([]).rank == 128 and exact_refresh.parse([]).shapes_preset is None
  assert exact_refresh.parse([]).later == 10
  assert memory.parse([]).variants == list(memory.VARIANTS)
  assert skip_nonfinite.parse([]).cases[-1] == ("llama_7b", 32, "scanned")
  assert compile_time.parse([]).variants == list(compile_time.VARIANTS)
  assert speed.parse([]).only == list(speed.optimizers(common.paper_settings("llama_20m")))
  args = step_time.parse([])
  assert args.only == list(step_time.optimizers(args.settings)) and args.layers == 24 and args.settings["rank"] == 256
  assert set(tiny_quality.parse([]).variants) <= set(tiny_quality.VARIANTS)
  assert os.path.isfile(os.path.join(common.ROOT, tiny_quality.CONFIG))


def test_no_benchmark_name_holds_the_list_separator():
  tables = [refresh.FAST, memory.VARIANTS, compile_time.VARIANTS, speed.optimizers(common.paper_settings("llama_9m")),
            step_time.optimizers(common.paper_settings("llama_9m"))]
  assert not [name for table in tables for name in table if common.SEPARATOR in name]


@pytest.mark.parametrize("module, argv, message", [
    (refresh, ["--fast", "randomized,randomized(q=1"], "error: unknown fast refresh 'randomized(q=1'; choose from "),
    (memory, ["--variants", "adamw (bf16 states),adamw"], "error: unknown variant 'adamw'; choose from "),
    (compile_time, ["--variants", "galore svd,galore eigh"], "error: unknown variant 'galore eigh'; choose from "),
    (speed, ["--only", "adamw,galore"], "error: unknown optimizer 'galore'; choose from "),
    (step_time, ["--only", "adam"], "error: unknown optimizer 'adam'; choose from "),
    (refresh, ["--preset", "llama_2b"], "error: argument --preset: invalid choice: 'llama_2b'"),
    (refresh, ["--layers", "25"], "error: --layers 25 is not within 1..24 (llama_1b)"),
    (exact_refresh, ["--repeats", "0"], "error: --repeats 0 and --shapes_repeats 2 must be at least 1"),
    (exact_refresh, ["--shapes_preset", "llama_2b"], "error: argument --shapes_preset: invalid choice: 'llama_2b'"),
    (speed, ["--tokens", "100"], "error: --tokens 100 is not a positive multiple of --seq_len 256"),
    (step_time, ["--preset", "llama_9m", "--layers", "0"], "error: --layers 0 is not within 1..4 (llama_9m)"),
    (compile_time, ["--vocab", "0"], "error: argument --vocab: must be at least 1, got 0"),
    (skip_nonfinite, ["--cases", "llama_7b:8"], "error: --cases 'llama_7b:8' is not preset:layers:layout (a preset"),
    (skip_nonfinite, ["--cases", "llama_9m:5:scanned"], "error: --cases 'llama_9m:5:scanned': llama_9m has 4 layers"),
    (skip_nonfinite, ["--variants", "galore_sgd"], "error: unknown variant 'galore_sgd'; choose from "),
    (memory, ["--xla_dump", "/tmp/d"], "error: --xla_dump '/tmp/d' needs --real_step or --compile_for (the dump "),
    (memory, ["--compile_for", "rtx9090"], "error: --compile_for 'rtx9090': the GPU targets are ['h100'] (bench/"),
    (memory, ["--compile_for", "h100", "--real_step"], "error: --compile_for 'h100' compiles for a GPU that is not "),
])
def test_a_bad_entry_is_one_line_naming_it(capsys, module, argv, message):
  with pytest.raises(SystemExit, match="^2$"):
    module.parse(argv)
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--config", "configs/nope.py"], "error: --config 'configs/nope.py' is not a config file of this checkout"),
    (["--config", "configs/tiny.py", "--compile_for", "v100"], "error: --compile_for 'v100': the GPU targets are "),
])
def test_config_memory_refuses_a_config_or_target_it_cannot_compile(capsys, argv, message):
  from bench import config_memory

  with pytest.raises(SystemExit, match="^2$"):
    config_memory.parse(argv)
  err = capsys.readouterr().err
  assert err.startswith(message) and err.count("\n") == 1


def test_compiling_for_a_gpu_without_its_plugin_says_how_to_install_it(capsys, monkeypatch, tmp_path):
  monkeypatch.setenv("GPU_AOT_PLUGIN", str(tmp_path))
  with pytest.raises(SystemExit, match="^2$"):
    memory.parse(["--compile_for", "h100"])
  assert capsys.readouterr().err == (f"error: --compile_for 'h100' needs jax's CUDA plugin in {str(tmp_path)!r}: "
                                     "run `make .venv/gpu_aot/.installed`\n")


@pytest.mark.parametrize("name, argv, message", [
    ("compile_7b", ["--layers", "40"], "error: argument --layers: 40 is not within 1..32"),
    ("compile_7b", ["--repeats", "0"], "error: argument --repeats: must be at least 1, got 0"),
    ("refresh_parts", ["--repeats", "0"], "error: argument --repeats: must be at least 1, got 0"),
    ("xla_peak", ["--layers", "2", "0"], "error: argument --layers: 0 is not within 1..32"),
    ("xla_peak", ["--top", "x"], "error: argument --top: invalid int value: 'x'"),
    ("data_pipeline", ["--megabytes", "0"], "error: argument --megabytes: must be at least 1, got 0"),
    ("config_memory", ["--config", "configs/tiny.py", "--sequences", "0"],
     "error: argument --sequences: must be at least 1, got 0"),
    ("data_pipeline", ["--vocab", "100"], "error: argument --vocab: must be at least 259, got 100"),
])
def test_a_bad_number_is_refused_by_the_parser(capsys, name, argv, message):
  with pytest.raises(SystemExit, match="^2$"):
    importlib.import_module(f"bench.{name}").parser().parse_args(argv)
  assert capsys.readouterr().err == message + "\n"


def test_train_run_refuses_a_workdir_it_did_not_make(tmp_path, capsys):
  from bench import train_run

  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "checkpoints").mkdir()
  with pytest.raises(SystemExit, match="^2$"):
    train_run.parse(["--workdir", str(tmp_path / "run")])
  assert capsys.readouterr().err.startswith(f"error: --workdir '{tmp_path / 'run'}' exists and was not made by ")
  assert (tmp_path / "run" / "checkpoints").is_dir()
  train_run.fresh_workdir(str(tmp_path / "mine"))
  assert train_run.parse(["--workdir", str(tmp_path / "mine")]).workdir == str(tmp_path / "mine")


def test_gpu_7b_default_commands_parse():
  """The device script's full-size commands (printed, not run) are valid invocations of their scripts."""
  printed = subprocess.run(["bash", os.path.join(common.ROOT, "bench", "gpu_7b.sh")], env=dict(os.environ,
                           GPU_7B_PRINT="1"), capture_output=True, text=True, check=True).stdout.strip().splitlines()
  modules = []
  for line in printed:
    _, _, module, *argv = shlex.split(line)
    args = importlib.import_module(module).parse(argv)
    modules.append(module)
    if module == "bench.memory":
      assert args.presets == ["llama_7b"] and args.tokens == 256 and args.real_step and args.layers is None
      assert args.scan_layers  # unrolled, the layerwise 7B step compiles for ~15 min (compile-7b-cpu.json)
      assert args.xla_dump  # each variant's compiled step, packed by pack_dump
      assert args.variants == ["galore_adamw_8bit + layerwise", "galore_adamw (fp32 states) + layerwise",
                               "adamw (bf16 states)", "galore_adamw (bf16 states)"]
    elif module == "bench.refresh":
      assert (args.preset, args.layers, args.exact_layers, args.direct_layers, args.rank) == ("llama_7b", 32, 4, 1,
                                                                                               1024)
      assert args.fast == ["randomized"] and args.skip_quality and args.skip_train and args.skip_batch_refresh
    else:
      assert args.config == "configs/llama7b.py" and args.batch_size * 256 == 2048
  assert modules == ["bench.memory", "bench.refresh", "bench.train_run"]


def test_gpu_7b_returns_when_its_last_part_ends(tmp_path):
  """The progress loop's 30 s sleep does not hold the script's output open: a caller reading it (the device
  tool) is not kept waiting after the parts end. Here the one part is a 2 s stand-in; a held pipe takes 30 s."""
  stand_in = tmp_path / "python"
  stand_in.write_text("#!/bin/sh\nsleep 2\n")
  stand_in.chmod(0o755)
  env = dict(os.environ, PARTS="train", OUT=str(tmp_path), PYTHON=str(stand_in),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path))
  start = time.monotonic()
  subprocess.run(["bash", os.path.join(common.ROOT, "bench", "gpu_7b.sh")], env=env, capture_output=True, check=True,
                 timeout=120)
  assert time.monotonic() - start < 20


@pytest.mark.parametrize("variant, stacked", [("adamw", False), ("galore_adamw_8bit + layerwise", False),
                                              ("galore_adamw (scanned)", True)])
@pytest.mark.parametrize("configured_batch", [False, True])
def test_compile_7b_variants_name_their_layout_whatever_the_configs(variant, stacked, configured_batch):
  from bench import compile_7b

  cfg = compile_7b.config_for(variant, None, configured_batch)
  assert cfg.model.scan_layers is stacked  # not the config's default: the unrolled rows stay unrolled
  batch = (cfg.train.batch_size, cfg.train.grad_accum)
  assert batch == ((512, 64) if configured_batch else (1, 1)) and cfg.data.seq_len == 256


def test_ranks_and_settings_come_from_the_paper_configs():
  from configs import llama1b, llama7b

  assert common.rank("llama_1b") == llama1b.get_config().optimizer.rank == 512
  seven = llama7b.get_config()
  assert common.paper_settings("llama_7b") == {"rank": seven.optimizer.rank, "update_proj_gap": 500,
                                                "scale": seven.optimizer.scale, "lr": seven.train.lr}
  assert common.rank("llama_35m") == 384 // 4  # no paper config: a quarter of the hidden size
  with pytest.raises(ValueError, match="unknown preset 'llama_2b'"):
    common.run_config("llama_2b")
  assert common.layer_kernels(common.llama.preset("llama_1b")) == {
      "attn/k_proj": (2048, 2048), "attn/o_proj": (2048, 2048), "attn/q_proj": (2048, 2048),
      "attn/v_proj": (2048, 2048), "mlp/down_proj": (5461, 2048), "mlp/gate_proj": (2048, 5461),
      "mlp/up_proj": (2048, 5461)}
