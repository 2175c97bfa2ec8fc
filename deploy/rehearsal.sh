#!/usr/bin/env bash
# The loopback rehearsal (docs/tutorials/first-federation.md): every step of the runbook
# (docs/how-to/coordinate.md, docs/how-to/join-as-site.md) on 127.0.0.1, with
# two SYNTHETIC sites, TLS and SuperNode authentication. Linux (it reads /proc).
#
#   bash deploy/rehearsal.sh            # from the fedscan checkout, its venv active
#
# It waits for each service to be ready (never a fixed sleep), and on exit, success or
# not (Ctrl-C included), stops every process it started, children included: the
# SuperLink's and SuperNodes' flower-superexec and any flwr-clientapp still busy.
# Settings (environment): REHEARSAL_DIR (default <checkout>/.rehearsal, recreated on
# every run), REHEARSAL_PORT (default 9093: the SuperLink; the SuperNodes take the next
# two), REHEARSAL_TIMEOUT_S (default 120: how long to wait for a service to start).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${REHEARSAL_DIR:-$ROOT/.rehearsal}"
PORT="${REHEARSAL_PORT:-9093}"
WAIT_S="${REHEARSAL_TIMEOUT_S:-120}"
SITES=(hospital-a hospital-b)
# Every process started below carries this mark in its environment, and so do the
# processes they start (flower-superexec, flwr-clientapp): cleanup finds them all by it,
# even the ones whose parent already exited. This shell itself does not carry it.
MARK="FEDSCAN_REHEARSAL=$$-$(date +%s%N)"
START=$(date +%s)

say() { printf '%s rehearsal: %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() { say "FAILED: $*" >&2; exit 1; }

for cmd in fedscan flower-superlink flower-supernode flwr python; do
  command -v "$cmd" >/dev/null || fail "'$cmd' not found: activate the fedscan venv (docs/how-to/join-as-site.md, step 0)"
done
[ -d /proc ] || fail "this script reads /proc (Linux); elsewhere run the steps of docs/how-to/coordinate.md and join-as-site.md by hand"

marked_pids() {  # processes whose environment carries the mark
  grep -lsaF "$MARK" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3 || true
}

stop_all() {  # TERM everything marked, wait, then KILL what is left; say what happened
  local pids left
  pids=$(marked_pids)
  [ -z "$pids" ] && return 0
  say "stopping $(echo "$pids" | wc -w) process(es) it started ..."
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 20); do
    left=$(marked_pids)
    [ -z "$left" ] && break
    sleep 0.5
  done
  if [ -n "$left" ]; then
    kill -KILL $left 2>/dev/null || true
    sleep 1
  fi
  left=$(marked_pids)
  [ -z "$left" ] && say "all stopped" || say "WARNING: still running: $left"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

background() {  # NAME COMMAND...: start in the background with the mark, log to NAME.log
  local name=$1
  shift
  env "$MARK" "$@" >"$DIR/$name.log" 2>&1 &
  say "started $name (pid $!, log $DIR/$name.log)"
}

wait_for() {  # WHAT PID TEST...: poll TEST every second until it passes, PID dies or time is up
  local what=$1 pid=$2 waited=0
  shift 2
  until "$@"; do
    kill -0 "$pid" 2>/dev/null || fail "$what: its process exited (see its log)"
    [ "$waited" -ge "$WAIT_S" ] && fail "$what: not ready after ${WAIT_S} s (a loaded machine? set REHEARSAL_TIMEOUT_S)"
    [ $((waited % 10)) -eq 0 ] && [ "$waited" -gt 0 ] && say "still waiting for $what (${waited} s)"
    sleep 1
    waited=$((waited + 1))
  done
  say "$what: ready after ${waited} s"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
logged() { grep -q "$2" "$DIR/$1.log" 2>/dev/null; }

# A fresh folder on every run (the SuperLink's database keeps registrations).
if [ -e "$DIR" ] && [ ! -e "$DIR/.fedscan-rehearsal" ]; then
  fail "$DIR exists and is not a rehearsal folder: set REHEARSAL_DIR to another path"
fi
rm -rf "$DIR"
mkdir -p "$DIR/data"
touch "$DIR/.fedscan-rehearsal"
cd "$DIR"
export FLWR_HOME="$DIR/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
mkdir -p "$FLWR_HOME"

say "synthetic site folders (clearly labelled SYNTHETIC)"
python - "${SITES[@]}" <<'EOF'
import sys
from pathlib import Path

from fedscan.common.data.datasets.synthetic import generate

for i, site in enumerate(sys.argv[1:]):
    generate(Path("data") / site, "brain_mri", per_class=20, size=64, seed=i)
EOF

say "step 1: site check of ${SITES[0]}"
fedscan site check --data-path "data/${SITES[0]}" --no-estimate

say "step 2: certificates and site keys"
fedscan certs --out pki --site "${SITES[0]}" --site "${SITES[1]}"

say "step 3: the SuperLink on 127.0.0.1:$PORT (TLS, SuperNode authentication)"
background superlink flower-superlink \
  --ssl-ca-certfile pki/ca.crt --ssl-certfile pki/superlink.crt --ssl-keyfile pki/superlink.key \
  --enable-supernode-auth --disable-runtime-dependency-installation --database state.db \
  --host 127.0.0.1 --port "$PORT"
SUPERLINK=$!
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "fedscan"

[superlink.fedscan]
address = "127.0.0.1:$PORT"
root-certificates = "$DIR/pki/ca.crt"
EOF
wait_for "the SuperLink" "$SUPERLINK" port_open "$PORT"

say "step 4: register the sites' public keys"
for site in "${SITES[@]}"; do
  flwr supernode register "pki/sites/$site/$site.pub" fedscan
done

say "step 5: one SuperNode per site"
port=$((PORT + 1))
for site in "${SITES[@]}"; do
  background "$site" flower-supernode --root-certificates pki/ca.crt \
    --superlink "127.0.0.1:$PORT" --auth-supernode-private-key "pki/sites/$site/$site.key" \
    --node-config "data-path=\"$DIR/data/$site\"" --port "$port"
  wait_for "SuperNode $site" "$!" logged "$site" "SuperNode ID:"
  port=$((port + 1))
done
flwr supernode list fedscan

say "step 6: the federation (2 rounds; every message starts a flwr-clientapp that imports torch)"
# in the background and waited for, so that a stop (TERM, Ctrl-C) is handled at once
env "$MARK" fedscan flwr-run "$ROOT" fedscan --stream --run-config "dataset='synthetic' \
  num-rounds=2 runs-dir='$DIR/runs' overrides='model.mode=features train.lr=0.01 \
  federation.local_epochs=3 federation.min_nodes=2'" &
wait $! || fail "the federation did not complete (fedscan flwr-run exit status $?; see above)"

say "done in $(($(date +%s) - START)) s; the run folder is under $DIR/runs/"
