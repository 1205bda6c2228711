#!/usr/bin/env bash
# Installs what Cabinet's tests and local cluster need when it is missing: SoftHSM2, and openssl
# (the known-answer tests check Cabinet's signatures and ciphertexts with it).
set -euo pipefail
if [[ -e /usr/lib/softhsm/libsofthsm2.so ]] && command -v softhsm2-util >/dev/null && command -v openssl >/dev/null; then exit 0; fi
if [[ $(id -u) -ne 0 ]]; then
  echo "SoftHSM2 or openssl is missing and installing needs root: sudo apt-get install -y softhsm2 openssl" >&2
  exit 1
fi
echo "Installing SoftHSM2 and openssl..."
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 openssl >/dev/null
