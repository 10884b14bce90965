#!/usr/bin/env bash
# Llama-7B on one GPU, measured in ONE device call that a session with a GPU runs first (~7.5 min of device time):
#
#   OUT=$OUT bash bench/gpu_7b.sh            # on the device machine, .whl carried (bench/README.md); results in $OUT
#   GPU_7B_TINY=1 bash bench/gpu_7b.sh       # the same parts on tiny shapes (CPU is fine; memory: the first variant
#                                            # only), 600 s limits: tests/bench runs this
#   GPU_7B_PRINT=1 bash bench/gpu_7b.sh      # print the commands, run nothing (tests/bench checks their arguments)
#
# Parts, in this order, each under its own time limit (seconds, env), each writing its results file as it goes:
#   memory  MEMORY_S=200  Llama-7B, 256 tokens per step, one real step each of galore_adamw_8bit + layerwise,
#                         galore_adamw (fp32 states) + layerwise, bf16 AdamW and, if the time limit allows,
#                         galore_adamw with bf16 states (no layerwise), each in its own process, layers
#                         stacked as in both 7B configs (unrolled, the layerwise step alone takes ~15 min
#                         to compile on a CPU): the device's peak (memory_stats) beside the dry run's analytic
#                         figure -> memory-7b-gpu.json; each variant's compiled train step (final HLO, buffer
#                         assignment) dumped by XLA and packed -> xla-dump-memory-7b.tgz, to read off the device
#   refresh REFRESH_S=90  the full Llama-7B refresh (224 matrices, r = 1024): randomized first, then exact
#                         (refresh="gram": deflated Gram eigenvectors) on 4 layers, then the direct SVD
#                         (refresh="svd") on 1 layer, scaled -> refresh-gpu-llama_7b.json
#   train   TRAIN_S=150   python train.py --config configs/llama7b.py, 6 logged steps of 8 x 256 tokens on the
#                         embedded corpus (nothing downloaded): tokens/s, MFU, memory peak -> train-gpu-llama7b.json
# PARTS="memory train" picks parts. A line of progress every 30 s. Compiles are cached in bench/.jax_cache (ignored by
# git, kept between calls on a warm machine): a rerun skips them.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/bench/.jax_cache}
PY=${PYTHON:-python3}
PARTS=${PARTS:-memory refresh train}
# The last variant, GaLore without layerwise beside AdamW (issue 18's XLA-peak question), runs if the limit allows.
VARIANTS="galore_adamw_8bit + layerwise,galore_adamw (fp32 states) + layerwise,adamw (bf16 states),galore_adamw (bf16 states)"
if [ -n "${GPU_7B_TINY:-}" ]; then  # tiny presets, so that the test suite runs every part end to end on a CPU
  OUT=${OUT:-/tmp/gpu_7b_tiny}
  LIMIT_S=600  # a loaded CPU, not the device's budget
  MEMORY=(--presets llama_9m --tokens 64 --layers 2 --variants "${VARIANTS%%,*}")  # the first variant only
  REFRESH=(--preset llama_9m --layers 1 --exact_layers 1 --direct_layers 1)
  TRAIN=(--config configs/tiny.py --steps 2 --batch_size 2 --max_bytes 100000 --set model.num_hidden_layers=1
         --workdir "$OUT/train_workdir")
else
  OUT=${OUT:-bench/results}
  LIMIT_S=
  MEMORY=(--presets llama_7b --tokens 256 --variants "$VARIANTS")
  REFRESH=(--preset llama_7b --layers 32 --exact_layers 4 --direct_layers 1)
  TRAIN=(--config configs/llama7b.py --steps 6 --batch_size 8 --grad_accum 1 --workdir /tmp/gpu_7b_train)
fi
# XLA's dumps go outside $OUT (only a few files come back from the device): pack_dump packs them into one
if [ -n "${GPU_7B_PRINT:-}" ]; then DUMP=/tmp/gpu_7b_xla_dump; else DUMP=$(mktemp -d); fi
MEMORY+=(--scan_layers --real_step --xla_dump "$DUMP" --out "$OUT/memory-7b-gpu")
REFRESH+=(--fast randomized --skip_quality --skip_train --skip_batch_refresh --repeats 1
          --out "$OUT/refresh-gpu-llama_7b.json")
TRAIN+=(--out "$OUT/train-gpu-llama7b.json")

part() {  # part NAME LIMIT_S MODULE ARGS...: run one part under its time limit (its whole process group)
  local name=$1 limit=$2
  shift 2
  if [ -n "${GPU_7B_PRINT:-}" ]; then
    printf '%q ' "$PY" -m "$@"
    echo
    return
  fi
  echo "=== $name (limit ${limit} s, at $(( $(date +%s) - START )) s)"
  echo "$name" > "$STATUS"
  timeout -k 10 "$limit" "$PY" -m "$@"
  echo "=== $name: exit code $? at $(( $(date +%s) - START )) s"
}

pack_dump() {  # the dumped train steps' final HLO and buffer assignments, compressed into one results file
  local tgz=$OUT/xla-dump-memory-7b.tgz files
  files=$(cd "$DUMP" 2>/dev/null && find . -type f \( -name '*buffer*assignment*' -o -name '*memory*usage*' \
          -o -name '*live*range*' -o -name '*after_optimizations.txt' \) | sort)
  if [ -z "$files" ]; then
    echo "=== no XLA dump (each compile came from the cache)"
    return
  fi
  (cd "$DUMP" && echo "$files" | tar -czf "$tgz" -T -)
  if [ "$(stat -c %s "$tgz")" -gt 15000000 ]; then  # a returned file holds at most 16 MiB: the first variant alone
    (cd "$DUMP" && echo "$files" | grep -F "$(echo "$files" | head -1 | cut -d/ -f2)" | tar -czf "$tgz" -T -)
  fi
  echo "=== XLA dump: $(stat -c %s "$tgz") bytes in $tgz"
}

heartbeat() {  # a progress line every 30 s: the part running and the device memory in use
  # sleep's output goes to /dev/null: a sleep holding our stdout would keep the caller waiting up to 30 s after
  # the script ended (the EXIT trap kills this loop, not the sleep it is in)
  while sleep 30 >/dev/null 2>&1; do
    local memory
    memory=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null | head -1)
    echo "[gpu_7b] $(( $(date +%s) - START )) s: $(cat "$STATUS" 2>/dev/null) running${memory:+, GPU memory $memory}"
  done
}

START=$(date +%s)
if [ -z "${GPU_7B_PRINT:-}" ]; then
  mkdir -p "$OUT" "$JAX_COMPILATION_CACHE_DIR"
  STATUS=$(mktemp)
  if [ -d .whl ]; then  # wheels the device image lacks (bench/README.md)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  heartbeat &
  HEARTBEAT=$!
  trap 'kill $HEARTBEAT 2>/dev/null; rm -rf "$STATUS" "$DUMP"' EXIT
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
for name in $PARTS; do
  case $name in
    memory)
      part memory "${MEMORY_S:-${LIMIT_S:-200}}" bench.memory "${MEMORY[@]}"
      [ -n "${GPU_7B_PRINT:-}" ] || pack_dump ;;
    refresh) part refresh "${REFRESH_S:-${LIMIT_S:-90}}" bench.refresh "${REFRESH[@]}" ;;
    train) part train "${TRAIN_S:-${LIMIT_S:-150}}" bench.train_run "${TRAIN[@]}" ;;
    *) echo "error: unknown part $name (memory, refresh, train)" >&2; exit 2 ;;
  esac
done
