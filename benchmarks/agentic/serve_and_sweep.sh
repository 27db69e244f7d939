#!/usr/bin/env bash
# Compile a model, serve it with tsrun on the GPU, run the agentic sweep against it, stop it.
#
#   benchmarks/agentic/serve_and_sweep.sh OUT_DIR TOKENIZER_DIR [WORKLOAD.jsonl]
#
# Environment (defaults in brackets): MODEL [qwen3], PRESET [qwen3-8b], TP [1] (ranks =
# GPUs, also the sweep's --gpus), DEVICE [cuda],
# DTYPE [bfloat16], LEVELS [1,2,4,8], DURATION seconds per level [60], LABEL, PORT [8011],
# TSRUN_ARGS for extra tsrun flags (e.g. --enforce-eager) and SWEEP_ARGS for extra sweep
# flags (e.g. workload options), CEILING [1] (0: no roofline ceiling). Writes
# OUT_DIR/build.log, tsrun.log, roofs.json (the card's copy and matmul roofs, measured before
# tsrun takes the GPU; the ceiling's inputs with the program and tsrun's logged KV pool) and
# the sweep's requests.csv, summary.json (with its "ceiling" block), pareto.png.
set -euo pipefail
# shellcheck disable=SC2086  # TSRUN_ARGS and SWEEP_ARGS split on purpose
out=${1:?output folder}; tok=${2:?tokenizer folder}; workload=${3:-}
model=${MODEL:-qwen3}; preset=${PRESET:-qwen3-8b}; port=${PORT:-8011}; tp=${TP:-1}
mkdir -p "$out"
prog="$out/$preset.tsprog"
tscompile build "$model" --preset "$preset" --tp "$tp" -o "$prog" > "$out/build.log"
ceiling=()
if [ "${CEILING:-1}" != 0 ]; then
  if python3 -m benchmarks.agentic roofs -o "$out/roofs.json"; then
    ceiling=(--ceiling-program "$prog" --roofs "$out/roofs.json")
  else
    echo "roofs not measured: the summary gets no ceiling" >&2
  fi
fi
tsrun "$prog" --dummy-weights --tokenizer "$tok" --device "${DEVICE:-cuda}" \
  --dtype "${DTYPE:-bfloat16}" \
  --port "$port" --max-num-seqs 32 --max-num-batched-tokens 4096 ${TSRUN_ARGS:-} \
  > "$out/tsrun.log" 2>&1 &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
  kill -0 $server 2>/dev/null || { tail -30 "$out/tsrun.log"; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$port/health" > /dev/null || { echo "tsrun not healthy"; exit 1; }
pool=$(grep -o 'KV pool: [0-9]* blocks of [0-9]* tokens ([0-9]* tokens' "$out/tsrun.log" \
  | head -1 | sed 's/.*(\([0-9]*\) tokens/\1/' || true)
[ ${#ceiling[@]} -gt 0 ] && [ -n "$pool" ] && ceiling+=(--kv-pool-tokens "$pool")
src=(--tokenizer "$tok")
[ -n "$workload" ] && src=(--workload "$workload")
python3 -m benchmarks.agentic sweep --url "http://127.0.0.1:$port" "${src[@]}" --out "$out" \
  --concurrency "${LEVELS:-1,2,4,8}" --duration "${DURATION:-60}" --gpus "$tp" --no-progress \
  --label "${LABEL:-tsrun $preset ${DTYPE:-bfloat16}, $tp GPU}" "${ceiling[@]}" ${SWEEP_ARGS:-}
