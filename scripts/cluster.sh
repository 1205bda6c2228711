#!/usr/bin/env bash
# Starts (or resumes) a local three-node Cabinet cluster on SoftHSM2, or stops it.
#   scripts/cluster.sh up     # what `make cluster` runs
#   scripts/cluster.sh down   # what `make cluster-down` runs
# Everything lives under .run/cluster (git-ignored): one data dir, SoftHSM token
# dir and PIN file per node, logs, pids, and the admin's credentials.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RUN="${CABINET_RUN_DIR:-$ROOT/.run/cluster}"
BIN="$ROOT/.run/bin/cabinet"
BASE_PORT="${CABINET_BASE_PORT:-7100}"
SOFTHSM_LIB=/usr/lib/softhsm/libsofthsm2.so
NODES=(1 2 3)

api_addr()  { echo "127.0.0.1:$((BASE_PORT + $1))"; }
raft_addr() { echo "127.0.0.1:$((BASE_PORT + 100 + $1))"; }
ndir()      { echo "$RUN/node$1"; }

ensure_softhsm() {
  if [[ -e "$SOFTHSM_LIB" ]] && command -v softhsm2-util >/dev/null; then return; fi
  if [[ $(id -u) -ne 0 ]]; then
    echo "SoftHSM2 is not installed and installing it needs root: run 'sudo apt-get install -y softhsm2' and retry." >&2
    exit 1
  fi
  echo "Installing SoftHSM2 (apt-get install -y softhsm2)..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
}

build() {
  echo "Building cabinet..."
  (cd "$ROOT" && go build -o "$BIN" ./cmd/cabinet)
}

# prepare_token N: a token dir, SoftHSM config and PIN file for node N.
prepare_token() {
  local d; d="$(ndir "$1")"
  mkdir -p "$d/softhsm/tokens" "$d/data"
  chmod 700 "$d" "$d/softhsm"
  if [[ ! -f "$d/softhsm/softhsm2.conf" ]]; then
    printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$d/softhsm/tokens" > "$d/softhsm/softhsm2.conf"
  fi
  if [[ ! -f "$d/pin" ]]; then
    (umask 077; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$d/pin")
  fi
  if ! SOFTHSM2_CONF="$d/softhsm/softhsm2.conf" softhsm2-util --show-slots 2>/dev/null | grep -q "Label:.*cabinet-node$1\b"; then
    SOFTHSM2_CONF="$d/softhsm/softhsm2.conf" softhsm2-util --init-token --free --label "cabinet-node$1" \
      --pin "$(cat "$d/pin")" --so-pin "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" >/dev/null
  fi
}

hsm_flags() {
  local d; d="$(ndir "$1")"
  echo "--hsm-lib $SOFTHSM_LIB --hsm-token-label cabinet-node$1 --hsm-pin-file $d/pin --softhsm-conf $d/softhsm/softhsm2.conf"
}

running() { [[ -f "$(ndir "$1")/pid" ]] && kill -0 "$(cat "$(ndir "$1")/pid")" 2>/dev/null; }

start_server() {
  local d; d="$(ndir "$1")"
  if running "$1"; then return; fi
  nohup "$BIN" server --data-dir "$d/data" >>"$d/server.log" 2>&1 &
  echo $! > "$d/pid"
}

export_env() {
  export CABINET_ADDR="$(api_addr 1)"
  export CABINET_CACERT="$RUN/admin/ca.pem"
  export CABINET_CLIENT_CERT="$RUN/admin/admin.pem"
  export CABINET_CLIENT_KEY="$RUN/admin/admin-key.pem"
}

# wait_healthy N SECONDS
wait_healthy() {
  local deadline=$((SECONDS + $2))
  while (( SECONDS < deadline )); do
    if "$BIN" operator status --addr "$(api_addr "$1")" -o json --timeout 2s 2>/dev/null | grep -Eq '"healthy": *true'; then
      return 0
    fi
    if ! running "$1"; then
      echo "node $1 exited; last log lines:" >&2; tail -n 20 "$(ndir "$1")/server.log" >&2; return 1
    fi
    sleep 0.3
  done
  echo "node $1 did not become healthy within $2s; see $(ndir "$1")/server.log" >&2
  tail -n 20 "$(ndir "$1")/server.log" >&2
  return 1
}

up() {
  ensure_softhsm
  build
  mkdir -p "$RUN"; chmod 700 "$RUN"
  for n in "${NODES[@]}"; do prepare_token "$n"; done
  if [[ ! -f "$(ndir 1)/data/node.json" ]]; then
    echo "Initialising node 1 (cabinet operator init)..."
    # shellcheck disable=SC2046
    "$BIN" operator init --data-dir "$(ndir 1)/data" --node-id node1 --api-addr "$(api_addr 1)" --raft-addr "$(raft_addr 1)" \
      --admin-out "$RUN/admin" $(hsm_flags 1)
  fi
  echo "Starting three cabinet servers..."
  for n in "${NODES[@]}"; do start_server "$n"; done
  export_env
  wait_healthy 1 60
  for n in 2 3; do
    if [[ ! -f "$(ndir "$n")/data/node.json" ]]; then
      echo "Joining node $n (cabinet operator join-token create + cabinet operator join)..."
      local token
      token="$("$BIN" operator join-token create --quiet)"
      # shellcheck disable=SC2046
      "$BIN" operator join --token "$token" --peer "$(api_addr 1)" --data-dir "$(ndir "$n")/data" --node-id "node$n" \
        --api-addr "$(api_addr "$n")" --raft-addr "$(raft_addr "$n")" $(hsm_flags "$n")
    fi
  done
  for n in "${NODES[@]}"; do wait_healthy "$n" 60; done
  # Every node: CLI calls fail over between them when one is down.
  CABINET_ADDR="$(api_addr 1),$(api_addr 2),$(api_addr 3)"
  export CABINET_ADDR
  "$BIN" operator list-peers
  cat > "$RUN/env" <<ENV
export CABINET_ADDR=$CABINET_ADDR
export CABINET_CACERT=$CABINET_CACERT
export CABINET_CLIENT_CERT=$CABINET_CLIENT_CERT
export CABINET_CLIENT_KEY=$CABINET_CLIENT_KEY
export PATH=$ROOT/.run/bin:\$PATH
ENV
  cat <<MSG

Cabinet is running: three nodes on $(api_addr 1), $(api_addr 2), $(api_addr 3) (logs: $RUN/node*/server.log).
Talk to it from this shell with:

$(cat "$RUN/env")

(or: source $RUN/env). Then try:
  cabinet key create --spec AES_256 --alias demo
  echo hello | cabinet key encrypt --key demo --context app=demo > ct.b64
  cabinet key decrypt --in ct.b64 --context app=demo --addr $(api_addr 3)
  cabinet key data-key --key demo
  cabinet operator list-peers
Stop it with 'make cluster-down'; 'make cluster' resumes the same cluster and keys.
MSG
}

down() {
  for n in "${NODES[@]}"; do
    local d; d="$(ndir "$n")"
    if running "$n"; then
      kill "$(cat "$d/pid")" || true
    fi
  done
  for n in "${NODES[@]}"; do
    local d; d="$(ndir "$n")" i=0
    while running "$n" && (( i < 50 )); do sleep 0.1; i=$((i + 1)); done
    if running "$n"; then kill -9 "$(cat "$d/pid")" || true; fi
    rm -f "$d/pid"
  done
  echo "Cabinet cluster stopped (data kept in $RUN; 'make cluster' resumes it, 'make cluster-clean' deletes it)."
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  clean) down; rm -rf "$RUN"; echo "removed $RUN" ;;
  *) echo "usage: $0 up|down|clean" >&2; exit 2 ;;
esac
