#!/bin/sh
# Cabinet container entrypoint (evaluation with SoftHSM2; see docs/DOCKER.md).
#
# CABINET_ROLE=init: on first start, create the SoftHSM token and run
#   `operator init`, writing the first admin's credentials to CABINET_ADMIN_DIR.
# CABINET_ROLE=join: on first start, create the token, wait for the admin
#   credentials in CABINET_ADMIN_DIR, ask CABINET_JOIN_PEER for a join token and
#   run `operator join`.
# Either way the server then runs (`cabinet server ...`, the CMD). On later
# starts the data dir already holds node.json and the server just starts.
#
# Production: mount the vendor PKCS#11 library and set CABINET_HSM_LIB and
# CABINET_HSM_TOKEN_LABEL; do not use the generated PIN file, provide
# CABINET_HSM_PIN from a secret.
set -eu

if [ "${1:-}" != "server" ]; then
  exec cabinet "$@"
fi

: "${CABINET_DATA_DIR:=/var/lib/cabinet/data}"
: "${CABINET_NODE_ID:?set CABINET_NODE_ID}"
: "${CABINET_API_ADDR:?set CABINET_API_ADDR (IP:port, advertised)}"
: "${CABINET_RAFT_ADDR:?set CABINET_RAFT_ADDR (IP:port, advertised)}"
: "${CABINET_ROLE:=init}"
: "${CABINET_ADMIN_DIR:=/var/lib/cabinet/admin}"
: "${CABINET_HSM_LIB:=/usr/lib/softhsm/libsofthsm2.so}"
: "${CABINET_HSM_TOKEN_LABEL:=cabinet-${CABINET_NODE_ID}}"
HSM_DIR=/var/lib/cabinet/softhsm
export SOFTHSM2_CONF="$HSM_DIR/softhsm2.conf"

if [ ! -f "$CABINET_DATA_DIR/node.json" ]; then
  hsm_flags="--hsm-lib $CABINET_HSM_LIB --hsm-token-label $CABINET_HSM_TOKEN_LABEL"
  if [ "$CABINET_HSM_LIB" = /usr/lib/softhsm/libsofthsm2.so ]; then
    mkdir -p "$HSM_DIR/tokens"
    [ -f "$SOFTHSM2_CONF" ] || printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$HSM_DIR" > "$SOFTHSM2_CONF"
    if [ ! -f "$HSM_DIR/pin" ]; then
      (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$HSM_DIR/pin")
    fi
    if ! softhsm2-util --show-slots | grep -q "Label:.*$CABINET_HSM_TOKEN_LABEL"; then
      softhsm2-util --init-token --free --label "$CABINET_HSM_TOKEN_LABEL" \
        --pin "$(cat "$HSM_DIR/pin")" --so-pin "so-$(cat "$HSM_DIR/pin")" >/dev/null
    fi
    hsm_flags="$hsm_flags --hsm-pin-file $HSM_DIR/pin --softhsm-conf $SOFTHSM2_CONF"
  fi
  case "$CABINET_ROLE" in
    init)
      # shellcheck disable=SC2086
      cabinet operator init --data-dir "$CABINET_DATA_DIR" --node-id "$CABINET_NODE_ID" \
        --api-addr "$CABINET_API_ADDR" --raft-addr "$CABINET_RAFT_ADDR" --admin-out "$CABINET_ADMIN_DIR" $hsm_flags
      ;;
    join)
      : "${CABINET_JOIN_PEER:?set CABINET_JOIN_PEER (API address of a member)}"
      echo "waiting for the admin credentials in $CABINET_ADMIN_DIR and for $CABINET_JOIN_PEER..."
      export CABINET_CACERT="$CABINET_ADMIN_DIR/ca.pem" CABINET_CLIENT_CERT="$CABINET_ADMIN_DIR/admin.pem" CABINET_CLIENT_KEY="$CABINET_ADMIN_DIR/admin-key.pem"
      until [ -f "$CABINET_CLIENT_KEY" ] && token="$(cabinet operator join-token create --quiet --addr "$CABINET_JOIN_PEER" --timeout 5s 2>/dev/null)"; do
        sleep 2
      done
      # shellcheck disable=SC2086
      cabinet operator join --token "$token" --peer "$CABINET_JOIN_PEER" --data-dir "$CABINET_DATA_DIR" \
        --node-id "$CABINET_NODE_ID" --api-addr "$CABINET_API_ADDR" --raft-addr "$CABINET_RAFT_ADDR" $hsm_flags
      unset CABINET_CACERT CABINET_CLIENT_CERT CABINET_CLIENT_KEY
      ;;
    *)
      echo "CABINET_ROLE must be init or join" >&2
      exit 2
      ;;
  esac
fi

# Not server options: keep them from looking like ones.
unset CABINET_NODE_ID CABINET_API_ADDR CABINET_RAFT_ADDR CABINET_ROLE CABINET_ADMIN_DIR CABINET_JOIN_PEER CABINET_HSM_LIB CABINET_HSM_TOKEN_LABEL
exec cabinet "$@"
