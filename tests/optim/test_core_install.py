"""`pip install galore-jax` (no extras) is enough for the optimizer: a fresh venv without flax or transformers."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEP = textwrap.dedent("""
    import importlib.util, json
    import jax.numpy as jnp, optax
    from galore_jax import galore, galore_adamw, galore_adamw_8bit
    missing = [m for m in ("flax", "orbax", "transformers", "datasets", "torch") if importlib.util.find_spec(m)]
    params = {"attn": {"kernel": jnp.ones((8, 6))}, "norm": jnp.ones(6)}
    grads = {"attn": {"kernel": jnp.arange(48.0).reshape(8, 6) / 48}, "norm": jnp.ones(6)}
    finite = []
    for tx in (galore_adamw(1e-2, rank=2), galore_adamw_8bit(1e-2, rank=2),
               optax.chain(galore(rank=2), optax.scale(-1e-2))):
      updates, _ = tx.update(grads, tx.init(params), params)
      finite.append(bool(jnp.all(jnp.isfinite(updates["attn"]["kernel"]))))
    print(json.dumps({"installed_extras": missing, "finite": finite}))
""")


@pytest.mark.slow
def test_core_install_runs_galore_without_the_app_dependencies(tmp_path):
  source = tmp_path / "src"  # a copy: pip builds in the source tree, which must stay clean
  shutil.copytree(os.path.join(ROOT, "galore_jax"), source / "galore_jax", ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), source / name)
  venv = tmp_path / "core"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  install = subprocess.run([python, "-m", "pip", "install", "-q", str(source)], capture_output=True, text=True,
                           timeout=900)
  assert install.returncode == 0, install.stderr[-3000:]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the suite's shared cache locks with filelock, which this venv lacks
  run = subprocess.run([python, "-c", STEP], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "Warning" not in run.stderr, run.stderr[-3000:]
  assert run.stdout.strip().splitlines()[-1] == '{"installed_extras": [], "finite": [true, true, true]}'
