#!/usr/bin/env bash
# Federated quickstart on one machine: a noprop-server and CLIENTS noprop-client processes on 127.0.0.1
# train NoProp-DT on Fashion-MNIST (IID partitions) over TLS (a development CA and server certificate made by
# noprop-certs in $OUT/certs, new each run); prints accuracy per round and the final accuracy.
# Needs the venv and the data (`make quickstart` does both first). Everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- run settings: the one place to tune them ---------------------------------------------------------------
CLIENTS=${CLIENTS:-4}
# 16,32,64: half-width conv paths, so that 4 rounds fit in 15 minutes on 2 cores (measured: BENCHMARKS.md)
# --no-plan-by-speed: the 4 like clients share this machine, so their measured speeds are each other's contention;
# planning by data alone makes two quickstarts train alike (same plan, same weights)
RUN_FLAGS=(--rounds 4 --local-epochs 1 --eval-limit 2000 --T 10 --channels 16,32,64 --no-plan-by-speed)
# the SuperLink keeps its state in memory (no database file; the quickstart never restarts the server)
# under live clients (the default, file, survives that)
SERVER_FLAGS=(--superlink-db memory)
read -r -a EXTRA_FLAGS <<< "${QUICKSTART_FLAGS:-}"  # e.g. QUICKSTART_FLAGS="--rounds 2": appended, so they win
read -r -a CLIENT_EXTRA <<< "${QUICKSTART_CLIENT_FLAGS:-}"  # e.g. "--no-worker" (bench/round_overhead.py)
PARTITION_TYPE=iid
THREADS_PER_CLIENT=1
# -------------------------------------------------------------------------------------------------------------
PORT=${PORT:-9092}                  # Fleet API (clients -> server), loopback only
CONTROL_PORT=${CONTROL_PORT:-9093}  # the SuperLink's Control API, loopback only
OUT=${OUT:-runs/quickstart}
DATA=${DATA:-data}
BIN=${BIN:-.venv/bin}

export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
LOGS="$OUT/logs"
CERTS="$OUT/certs"
mkdir -p "$LOGS"
"$BIN/noprop-certs" "$CERTS" --force > "$LOGS/certs.log"

pids=()
cleanup() {
  trap - EXIT
  trap '' INT TERM  # let the cleanup finish (it is bounded)
  local alive=()
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; alive+=("$pid"); fi
  done
  # each launcher stops its own Flower processes (client ~10 s at most, server ~20 s); then no mercy
  for _ in $(seq 1 60); do
    local still=()
    for pid in "${alive[@]}"; do kill -0 "$pid" 2>/dev/null && still+=("$pid"); done
    [ ${#still[@]} -eq 0 ] && break
    sleep 0.5
  done
  for pid in "${alive[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'echo "[quickstart] interrupted: stopping everything"; exit 130' INT TERM

echo "[quickstart] noprop-server + $CLIENTS noprop-client processes on 127.0.0.1 (Fashion-MNIST, $PARTITION_TYPE," \
     "TLS with $CERTS); client logs in $LOGS"
"$BIN/noprop-server" --port "$PORT" --control-port "$CONTROL_PORT" --dataset fashion-mnist --data-root "$DATA" \
  --out "$OUT" --min-clients "$CLIENTS" --client-threads "$THREADS_PER_CLIENT" --certificates "$CERTS" \
  "${RUN_FLAGS[@]}" "${SERVER_FLAGS[@]}" ${EXTRA_FLAGS[@]+"${EXTRA_FLAGS[@]}"} &
server=$!
pids+=("$server")

clients=()
for i in $(seq 0 $((CLIENTS - 1))); do
  "$BIN/noprop-client" --server "127.0.0.1:$PORT" --data fashion-mnist --data-root "$DATA" \
    --partition "$i/$CLIENTS" --partition-type "$PARTITION_TYPE" --threads "$THREADS_PER_CLIENT" --wait 180 \
    --root-certificate "$CERTS/ca.crt" --state-dir "$OUT/.flower/node$i" ${CLIENT_EXTRA[@]+"${CLIENT_EXTRA[@]}"} \
    > "$LOGS/client$i.log" 2>&1 &
  pids+=("$!")
  clients+=("$!")
done

# wait for the server; give up early if every client has exited (wrong data, no server, ...)
set +e
while :; do
  if ! kill -0 "$server" 2>/dev/null; then wait "$server"; rc=$?; break; fi
  up=0
  for pid in "${clients[@]}"; do kill -0 "$pid" 2>/dev/null && up=$((up + 1)); done
  if [ "$up" -eq 0 ]; then
    echo "[quickstart] every client exited before the run finished; last lines of their logs:" >&2
    tail -n 3 "$LOGS"/client*.log >&2
    rc=1
    break
  fi
  sleep 2
done
set -e
cleanup
if [ "$rc" -ne 0 ]; then
  echo "[quickstart] the run failed (noprop-server exit $rc); client logs: $LOGS" >&2
  exit "$rc"
fi
acc=$("$BIN/python" -c 'import json, sys; print("%.2f%%" % (100 * json.load(open(sys.argv[1]))["accuracy"]))' \
      "$OUT/DONE.json")
echo "[quickstart] final test accuracy (PyTorch, server side): $acc"

# the edge side: one ONNX file, evaluated by the torch-free runtime on the full test set
echo "[quickstart] exporting $OUT/model.onnx and evaluating it with noprop-edge (onnxruntime + numpy only)"
"$BIN/noprop-export" "$OUT/checkpoint.pt" -o "$OUT/model.onnx" --data-root "$DATA"
"$BIN/noprop-edge" eval "$OUT/model.onnx" --data "$DATA/FashionMNIST/raw"
echo "[quickstart] outputs: $OUT/checkpoint.pt, $OUT/model.onnx, $OUT/metrics.jsonl, $OUT/accuracy.png," \
     "$OUT/ownership.png"
