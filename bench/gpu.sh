#!/usr/bin/env bash
# The GPU benchmarks of one device session, in priority order, each under its own time limit so that one
# slow part cannot starve the rest; every script writes its results file as it goes.
#   OUT=bench/results bash bench/gpu.sh        (wheels absent from the GPU image may sit in .whl/)
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, optax, flax, torch; print('jax', jax.__version__, 'optax', optax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())"
# Order: speed (issue 5), 7B memory (issue 7), 7B refresh (issue 6); about 12 min plus the machine's start.
XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout ${SPEED_S:-330} python3 bench/speed.py --preset llama_1b --tokens 8192 \
  --dtype bfloat16 --steps 5 --torch --out "$OUT/speed-gpu-llama_1b-8192.json"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout ${MEMORY_S:-250} python3 bench/memory.py --presets llama_7b \
  --variants "${MEMORY_VARIANTS:-galore_adamw_8bit + layerwise,galore_adamw (fp32 states) + layerwise,adamw (bf16 states)}" --real_step \
  --out "$OUT/memory-7b-gpu"
timeout ${REFRESH_S:-150} python3 bench/refresh.py --preset llama_7b --layers 32 --exact_layers 1 \
  --exact_algorithms jacobi --fast randomized,randomized_warm --skip_quality --skip_train --repeats 1 \
  --out "$OUT/refresh-gpu-llama_7b.json"
