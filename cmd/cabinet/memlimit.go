package main

import (
	"fmt"
	"math"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
)

// cgroupMemoryMax is where cgroup v2 publishes the memory limit of this
// process's group ("max" when unlimited).
const cgroupMemoryMax = "/sys/fs/cgroup/memory.max"

// parseMemoryLimit reads --memory-limit: "" (leave Go's default: the
// GOMEMLIMIT environment variable, or none), "auto" (90% of the cgroup v2
// memory limit when there is one, else none), or a size: bytes, or a number
// with KiB/MiB/GiB (powers of 1024) or KB/MB/GB (powers of 1000).
func parseMemoryLimit(s string, readFile func(string) ([]byte, error)) (int64, error) {
	s = strings.TrimSpace(s)
	switch s {
	case "":
		return 0, nil
	case "auto":
		b, err := readFile(cgroupMemoryMax)
		if err != nil {
			return 0, nil // not in a cgroup v2 group with a limit
		}
		v := strings.TrimSpace(string(b))
		if v == "max" || v == "" {
			return 0, nil
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			return 0, fmt.Errorf("--memory-limit auto: %s holds %q, not a byte count", cgroupMemoryMax, v)
		}
		return n / 10 * 9, nil
	}
	units := []struct {
		suffix string
		mult   float64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"B", 1}}
	num, mult := s, 1.0
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			num, mult = strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(num, 64)
	if err != nil || f <= 0 || math.IsInf(f, 0) || f*mult > math.MaxInt64 {
		return 0, fmt.Errorf("--memory-limit %q: want a size such as 1200MiB or 1.5GiB, \"auto\" or empty", s)
	}
	n := int64(f * mult)
	if n < 64<<20 {
		return 0, fmt.Errorf("--memory-limit %q is below 64MiB; a node cannot run in that", s)
	}
	return n, nil
}

// applyMemoryLimit sets the Go runtime's soft memory limit: the garbage
// collector works harder as the heap nears it, so a node with a large state
// (e.g. 1M keys, ~780 MB live) stays near live + headroom instead of growing
// toward twice its live heap under load. It is soft: a state larger than the
// limit still runs (with more GC CPU), it never fails allocations.
func applyMemoryLimit(s string) (int64, error) {
	n, err := parseMemoryLimit(s, os.ReadFile)
	if err != nil || n == 0 {
		return 0, err
	}
	debug.SetMemoryLimit(n)
	return n, nil
}
