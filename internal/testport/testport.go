// Package testport hands out 127.0.0.1 ports for tests' listeners and child
// processes.
//
// A port from "127.0.0.1:0" that is closed until something binds it (a
// child process, a restarted node) can meanwhile become the source port of
// some outgoing connection, because the kernel picks both from the ephemeral
// range. These ports come from below that range instead
// (/proc/sys/net/ipv4/ip_local_port_range; 32768 when unknown), ending 200
// below it so a derived port (gossip: Raft port + 100) stays below it too.
// The start is random so concurrent test processes spread out, and no port
// is handed out twice within a process.
package testport

import (
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
)

var ports struct {
	mu     sync.Mutex
	next   int
	issued map[int]bool
}

// portRange is [lo, hi): up to 20000 ports ending 200 below the ephemeral
// range.
func portRange() (lo, hi int) {
	eph := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 3072 {
				eph = n
			}
		}
	}
	hi = eph - 200
	return max(1024, hi-20000), hi
}

// Listen returns a TCP listener on a 127.0.0.1 port that this process did
// not hand out before.
func Listen(t testing.TB) net.Listener {
	t.Helper()
	ports.mu.Lock()
	defer ports.mu.Unlock()
	lo, hi := portRange()
	initLocked()
	if ports.next < lo || ports.next >= hi {
		ports.next = lo + rand.IntN(hi-lo)
	}
	for range hi - lo {
		p := ports.next
		if ports.next++; ports.next >= hi {
			ports.next = lo
		}
		if ports.issued[p] {
			continue
		}
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
		if err != nil {
			continue // in use
		}
		ports.issued[p] = true
		return ln
	}
	t.Fatalf("no free 127.0.0.1 port in [%d, %d)", lo, hi)
	return nil
}

// Addr returns a 127.0.0.1 address whose port was free a moment ago (a test
// bind succeeded) and that this process did not hand out before, for
// something that binds it later (a child process).
func Addr(t testing.TB) string {
	t.Helper()
	ln := Listen(t)
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// Reserve marks addr's port as handed out (for a port derived from another,
// such as a gossip port at Raft port + 100) and reports whether it was
// still free to reserve.
func Reserve(addr string) bool {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	port, err := strconv.Atoi(p)
	if err != nil {
		return false
	}
	ports.mu.Lock()
	defer ports.mu.Unlock()
	initLocked()
	if ports.issued[port] {
		return false
	}
	ports.issued[port] = true
	return true
}

func initLocked() {
	if ports.issued == nil {
		ports.issued = map[int]bool{}
	}
}
