package integration

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// faultProxy owns every node's advertised addresses (Raft and API) and
// forwards each connection to the node's real listen address. All
// node-to-node traffic therefore passes through it, and it can partition
// any set of nodes from the rest, delay traffic and drop connections.
//
// A connection's source node is found from the kernel: the accepted
// socket's peer port is looked up in /proc/net/tcp to get the dialling
// socket's inode, and that inode in /proc/PID/fd of every node process.
// Connections from anything else (the test's own CLI calls) have source -1
// and are cut only when their destination is isolated from everyone.
type faultProxy struct {
	mu       sync.Mutex
	routes   []*proxyRoute
	pids     func() map[int]int // node index -> pid of the running process
	side     map[int]int        // node index -> partition side; nil = healed
	delay    time.Duration
	conns    map[*proxyConn]struct{}
	closed   bool
	accepted int
	cut      int
}

type proxyRoute struct {
	dst    int // node index
	listen net.Listener
	target string
}

type proxyConn struct {
	src, dst  int
	a, b      net.Conn
	closeOnce sync.Once
}

func (pc *proxyConn) close() {
	pc.closeOnce.Do(func() { pc.a.Close(); pc.b.Close() })
}

func newFaultProxy(pids func() map[int]int) *faultProxy {
	return &faultProxy{pids: pids, conns: map[*proxyConn]struct{}{}}
}

// route listens on advertised (a free 127.0.0.1 port) and forwards to
// target, a listen address of node dst.
func (p *faultProxy) route(dst int, advertised, target string) error {
	ln, err := net.Listen("tcp", advertised)
	if err != nil {
		return fmt.Errorf("proxy listen %s: %w", advertised, err)
	}
	r := &proxyRoute{dst: dst, listen: ln, target: target}
	p.mu.Lock()
	p.routes = append(p.routes, r)
	p.mu.Unlock()
	go p.serve(r)
	return nil
}

func (p *faultProxy) serve(r *proxyRoute) {
	for {
		c, err := r.listen.Accept()
		if err != nil {
			return
		}
		go p.handle(r, c)
	}
}

func (p *faultProxy) handle(r *proxyRoute, c net.Conn) {
	src := p.sourceOf(c)
	p.mu.Lock()
	p.accepted++
	allowed := p.allowedLocked(src, r.dst)
	p.mu.Unlock()
	if !allowed {
		c.Close()
		return
	}
	up, err := net.DialTimeout("tcp", r.target, 2*time.Second)
	if err != nil {
		c.Close()
		return
	}
	pc := &proxyConn{src: src, dst: r.dst, a: c, b: up}
	p.mu.Lock()
	if p.closed || !p.allowedLocked(src, r.dst) {
		p.mu.Unlock()
		pc.close()
		return
	}
	p.conns[pc] = struct{}{}
	p.mu.Unlock()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.pipe(up, c); pc.close() }()
	go func() { defer wg.Done(); p.pipe(c, up); pc.close() }()
	wg.Wait()
	p.mu.Lock()
	delete(p.conns, pc)
	p.mu.Unlock()
}

// pipe copies src to dst. Each chunk is stamped when read and written
// no earlier than the delay in force at that moment: latency, not a
// throughput limit, so a backlog cannot make messages older than the delay.
func (p *faultProxy) pipe(dst, src net.Conn) {
	type chunk struct {
		b   []byte
		due time.Time
	}
	ch := make(chan chunk, 256)
	go func() {
		defer close(ch)
		for {
			buf := make([]byte, 32<<10)
			n, err := src.Read(buf)
			if n > 0 {
				p.mu.Lock()
				d := p.delay
				p.mu.Unlock()
				ch <- chunk{buf[:n], time.Now().Add(d)}
			}
			if err != nil {
				return
			}
		}
	}()
	for c := range ch {
		if w := time.Until(c.due); w > 0 {
			time.Sleep(w) // injected latency
		}
		if _, err := dst.Write(c.b); err != nil {
			src.Close()
			for range ch {
			}
			return
		}
	}
	if tc, ok := dst.(*net.TCPConn); ok {
		tc.CloseWrite()
	}
}

// allowedLocked: nodes on different sides of a partition cannot talk; an
// unknown source (-1) is cut only from an isolated destination.
func (p *faultProxy) allowedLocked(src, dst int) bool {
	if p.side == nil {
		return true
	}
	if src < 0 {
		return p.side[dst] == 0
	}
	return p.side[src] == p.side[dst]
}

// partition splits the nodes: isolated go to side 1, everyone else stays
// on side 0. Connections across the cut are closed at once.
func (p *faultProxy) partition(isolated ...int) {
	p.mu.Lock()
	p.side = map[int]int{}
	for _, i := range isolated {
		p.side[i] = 1
	}
	var cut []*proxyConn
	for pc := range p.conns {
		if !p.allowedLocked(pc.src, pc.dst) {
			cut = append(cut, pc)
		}
	}
	p.cut += len(cut)
	p.mu.Unlock()
	for _, pc := range cut {
		pc.close()
	}
}

func (p *faultProxy) heal() {
	p.mu.Lock()
	p.side = nil
	p.mu.Unlock()
}

func (p *faultProxy) setDelay(d time.Duration) {
	p.mu.Lock()
	p.delay = d
	p.mu.Unlock()
}

// dropAll closes every open connection (nodes must reconnect).
func (p *faultProxy) dropAll() int {
	p.mu.Lock()
	var all []*proxyConn
	for pc := range p.conns {
		all = append(all, pc)
	}
	p.cut += len(all)
	p.mu.Unlock()
	for _, pc := range all {
		pc.close()
	}
	return len(all)
}

func (p *faultProxy) close() {
	p.mu.Lock()
	p.closed = true
	routes := p.routes
	p.mu.Unlock()
	for _, r := range routes {
		r.listen.Close()
	}
	p.dropAll()
}

// sourceOf finds which node process dialled c, or -1.
func (p *faultProxy) sourceOf(c net.Conn) int {
	peer, ok := c.RemoteAddr().(*net.TCPAddr)
	local, ok2 := c.LocalAddr().(*net.TCPAddr)
	if !ok || !ok2 {
		return -1
	}
	// The dialler's socket: local = our peer, remote = our local address.
	want := fmt.Sprintf("0100007F:%04X 0100007F:%04X", peer.Port, local.Port)
	inode := ""
	for attempt := 0; attempt < 3 && inode == ""; attempt++ {
		inode = findInode(want)
		if inode == "" {
			time.Sleep(5 * time.Millisecond) // the entry can lag the accept briefly
		}
	}
	if inode == "" {
		return -1
	}
	target := "socket:[" + inode + "]"
	for idx, pid := range p.pids() {
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if l, err := os.Readlink(filepath.Join(fmt.Sprintf("/proc/%d/fd", pid), fd.Name())); err == nil && l == target {
				return idx
			}
		}
	}
	return -1
}

func findInode(localRemote string) string {
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 {
			continue
		}
		if fields[1]+" "+fields[2] == localRemote {
			if _, err := strconv.Atoi(fields[9]); err == nil && fields[9] != "0" {
				return fields[9]
			}
		}
	}
	return ""
}
