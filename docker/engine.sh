#!/usr/bin/env bash
# Make sure a Docker engine answers, starting one here if needed (CI and single-machine use).
#
#   docker/engine.sh start   # exit 0 when `docker info` answers; prints "started" / "already running"
#   docker/engine.sh stop    # stops the engine only if this script started it (pid in $LF2_ENGINE_STATE)
#
# Starting needs root: the Debian packages docker.io (+ debootstrap for `make base-image`) are installed with
# apt-get when dockerd is missing, and dockerd runs with overlay2, no iptables and no bridge (containers use
# host networking: --network host). Any failure ends with ONE line on stderr, "engine: error: ...", and exit 1.
set -uo pipefail

STATE=${LF2_ENGINE_STATE:-/tmp/lf2-dockerd}
LOG=$STATE/dockerd.log
PIDFILE=$STATE/dockerd.pid

fail() { echo "engine: error: $*" >&2; exit 1; }
answers() { timeout 10 docker info >/dev/null 2>&1; }

start() {
    command -v docker >/dev/null 2>&1 && answers && { echo "engine: already running"; return 0; }
    [ "$(id -u)" = 0 ] || fail "no Docker engine answers and starting one needs root (sudo docker/engine.sh start)"
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
        echo "engine: installing docker.io and debootstrap (apt-get)"
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap; } \
            >"/tmp/lf2-engine-apt.log" 2>&1 \
            || fail "apt-get install docker.io debootstrap failed (log: /tmp/lf2-engine-apt.log): $(tail -n 1 /tmp/lf2-engine-apt.log)"
    fi
    command -v docker >/dev/null 2>&1 || fail "the docker client is missing after installing docker.io"
    mkdir -p "$STATE"
    local t0; t0=$(date +%s%N)
    dockerd --storage-driver=overlay2 --iptables=false --bridge=none >"$LOG" 2>&1 &
    echo $! >"$PIDFILE"
    for _ in $(seq 1 240); do
        answers && { echo "engine: started (pid $(cat "$PIDFILE"), $(( ($(date +%s%N) - t0) / 1000000 )) ms; log $LOG)"; return 0; }
        kill -0 "$(cat "$PIDFILE")" 2>/dev/null || fail "dockerd exited: $(grep -v '^$' "$LOG" | tail -n 1)"
        sleep 0.25
    done
    fail "dockerd did not answer within 60 s: $(tail -n 1 "$LOG")"
}

stop() {
    [ -f "$PIDFILE" ] || { echo "engine: not started by this script, left running"; return 0; }
    local pid; pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    fi
    rm -f "$PIDFILE"
    echo "engine: stopped (pid $pid)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: docker/engine.sh start|stop" >&2; exit 2 ;;
esac
