#!/usr/bin/env bash
# Runs every fuzz target of the module for FUZZTIME each (make fuzz; part of make test).
# A failure that wrote a crasher (testdata/fuzz/<Target>/...) fails at once, with the
# output. A failure without one is the fuzzing engine itself (e.g. a worker that did not
# answer in time on a loaded machine): its output is shown and the target runs once more;
# a second failure fails the run.
set -uo pipefail
cd "$(dirname "$0")/.."
FUZZTIME="${FUZZTIME:-5s}"
GO="${GO:-go}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for pkg in $("$GO" list ./...); do
  dir="$("$GO" list -f '{{.Dir}}' "$pkg")"
  for t in $("$GO" test -list '^Fuzz' "$pkg" 2>/dev/null | grep '^Fuzz' || true); do
    echo "fuzz $pkg $t"
    for attempt in 1 2; do
      before="$(ls "$dir/testdata/fuzz/$t" 2>/dev/null | wc -l)"
      if "$GO" test -run '^$' -fuzz "^$t\$" -fuzztime "$FUZZTIME" "$pkg" >"$log" 2>&1; then
        break
      fi
      after="$(ls "$dir/testdata/fuzz/$t" 2>/dev/null | wc -l)"
      echo "FAIL $t (attempt $attempt)"; tail -40 "$log"
      if [[ "$after" != "$before" ]]; then
        echo "a crasher was written to $dir/testdata/fuzz/$t: a real finding"; exit 1
      fi
      if [[ $attempt == 2 ]]; then exit 1; fi
      echo "no crasher was written: retrying $t once"
    done
  done
done
