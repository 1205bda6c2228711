package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// CPU accounting for the report (Linux /proc; everything degrades to
// "unknown" elsewhere). The machine is shared, so machine-wide busy time
// says how noisy a slice was, while the CPU cost of a request is taken from
// the processes that serve it: this bench process plus the cluster's node
// processes when they run on this machine.

// clockTicks is USER_HZ, the unit of /proc/stat and /proc/PID/stat (100 on
// every Linux architecture Go supports).
const clockTicks = 100

type cpuTimes struct{ busy, steal, total uint64 }

func (a cpuTimes) sub(b cpuTimes) cpuTimes {
	return cpuTimes{a.busy - b.busy, a.steal - b.steal, a.total - b.total}
}
func (a cpuTimes) add(b cpuTimes) cpuTimes {
	return cpuTimes{a.busy + b.busy, a.steal + b.steal, a.total + b.total}
}

// readCPUTimes reads the machine's aggregate CPU line: busy = user + nice +
// system + irq + softirq; total adds idle, iowait and steal.
func readCPUTimes() (cpuTimes, bool) {
	fh, err := os.Open("/proc/stat")
	if err != nil {
		return cpuTimes{}, false
	}
	defer fh.Close()
	line, err := bufio.NewReader(io.LimitReader(fh, 4096)).ReadString('\n')
	if err != nil {
		return cpuTimes{}, false
	}
	fs := strings.Fields(line)
	if len(fs) < 9 || fs[0] != "cpu" {
		return cpuTimes{}, false
	}
	v := make([]uint64, 8)
	for i := range v {
		if v[i], err = strconv.ParseUint(fs[i+1], 10, 64); err != nil {
			return cpuTimes{}, false
		}
	}
	user, nice, system, idle, iowait, irq, softirq, steal := v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]
	busy := user + nice + system + irq + softirq
	return cpuTimes{busy: busy, steal: steal, total: busy + idle + iowait + steal}, true
}

// procTicks is utime + stime of one process (all its threads).
func procTicks(pid string) (uint64, bool) {
	b, err := os.ReadFile(filepath.Join("/proc", pid, "stat"))
	if err != nil {
		return 0, false
	}
	// The command name (field 2) may hold spaces: fields start after ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, false
	}
	fs := strings.Fields(s[i+1:])
	if len(fs) < 13 { // fs[0] is field 3 (state); utime/stime are fields 14/15
		return 0, false
	}
	u, err1 := strconv.ParseUint(fs[11], 10, 64)
	st, err2 := strconv.ParseUint(fs[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return u + st, true
}

// cpuMeter samples the CPU time of a fixed set of processes and of the
// machine.
type cpuMeter struct {
	pids  []string // "self" and the node processes
	nodes int      // node processes found
	scope string
}

type cpuSample struct {
	proc      uint64
	procOK    bool
	machine   cpuTimes
	machineOK bool
}

func (m *cpuMeter) sample() cpuSample {
	var s cpuSample
	if m != nil && m.nodes > 0 {
		s.procOK = true
		for _, p := range m.pids {
			t, ok := procTicks(p)
			if !ok {
				s.procOK = false // a node died: this slice's cost is unknown
				break
			}
			s.proc += t
		}
	}
	s.machine, s.machineOK = readCPUTimes()
	return s
}

// replacePID swaps a restarted node's process into the meter.
func (m *cpuMeter) replacePID(old, new int) {
	if m == nil {
		return
	}
	for i, p := range m.pids {
		if p == strconv.Itoa(old) {
			m.pids[i] = strconv.Itoa(new)
		}
	}
}

// newCPUMeter finds the node processes: given pids (--local), or the
// processes listening on the nodes' API ports when those addresses are on
// this machine.
func newCPUMeter(nodes []benchNode, known []int) *cpuMeter {
	m := &cpuMeter{pids: []string{"self"}, scope: "unknown"}
	if _, ok := procTicks("self"); !ok {
		return m
	}
	pids := map[int]bool{}
	for _, p := range known {
		pids[p] = true
	}
	if len(known) == 0 {
		for _, p := range localListenerPIDs(nodes) {
			pids[p] = true
		}
	}
	for p := range pids {
		if p != os.Getpid() {
			m.pids = append(m.pids, strconv.Itoa(p))
			m.nodes++
		}
	}
	if m.nodes > 0 {
		m.scope = fmt.Sprintf("bench process + %d node process(es) on this machine", m.nodes)
	}
	return m
}

// localListenerPIDs maps the nodes' API addresses that are on this machine
// to the processes listening on them (via /proc/net/tcp* socket inodes).
func localListenerPIDs(nodes []benchNode) []int {
	local := map[string]bool{"127.0.0.1": true, "::1": true, "localhost": true, "0.0.0.0": true}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok {
				local[ipn.IP.String()] = true
			}
		}
	}
	ports := map[uint64]bool{}
	for _, n := range nodes {
		host, port, err := net.SplitHostPort(n.APIAddr)
		if err != nil || !(local[host] || strings.HasPrefix(host, "127.")) {
			continue
		}
		if p, err := strconv.ParseUint(port, 10, 16); err == nil {
			ports[p] = true
		}
	}
	if len(ports) == 0 {
		return nil
	}
	inodes := map[string]bool{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(line)
			if len(fs) < 10 || fs[3] != "0A" { // 0A = LISTEN
				continue
			}
			i := strings.LastIndexByte(fs[1], ':')
			if i < 0 {
				continue
			}
			if p, err := strconv.ParseUint(fs[1][i+1:], 16, 16); err == nil && ports[p] {
				inodes["socket:["+fs[9]+"]"] = true
			}
		}
	}
	if len(inodes) == 0 {
		return nil
	}
	procs, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range procs {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		fds, err := os.ReadDir(filepath.Join("/proc", e.Name(), "fd"))
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if l, err := os.Readlink(filepath.Join("/proc", e.Name(), "fd", fd.Name())); err == nil && inodes[l] {
				out = append(out, pid)
				break
			}
		}
	}
	return out
}
