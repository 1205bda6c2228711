#!/usr/bin/env bash
# Installs what Cabinet's tests and local cluster need when it is missing: SoftHSM2.
set -euo pipefail
if [[ -e /usr/lib/softhsm/libsofthsm2.so ]] && command -v softhsm2-util >/dev/null; then exit 0; fi
if [[ $(id -u) -ne 0 ]]; then
  echo "SoftHSM2 is missing and installing it needs root: sudo apt-get install -y softhsm2" >&2
  exit 1
fi
echo "Installing SoftHSM2..."
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
