#!/usr/bin/env bash
# `make monitor`: a local Prometheus (Debian's `prometheus` binary) scraping the local Ray through Ray's
# service-discovery file, with this project's alert/recording rules, bound to 127.0.0.1.
#
#   deploy/monitor.sh [start]   start it, or if it already runs reload its config/rules; print the URL
#   deploy/monitor.sh stop      stop it
#   deploy/monitor.sh status    print the URL if it runs (exit 1 if not)
#
# State lives in build/monitor/ (ignored by git): the rendered config, the TSDB, the pid, port and log.
# MONITOR_PORT picks the port (default: 9090, else the first free one up to 9109, since the machine may be
# shared). RAY_TMPDIR is honoured the way Ray honours it, to find the discovery file.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/build/monitor"
CONF="$STATE/prometheus.yml"
PIDF="$STATE/prometheus.pid"
PORTF="$STATE/port"
LOG="$STATE/prometheus.log"
SD="${RAY_TMPDIR:-/tmp}/ray/prom_metrics_service_discovery.json"

die() { echo "monitor: $*" >&2; exit 1; }

running_pid() {  # our Prometheus' pid, if the pid file names a live prometheus using our config
  [ -f "$PIDF" ] || return 1
  local pid; pid="$(cat "$PIDF")"
  [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "--config.file=$CONF" || return 1
  echo "$pid"
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

render_config() {  # the deploy config with this machine's discovery file and an absolute rules path
  mkdir -p "$STATE/data"
  sed -e "s#/tmp/ray/prom_metrics_service_discovery.json#$SD#" \
      -e "s#^  - prometheus-rules.yml#  - $ROOT/deploy/prometheus-rules.yml#" \
      "$ROOT/deploy/prometheus.yml" >"$CONF.tmp"
  promtool check config "$CONF.tmp" >/dev/null || { promtool check config "$CONF.tmp"; die "invalid config"; }
  mv "$CONF.tmp" "$CONF"
}

print_url() {
  echo "Prometheus: http://127.0.0.1:$(cat "$PORTF")  (pid $1, data in ${STATE#"$ROOT"/}/data, log ${LOG#"$ROOT"/})"
  echo "  try: ray_simclr_samples_per_second   |  alerts: http://127.0.0.1:$(cat "$PORTF")/alerts"
  [ -e "$SD" ] || echo "  note: $SD does not exist yet: it appears once a Ray with its dashboard runs (make demo, ray start --head)"
}

start() {
  command -v prometheus >/dev/null || die "prometheus not found: run 'bash deploy/install-system-deps.sh'"
  render_config
  local pid
  if pid="$(running_pid)"; then
    kill -HUP "$pid"  # already running: pick up config/rule changes, keep the data
    print_url "$pid"
    return
  fi
  local port="${MONITOR_PORT:-}"
  if [ -z "$port" ]; then
    for p in $(seq 9090 9109); do port_busy "$p" || { port="$p"; break; }; done
    [ -n "$port" ] || die "ports 9090-9109 are all busy; set MONITOR_PORT"
  elif port_busy "$port"; then
    die "port $port is busy; set MONITOR_PORT to a free port"
  fi
  echo "$port" >"$PORTF"
  setsid prometheus --config.file="$CONF" --storage.tsdb.path="$STATE/data" \
    --web.listen-address="127.0.0.1:$port" --storage.tsdb.retention.time=15d >>"$LOG" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$PIDF"
  for _ in $(seq 1 60); do  # ready within seconds; a crash (bad flag, port race) ends the wait at once
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$LOG" >&2; die "prometheus exited; see $LOG"; }
    curl -fsS "http://127.0.0.1:$port/-/ready" >/dev/null 2>&1 && { print_url "$pid"; return; }
    sleep 0.5
  done
  die "prometheus (pid $pid) not ready after 30 s; see $LOG"
}

stop() {
  local pid
  if pid="$(running_pid)"; then
    kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    echo "monitor: stopped prometheus (pid $pid)"
  else
    echo "monitor: not running"
  fi
  rm -f "$PIDF"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) pid="$(running_pid)" || { echo "monitor: not running"; exit 1; }; print_url "$pid" ;;
  *) die "usage: $0 [start|stop|status]" ;;
esac
