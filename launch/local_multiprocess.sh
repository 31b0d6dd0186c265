#!/usr/bin/env bash
# N trainer processes on this machine, talking over jax.distributed on 127.0.0.1, each with its
# own simulated CPU devices: the multi-host code path (process-local data, global arrays,
# cross-process collectives, per-process checkpoint files) without a cluster.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS [fourm-train flags...]
#   launch/local_multiprocess.sh 2 4 --config configs/pretrain.py:smoke --workdir runs/mp
#
# Logs: <LOG_DIR>/process_<i>.log (LOG_DIR defaults to a temp dir; printed). Exit status: the first
# non-zero exit of any process, else 0. Ctrl-C / SIGTERM are forwarded to all processes.
set -euo pipefail
NPROC=${1:?usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [fourm-train flags...]}
NDEV=${2:?usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [fourm-train flags...]}
shift 2
PYTHON=${PYTHON:-python}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
LOG_DIR=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$LOG_DIR"
echo "local_multiprocess: $NPROC processes x $NDEV CPU devices, coordinator 127.0.0.1:$PORT, logs in $LOG_DIR" >&2

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < NPROC; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=$NDEV ${XLA_FLAGS_EXTRA:-}" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" \
  FOURM_NUM_PROCESSES="$NPROC" \
  FOURM_PROCESS_ID="$i" \
    "$PYTHON" -m fourm.cli.train "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
done

status=0
for i in "${!pids[@]}"; do
  rc=0
  wait "${pids[$i]}" || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "local_multiprocess: process $i exited with $rc (log: $LOG_DIR/process_$i.log)" >&2
    tail -n 30 "$LOG_DIR/process_$i.log" >&2 || true
    [[ $status -eq 0 ]] && status=$rc
    cleanup  # one process failing leaves the others blocked in a collective
  fi
done
exit $status
