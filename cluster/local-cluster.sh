#!/usr/bin/env bash
# A real two-node Ray cluster on one machine, for development and the fault-tolerance tests.
#
#   cluster/local-cluster.sh start        head (node a) + a second node (node b) joined with `ray start --address`
#   cluster/local-cluster.sh stop         stop both nodes (only this cluster's processes; other Ray instances live on)
#   cluster/local-cluster.sh stop-node    kill node b (raylet and its workers), as when a machine dies
#   cluster/local-cluster.sh start-node   (re)join node b
#   cluster/local-cluster.sh status       `ray status` of this cluster
#
# Each node offers CPUS_PER_NODE CPUs (default 1) and a custom resource (simclr_node_a / simclr_node_b), so two
# 1-CPU training workers can only be placed one per node. The dashboard binds to loopback; token authentication
# stays on (Ray enables it once ~/.ray/auth_token exists; this script creates the token when missing).
# Environment: RAY_PORT (6390), DASHBOARD_PORT (8270), CPUS_PER_NODE (1), RAY (the ray executable).
# Then: RAY_ADDRESS=127.0.0.1:$RAY_PORT RAY_AUTH_MODE=token python -m simclr_dist.pretrain ...
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-$( [ -x .venv/bin/ray ] && echo .venv/bin/ray || echo ray )}
PYTHON=$(dirname "$(command -v "$RAY")")/python
RAY_PORT=${RAY_PORT:-6390}
DASHBOARD_PORT=${DASHBOARD_PORT:-8270}
CPUS_PER_NODE=${CPUS_PER_NODE:-1}
TEMP_DIR=/tmp/simclr-ray-$RAY_PORT
ADDRESS=127.0.0.1:$RAY_PORT
export RAY_AUTH_MODE=token

# Kill every process whose command line contains one of the patterns, and all their descendants.
kill_matching() {
  "$PYTHON" - "$@" <<'PY'
import os, re, sys, psutil
patterns = [re.compile(re.escape(p) + r"(?!\d)") for p in sys.argv[1:]]  # ":6390" must not match ":63901"
roots = [p for p in psutil.process_iter(["cmdline"])
         if p.pid != os.getpid() and p.info["cmdline"]
         and any(pat.search(" ".join(p.info["cmdline"])) for pat in patterns)]
victims = {p.pid: p for r in roots for p in [r, *r.children(recursive=True)]}
for p in victims.values():
    try:
        p.kill()
    except psutil.Error:
        pass
psutil.wait_procs(list(victims.values()), timeout=10)
print(f"killed {len(victims)} process(es)")
PY
}

start_node_b() {
  "$RAY" start --address "$ADDRESS" --num-cpus "$CPUS_PER_NODE" --resources '{"simclr_node_b": 1}' \
    --disable-usage-stats >/dev/null
  echo "node b joined $ADDRESS"
}

case "${1:-}" in
  start)
    [ -f "$HOME/.ray/auth_token" ] || "$RAY" get-auth-token --generate >/dev/null
    "$RAY" start --head --port "$RAY_PORT" --num-cpus "$CPUS_PER_NODE" --resources '{"simclr_node_a": 1}' \
      --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --temp-dir "$TEMP_DIR" \
      --disable-usage-stats >/dev/null
    echo "head (node a) at $ADDRESS, dashboard http://127.0.0.1:$DASHBOARD_PORT"
    start_node_b
    echo "export RAY_ADDRESS=$ADDRESS RAY_AUTH_MODE=token"
    ;;
  stop)
    kill_matching "$TEMP_DIR" ":$RAY_PORT"
    ;;
  stop-node)
    kill_matching "simclr_node_b"
    ;;
  start-node)
    start_node_b
    ;;
  status)
    RAY_ADDRESS=$ADDRESS "$RAY" status
    ;;
  *)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
