#!/usr/bin/env bash
# Disaster-recovery drill, end to end on this machine (what `make dr-drill` runs; runbook: docs/DR.md).
#
#  1. build cabinet; start a 3-node cluster on fresh SoftHSM tokens
#  2. create keys (one rotated) and ciphertexts (with encryption contexts, data keys)
#  3. snapshot save (through a follower) + inspect; recovery keygen + recovery export
#  4. destroy every node: kill -9, delete every data dir and SoftHSM token
#  5. recovery restore into a new node with a new token, start it, join 2 more new nodes
#  6. decrypt every ciphertext through the new nodes and compare with the plaintexts
#
# Prints: keys restored, ciphertexts verified, time taken. Exit status 0 only if every
# ciphertext decrypts to its plaintext. Everything lives under .run/dr-drill (wiped first).
# Env: CABINET_DR_BASE_PORT (default 7600), DR_KEYS (default 6), DR_CIPHERTEXTS_PER_KEY (default 4).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RUN="${CABINET_DR_RUN_DIR:-$ROOT/.run/dr-drill}"
BIN="$ROOT/.run/bin/cabinet"
BASE="${CABINET_DR_BASE_PORT:-7600}"
KEYS="${DR_KEYS:-6}"
PER_KEY="${DR_CIPHERTEXTS_PER_KEY:-4}"
SOFTHSM_LIB=/usr/lib/softhsm/libsofthsm2.so

T0=$SECONDS
log() { printf '[dr-drill %3ds] %s\n' $((SECONDS - T0)) "$*"; }
die() { echo "dr-drill FAILED: $*" >&2; exit 1; }

# Node naming: old cluster o1..o3 (API BASE+1..3, Raft BASE+102,104,106), new cluster n1..n3
# (API BASE+11..13, Raft BASE+122,124,126). Raft ports are two apart: gossip uses Raft port + 1.
api()  { case $1 in o*) echo "127.0.0.1:$((BASE + ${1#o}))";; n*) echo "127.0.0.1:$((BASE + 10 + ${1#n}))";; esac; }
raft() { case $1 in o*) echo "127.0.0.1:$((BASE + 100 + 2 * ${1#o}))";; n*) echo "127.0.0.1:$((BASE + 120 + 2 * ${1#n}))";; esac; }
nd()   { echo "$RUN/$1"; }

PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

token() { # token NODE: a fresh SoftHSM token, config and PIN for NODE
  local d; d="$(nd "$1")"
  mkdir -p "$d/tokens" "$d/data"; chmod 700 "$d"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$d/tokens" > "$d/softhsm2.conf"
  (umask 077; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$d/pin")
  SOFTHSM2_CONF="$d/softhsm2.conf" softhsm2-util --init-token --free --label "cabinet-dr-$1" \
    --pin "$(cat "$d/pin")" --so-pin "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" >/dev/null
}
hsm() { local d; d="$(nd "$1")"; echo "--hsm-lib $SOFTHSM_LIB --hsm-token-label cabinet-dr-$1 --hsm-pin-file $d/pin --softhsm-conf $d/softhsm2.conf"; }
node_flags() { echo "--data-dir $(nd "$1")/data --node-id $1 --api-addr $(api "$1") --raft-addr $(raft "$1")"; }

start() {
  "$BIN" server --data-dir "$(nd "$1")/data" --log-level warn >>"$(nd "$1").log" 2>&1 &
  eval "PID_$1=$!"; PIDS+=("$!")
}
healthy() { # healthy NODE SECONDS
  local deadline=$((SECONDS + $2))
  while (( SECONDS < deadline )); do
    "$BIN" operator status --addr "$(api "$1")" -o json --timeout 2s 2>/dev/null | grep -Eq '"healthy": *true' && return 0
    sleep 0.3
  done
  tail -n 20 "$(nd "$1").log" >&2
  die "node $1 did not become healthy within $2s (log: $(nd "$1").log)"
}
creds() { # creds DIR: use DIR's admin credentials
  export CABINET_CACERT="$1/ca.pem" CABINET_CLIENT_CERT="$1/admin.pem" CABINET_CLIENT_KEY="$1/admin-key.pem"
}
join() { # join NODE VIA
  local tok; tok="$("$BIN" operator join-token create --quiet --addr "$(api "$2")")"
  # shellcheck disable=SC2046
  "$BIN" operator join --token "$tok" --peer "$(api "$2")" $(node_flags "$1") $(hsm "$1") >/dev/null
}

command -v softhsm2-util >/dev/null && [[ -e $SOFTHSM_LIB ]] || die "SoftHSM2 is missing: run 'make deps' (apt-get install -y softhsm2)"
rm -rf "$RUN"; mkdir -p "$RUN"; chmod 700 "$RUN"
log "building cabinet"
(cd "$ROOT" && go build -o "$BIN" ./cmd/cabinet)

# ---- 1. the cluster that will be lost ----
log "starting the original cluster (o1, o2, o3)"
for n in o1 o2 o3; do token "$n"; done
# shellcheck disable=SC2046
"$BIN" operator init $(node_flags o1) $(hsm o1) --admin-out "$RUN/admin-old" >/dev/null
creds "$RUN/admin-old"
for n in o1 o2 o3; do start "$n"; done
healthy o1 60
join o2 o1; join o3 o1
for n in o1 o2 o3; do healthy "$n" 60; done

# ---- 2. keys and ciphertexts ----
log "creating $KEYS keys and $((KEYS * PER_KEY + 2)) ciphertexts"
CT="$RUN/ciphertexts"; mkdir -p "$CT"
nodes=(o1 o2 o3); i=0
for k in $(seq 1 "$KEYS"); do
  "$BIN" key create --spec AES_256 --alias "dr-key-$k" --addr "$(api "${nodes[k % 3]}")" >/dev/null
  for c in $(seq 1 "$PER_KEY"); do
    if (( k == 1 && c == PER_KEY )); then # key 1's last ciphertexts are under version 2
      "$BIN" key rotate "dr-key-1" --addr "$(api o1)" >/dev/null
    fi
    i=$((i + 1)); via="${nodes[i % 3]}"
    head -c $((32 + i)) /dev/urandom > "$CT/$i.plain"
    echo "tenant=t$k" > "$CT/$i.ctx"
    "$BIN" key encrypt --key "dr-key-$k" --context "tenant=t$k" --in "$CT/$i.plain" --addr "$(api "$via")" > "$CT/$i.b64"
  done
done
for d in 1 2; do # data keys: plaintext + ciphertext under a managed key
  i=$((i + 1))
  out="$("$BIN" key data-key --key "dr-key-$d" -o json --addr "$(api o2)")"
  echo "$out" | sed -n 's/.*"plaintext": *"\([^"]*\)".*/\1/p' | base64 -d > "$CT/$i.plain"
  echo "$out" | sed -n 's/.*"ciphertext": *"\([^"]*\)".*/\1/p' > "$CT/$i.b64"
  : > "$CT/$i.ctx"
  [[ -s "$CT/$i.plain" && -s "$CT/$i.b64" ]] || die "could not parse the data key output"
done
TOTAL_CT=$i
KEYS_BEFORE=$("$BIN" key list -o json --addr "$(api o1)" | grep -c '"keyId"')

# ---- 3. backups ----
log "snapshot save through follower, inspect, recovery keygen + export"
follower=""
for n in o1 o2 o3; do
  "$BIN" operator status --addr "$(api "$n")" -o json | grep -Eq '"raftState": *"follower"' && { follower=$n; break; }
done
[[ -n "$follower" ]] || die "no follower found"
mkdir -p "$RUN/backup"
"$BIN" operator snapshot save "$RUN/backup/state.snap" --addr "$(api "$follower")" --progress always | sed 's/^/    /'
"$BIN" operator snapshot inspect "$RUN/backup/state.snap" | sed 's/^/    /'
"$BIN" operator recovery keygen --out "$RUN/offline" >/dev/null 2>&1
"$BIN" operator recovery export --recovery-pubkey "$RUN/offline/recovery-pub.pem" --out "$RUN/backup/kek.bundle" --addr "$(api o2)" | sed 's/^/    /'

# ---- 4. disaster ----
log "DISASTER: kill -9 every node, delete every data dir and SoftHSM token"
for n in o1 o2 o3; do eval "kill -9 \$PID_$n" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()
rm -rf "$(nd o1)" "$(nd o2)" "$(nd o3)" "$RUN/admin-old"
T_RESTORE=$SECONDS

# ---- 5. restore into new nodes ----
log "restoring into a new node n1 with a new HSM token"
for n in n1 n2 n3; do token "$n"; done
# shellcheck disable=SC2046
"$BIN" operator recovery restore --snapshot "$RUN/backup/state.snap" --bundle "$RUN/backup/kek.bundle" \
  --recovery-key "$RUN/offline/recovery-key.pem" $(node_flags n1) $(hsm n1) --admin-out "$RUN/admin" | sed 's/^/    /'
creds "$RUN/admin"
start n1
healthy n1 60
log "joining n2, n3 as usual"
start n2; start n3
join n2 n1; join n3 n1
for n in n1 n2 n3; do healthy "$n" 60; done
"$BIN" operator list-peers --addr "$(api n2)" | sed 's/^/    /'

# ---- 6. verify ----
log "decrypting every ciphertext through the new nodes"
nodes=(n1 n2 n3); ok=0
for j in $(seq 1 "$TOTAL_CT"); do
  via="${nodes[j % 3]}"
  ctx=(); [[ -s "$CT/$j.ctx" ]] && ctx=(--context "$(cat "$CT/$j.ctx")")
  if "$BIN" key decrypt --in "$CT/$j.b64" "${ctx[@]}" --out "$CT/$j.out" --addr "$(api "$via")" 2>"$CT/$j.err" \
     && cmp -s "$CT/$j.plain" "$CT/$j.out"; then
    ok=$((ok + 1))
  else
    echo "  ciphertext $j via $via: $(cat "$CT/$j.err")" >&2
  fi
done
KEYS_AFTER=$("$BIN" key list -o json --addr "$(api n3)" | grep -c '"keyId"')
for n in n1 n2 n3; do eval "kill \$PID_$n" 2>/dev/null || true; done
wait 2>/dev/null || true
PIDS=()

echo
echo "DR drill report"
echo "  keys restored:          $KEYS_AFTER of $KEYS_BEFORE"
echo "  ciphertexts verified:   $ok of $TOTAL_CT"
echo "  restore to verified:    $((SECONDS - T_RESTORE))s (new tokens, restore, 3 nodes healthy, every decrypt)"
echo "  time taken (total):     $((SECONDS - T0))s"
echo "  artefacts:              $RUN (backup/, logs)"
if (( ok != TOTAL_CT || KEYS_AFTER != KEYS_BEFORE )); then
  die "not every key or ciphertext survived"
fi
echo "  result:                 PASS"
