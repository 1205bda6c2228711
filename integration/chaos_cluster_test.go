package integration

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/client"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// chaosCluster is a testCluster whose nodes listen on private addresses
// while advertising addresses owned by a faultProxy, so that every byte
// between nodes crosses the proxy. The test's own clients talk to each
// node's real API listen address, so client traffic is never cut.
type chaosCluster struct {
	*testCluster
	proxy      *faultProxy
	apiListen  []string
	raftListen []string
	clients    []*client.Client

	mu      sync.Mutex
	pids    map[int]int
	stopped map[int]bool // SIGSTOPped
	hsmAway map[int]bool
}

func newChaosCluster(t *testing.T, n int, serverArgs ...string) *chaosCluster {
	t.Helper()
	cc := &chaosCluster{testCluster: newTestCluster(t, n), pids: map[int]int{}, stopped: map[int]bool{}, hsmAway: map[int]bool{}}
	cc.serverArgs = serverArgs
	cc.proxy = newFaultProxy(cc.pidMap)
	used := map[string]bool{}
	port := func() string {
		for {
			if p := stablePort(t); !used[p] {
				used[p] = true
				return p
			}
		}
	}
	for i, nd := range cc.nodes {
		cc.apiListen = append(cc.apiListen, port())
		cc.raftListen = append(cc.raftListen, port())
		if err := cc.proxy.route(i, nd.raftAddr, cc.raftListen[i]); err != nil {
			t.Fatal(err)
		}
		if err := cc.proxy.route(i, nd.apiAddr, cc.apiListen[i]); err != nil {
			t.Fatal(err)
		}
	}
	// Registered after newTestCluster's stopAll, so it runs first: thaw
	// frozen nodes and give tokens back before the harness stops them.
	t.Cleanup(func() {
		cc.restoreAll()
		for _, cl := range cc.clients {
			cl.Close()
		}
		cc.proxy.close()
	})
	return cc
}

// stablePort returns a free 127.0.0.1 port below the kernel's ephemeral
// range (/proc/sys/net/ipv4/ip_local_port_range, 32768+ by default). A node
// binds its listen ports again at every restart, and a port from the
// ephemeral range may meanwhile be taken by some outgoing connection.
func stablePort(t *testing.T) string {
	t.Helper()
	for i := 0; i < 200; i++ {
		addr := fmt.Sprintf("127.0.0.1:%d", 20000+rand.IntN(12000))
		if ln, err := net.Listen("tcp", addr); err == nil {
			ln.Close()
			return addr
		}
	}
	t.Fatal("no free port below the ephemeral range")
	return ""
}

func (cc *chaosCluster) pidMap() map[int]int {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	m := make(map[int]int, len(cc.pids))
	for k, v := range cc.pids {
		m[k] = v
	}
	return m
}

// startNode is the harness's start with the node's private listen addresses.
func (cc *chaosCluster) startNode(i int) {
	nd := cc.nodes[i]
	logf, err := os.OpenFile(nd.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		cc.t.Fatal(err)
	}
	args := append([]string{"server", "--data-dir", nd.dataDir, "--log-level", "info",
		"--raft-listen", cc.raftListen[i], "--api-listen", cc.apiListen[i]}, cc.serverArgs...)
	cmd := exec.Command(cc.bin, args...)
	cmd.Env = append(os.Environ(), "CABINET_TEST_MATERIAL_LOG="+filepath.Join(cc.witness, nd.id+".material"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		cc.t.Fatal(err)
	}
	nd.cmd, nd.done = cmd, make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(nd.done) }()
	cc.mu.Lock()
	cc.pids[i] = cmd.Process.Pid
	cc.mu.Unlock()
}

func (cc *chaosCluster) running(i int) bool {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return cc.pids[i] != 0
}

// kill9 sends SIGKILL and waits for the process to be gone.
func (cc *chaosCluster) kill9(i int) {
	cc.mu.Lock()
	delete(cc.pids, i)
	delete(cc.stopped, i)
	cc.mu.Unlock()
	cc.kill(cc.nodes[i])
}

// terminate stops a node with SIGTERM (bounded by the harness).
func (cc *chaosCluster) terminate(i int) {
	cc.mu.Lock()
	delete(cc.pids, i)
	cc.mu.Unlock()
	cc.stop(cc.nodes[i])
}

func (cc *chaosCluster) signal(i int, sig syscall.Signal) {
	nd := cc.nodes[i]
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.pids[i] == 0 || nd.cmd == nil {
		return
	}
	_ = nd.cmd.Process.Signal(sig)
	cc.stopped[i] = sig == syscall.SIGSTOP
}

// hsmOutage moves node i's SoftHSM token directory away (away=true) or back.
func (cc *chaosCluster) hsmOutage(i int, away bool) error {
	nd := cc.nodes[i]
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.hsmAway[i] == away {
		return nil
	}
	var err error
	if away {
		err = os.Rename(nd.tokenDir, nd.tokenDir+".away")
	} else {
		err = os.Rename(nd.tokenDir+".away", nd.tokenDir)
	}
	if err == nil {
		cc.hsmAway[i] = away
	}
	return err
}

// restoreAll undoes every fault: heal, no delay, thaw, tokens back, and
// restart any node that is down.
func (cc *chaosCluster) restoreAll() {
	cc.proxy.heal()
	cc.proxy.setDelay(0)
	for i := range cc.nodes {
		cc.signal(i, syscall.SIGCONT)
		_ = cc.hsmOutage(i, false)
	}
}

func (cc *chaosCluster) restartDead() {
	for i := range cc.nodes {
		if !cc.running(i) {
			cc.startNode(i)
		}
	}
}

// connect makes one single-endpoint gRPC client per node (no failover:
// the chaos clients choose nodes themselves and record every attempt).
func (cc *chaosCluster) connect() {
	for _, addr := range cc.apiListen {
		cl, err := client.New([]string{addr},
			client.WithTLSFiles(filepath.Join(cc.adminDir, "ca.pem"), filepath.Join(cc.adminDir, "admin.pem"), filepath.Join(cc.adminDir, "admin-key.pem")),
			client.WithMaxAttempts(1), client.WithCallTimeout(3*time.Second))
		if err != nil {
			cc.t.Fatal(err)
		}
		cc.clients = append(cc.clients, cl)
	}
}

func (cc *chaosCluster) keys(i int) cabinetpb.KeyServiceClient { return cc.clients[i].Raw() }

func (cc *chaosCluster) nodeStatus(i int) (*cabinetpb.StatusResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return cc.clients[i].Operator().Status(ctx, &cabinetpb.StatusRequest{})
}

// bootstrap: init node 0, start everyone, join the rest through node 0.
func (cc *chaosCluster) bootstrap() {
	t := cc.t
	t.Helper()
	cc.initNode(cc.nodes[0])
	for i := range cc.nodes {
		cc.startNode(i)
	}
	cc.connect()
	cc.waitNodeHealthy(0, 60*time.Second)
	for _, nd := range cc.nodes[1:] {
		cc.joinNode(nd, cc.nodes[0])
	}
	for i := range cc.nodes {
		cc.waitNodeHealthy(i, 60*time.Second)
	}
}

func (cc *chaosCluster) nodeHealthy(i int) error {
	st, err := cc.nodeStatus(i)
	if err != nil {
		return err
	}
	if !st.GetHealthy() {
		return fmt.Errorf("%s unhealthy: %v", cc.nodes[i].id, st.GetUnhealthyReasons())
	}
	return nil
}

func (cc *chaosCluster) waitNodeHealthy(i int, timeout time.Duration) {
	cc.t.Helper()
	waitFor(cc.t, timeout, cc.nodes[i].id+" healthy", func() error { return cc.nodeHealthy(i) })
}

// pollUntil is waitFor that returns the error instead of failing the test
// (faults run on their own goroutine).
func pollUntil(ctx context.Context, timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if last = cond(); last == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond) // poll interval, bounded by the deadline
	}
	if last == nil {
		last = ctx.Err()
	}
	return fmt.Errorf("after %v: %w", timeout, last)
}

// leaderIndex asks every running node and returns the one that says it leads.
func (cc *chaosCluster) leaderIndex() (int, error) {
	for i := range cc.nodes {
		if !cc.running(i) {
			continue
		}
		st, err := cc.nodeStatus(i)
		if err == nil && st.GetRaftState() == "leader" {
			return i, nil
		}
	}
	return -1, errors.New("no running node reports itself leader")
}

// retryable: another node (or a later attempt) may answer differently.
func retryableCode(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Aborted, codes.Canceled, codes.Unknown, codes.Internal, codes.ResourceExhausted:
		return true
	}
	return false
}
