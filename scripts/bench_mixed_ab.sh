#!/usr/bin/env bash
# Mixed steps before / after: vLLM's own serving client (random prompts of IN tokens, OUT out, N requests at RATE
# req/s, --ignore-eos) against `kiln serve` from tree A (before) then tree B (after), per backend, one after the
# other in one run; prints TTFT / TPOT p50 and output tok/s of each. Peers: ../shared/peers/README.md.
#   scripts/bench_mixed_ab.sh [A_TREE=/work/main] [B_TREE=this tree]
#   env: BACKENDS="torch jax" N=16 RATE=4 IN=256 OUT=64 PY=/work/main/.venv/bin/python PEERS=~/.cache/kiln-peers
set -u
A=${1:-/work/main}
B=${2:-$(cd "$(dirname "$0")/.." && pwd)}
PY=${PY:-/work/main/.venv/bin/python}
PEERS=${PEERS:-$HOME/.cache/kiln-peers}
CLI=$(cd "$(dirname "$0")/../.." && pwd)/shared/peers/vllm_cli.py
[ -f "$CLI" ] || CLI=/work/shared/peers/vllm_cli.py
PORT=${PORT:-8123}
seed=${SEED:-700}
for be in ${BACKENDS:-torch jax}; do
  for tree in "$A" "$B"; do
    seed=$((seed + 1))                       # new prompts each run: no prefix-cache help from the previous one
    log=$(mktemp /tmp/kiln-ab-XXXX.log)
    PYTHONPATH=$tree $PY -m kiln.entrypoints.cli serve --backend "$be" --dtype float32 --http-port "$PORT" --no-grpc \
      --max-model-len 1024 --max-num-seqs 64 >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
    echo "== $be  $(git -C "$tree" rev-parse --short HEAD) ($tree)"
    "$PEERS/vllm/bin/python" "$CLI" bench serve --backend openai --base-url "http://127.0.0.1:$PORT" \
      --endpoint /v1/completions --model smollm2-135m-instruct --tokenizer "$PEERS/models/smollm2-hf" \
      --dataset-name random --random-input-len "${IN:-256}" --random-output-len "${OUT:-64}" \
      --num-prompts "${N:-16}" --request-rate "${RATE:-4}" --ignore-eos --seed "$seed" 2>&1 \
      | grep -E "Output token throughput|Median TTFT|Median TPOT|Successful requests"
    kill "$pid"; wait "$pid" 2>/dev/null
  done
done
