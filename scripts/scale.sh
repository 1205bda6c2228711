#!/usr/bin/env bash
# Scale measurement (docs/PERFORMANCE.md, "Scale"): in-process state cost, and a real
# server's restart-to-serving with N AES-256 keys plus `cabinet bench --ops echo,encrypt`
# against it (gRPC encrypt as a ratio to its in-run Echo ceiling). Measurements, not checks: both tests
# skip unless CABINET_SCALE=1, and assert nothing about timings. Needs SoftHSM for the
# restart part and ~3 GiB free memory at 1M keys.
# Env: CABINET_SCALE_KEYS (default 10000,100000,1000000).
set -euo pipefail
cd "$(dirname "$0")/.."
export CABINET_SCALE=1
export CABINET_SCALE_KEYS="${CABINET_SCALE_KEYS:-10000,100000,1000000}"
echo "== in-process: heap/key, snapshot size, take/restore, apply, Key(), encrypt (fsm/scale_test.go)"
go test -run '^TestScale$' -v -count=1 -timeout 60m ./fsm | grep -E '^\||ok|FAIL'
echo "== real server: restart-to-healthy, RSS, encrypt over gRPC (cabinet bench), snapshot save (integration/scale_test.go)"
go test -run '^TestScaleRestart$' -v -count=1 -timeout 60m ./integration 2>&1 | grep -E 'SCALE|ok|FAIL|panic'
