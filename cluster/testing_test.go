package cluster

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/internal/testport"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

// In-process clusters for tests: real Raft over the real TLS stream layer on
// 127.0.0.1 with raft-boltdb in t.TempDir(); forwarding goes straight to the
// leader's Node (the gRPC hop is tested in integration/).

// waitFor polls cond until it returns nil or the deadline passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if last = cond(); last == nil {
			return
		}
		time.Sleep(20 * time.Millisecond) // poll interval, bounded by the deadline
	}
	t.Fatalf("timed out after %v waiting for %s: %v", timeout, what, last)
}

type testNode struct {
	id      string
	apiAddr string // a name only: the in-process forwarder routes by it
	dir     string
	raftLn  net.Listener
	fsm     *fsm.FSM
	node    *Node
	stopped bool
}

type testCluster struct {
	t            testing.TB
	ca           *tlsutil.CA
	mu           sync.Mutex
	nodes        []*testNode
	fwd          *directForwarder
	maxStaleness time.Duration
	configure    func(*Config) // optional, applied to every node's Config
}

// directForwarder routes ForwardApply/ReadIndex to the node owning apiAddr
// and can cut nodes off (as a partition would).
type directForwarder struct {
	c   *testCluster
	mu  sync.Mutex
	cut map[string]bool
}

func (d *directForwarder) find(addr string) (*Node, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cut[addr] {
		return nil, fmt.Errorf("%w: %s unreachable", ErrNoLeader, addr)
	}
	for _, n := range d.c.nodes {
		if n.apiAddr == addr && !n.stopped {
			return n.node, nil
		}
	}
	return nil, fmt.Errorf("%w: no node at %s", ErrNoLeader, addr)
}

func (d *directForwarder) ForwardApply(ctx context.Context, addr string, cmd []byte) ([]byte, uint64, error) {
	n, err := d.find(addr)
	if err != nil {
		return nil, 0, err
	}
	res, idx, err := n.ApplyForwarded(ctx, cmd)
	if err != nil {
		return nil, 0, err
	}
	b, err := fsm.EncodeResult(res)
	return b, idx, err
}

func (d *directForwarder) ReadIndex(ctx context.Context, addr string) (uint64, error) {
	n, err := d.find(addr)
	if err != nil {
		return 0, err
	}
	return n.ReadIndexLocal(ctx)
}

func newTestCluster(t testing.TB, n int) *testCluster {
	t.Helper()
	return newTestClusterWith(t, n, nil)
}

// newTestClusterWith is newTestCluster with configure applied to each
// node's Config before Open.
func newTestClusterWith(t testing.TB, n int, configure func(*Config)) *testCluster {
	t.Helper()
	ca, err := tlsutil.NewCA("test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	c := &testCluster{t: t, ca: ca, maxStaleness: 500 * time.Millisecond, configure: configure}
	c.fwd = &directForwarder{c: c, cut: map[string]bool{}}
	for i := 1; i <= n; i++ {
		id := fmt.Sprintf("node%d", i)
		tn := &testNode{id: id, apiAddr: "api-" + id, dir: t.TempDir()}
		c.nodes = append(c.nodes, tn)
		c.open(tn)
	}
	t.Cleanup(func() {
		for _, tn := range c.nodes {
			c.stop(tn)
		}
	})
	// node1 bootstraps and records the cluster; the others are admitted with
	// join tokens through Raft and added as voters, as in production.
	first := c.nodes[0]
	if err := first.node.Bootstrap(); err != nil {
		t.Fatal(err)
	}
	c.waitLeader()
	c.mustPropose(first, fsmpb.CommandType_COMMAND_TYPE_INIT_CLUSTER, &fsmpb.InitCluster{
		ClusterId: "c-test",
		CaCertDer: ca.CertDER,
		CaKey:     &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte("sealed-ca-key")},
		Kek:       &fsmpb.KEKVersion{Version: 1, CheckValue: []byte("kcv"), State: fsmpb.KEKState_KEK_STATE_ACTIVE},
		FirstNode: &fsmpb.NodeRecord{NodeId: first.id, ApiAddr: first.apiAddr, RaftAddr: first.raftLn.Addr().String(), IdentityPublicKeyDer: []byte("pub")},
	}, "init")
	for _, tn := range c.nodes[1:] {
		secret := sha256.Sum256([]byte("secret-" + tn.id))
		c.mustPropose(first, fsmpb.CommandType_COMMAND_TYPE_CREATE_JOIN_TOKEN, &fsmpb.CreateJoinToken{
			TokenId: "jt-" + tn.id, SecretHash: secret[:], ExpiresUnixNano: time.Now().Add(time.Hour).UnixNano(),
		}, "")
		c.mustPropose(first, fsmpb.CommandType_COMMAND_TYPE_ADMIT_NODE, &fsmpb.AdmitNode{
			TokenId: "jt-" + tn.id, SecretHash: secret[:],
			Node: &fsmpb.NodeRecord{NodeId: tn.id, ApiAddr: tn.apiAddr, RaftAddr: tn.raftLn.Addr().String(), IdentityPublicKeyDer: []byte("pub-" + tn.id)},
		}, "")
		// Through whichever node leads now: on a loaded machine node1 can
		// lose leadership while the cluster forms (adding a voter again is
		// harmless).
		c.onLeader("add voter "+tn.id, func(l *testNode) error {
			return l.node.AddVoter(context.Background(), tn.id, tn.raftLn.Addr().String())
		})
	}
	c.waitConverged()
	return c
}

func (c *testCluster) open(tn *testNode) {
	c.t.Helper()
	key, csr, err := tlsutil.NewNodeKey(tn.id)
	if err != nil {
		c.t.Fatal(err)
	}
	var ln net.Listener
	if tn.raftLn != nil {
		// Restart on the same address (below the ephemeral range: see
		// listenLoopback).
		if ln, err = net.Listen("tcp", tn.raftLn.Addr().String()); err != nil {
			c.t.Fatal(err)
		}
	} else {
		ln = listenLoopback(c.t)
	}
	tn.raftLn = ln
	der, err := c.ca.IssueNode(csr, tn.id, []net.IP{net.ParseIP("127.0.0.1")}, time.Now())
	if err != nil {
		c.t.Fatal(err)
	}
	cert, err := tlsutil.KeyPair(key, der, c.ca.CertDER)
	if err != nil {
		c.t.Fatal(err)
	}
	pool := c.ca.Pool()
	stream := tlsutil.NewStreamLayer(ln, ln.Addr(), tlsutil.NodeServerConfig(cert, pool), tlsutil.NodeClientConfig(cert, pool))
	tn.fsm = fsm.New(fsm.Config{})
	cfg := Config{
		NodeID: tn.id, RaftAddr: ln.Addr().String(), Dir: tn.dir, StreamLayer: stream, FSM: tn.fsm, Forwarder: c.fwd,
		// Short for quick elections, long enough that a loaded machine
		// (-race, shared 2-core CI) rarely loses a leader to a late
		// heartbeat. (1s/1s/500ms made the package ~35% slower.)
		MaxStaleness: c.maxStaleness, HeartbeatTimeout: 500 * time.Millisecond, ElectionTimeout: 500 * time.Millisecond,
		LeaderLeaseTimeout: 400 * time.Millisecond,
	}
	if c.configure != nil {
		c.configure(&cfg)
	}
	node, err := Open(cfg)
	if err != nil {
		c.t.Fatal(err)
	}
	// Under the forwarder's lock: nodes' background read-index calls look
	// nodes up concurrently.
	c.fwd.mu.Lock()
	tn.node, tn.stopped = node, false
	c.fwd.mu.Unlock()
}

func (c *testCluster) stop(tn *testNode) {
	c.fwd.mu.Lock()
	if tn.stopped || tn.node == nil {
		c.fwd.mu.Unlock()
		return
	}
	tn.stopped = true
	node := tn.node
	c.fwd.mu.Unlock()
	_ = node.Shutdown()
}

func (c *testCluster) restart(tn *testNode) {
	c.t.Helper()
	c.open(tn)
}

func (c *testCluster) live() []*testNode {
	var out []*testNode
	for _, tn := range c.nodes {
		if !tn.stopped {
			out = append(out, tn)
		}
	}
	return out
}

// notLeader reports whether err says only that the node asked is not (or no
// longer) the leader, so the call can go to the current leader instead.
func notLeader(err error) bool {
	return errors.Is(err, ErrNotLeader) || errors.Is(err, ErrNoLeader) ||
		errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) ||
		errors.Is(err, raft.ErrLeadershipTransferInProgress)
}

// onLeader runs op on the current leader and returns that node. If op fails
// because leadership moved meanwhile (a loaded machine can miss a heartbeat),
// it runs op again on the new leader, for up to 15s; any other error fails
// the test. op must be safe to repeat.
func (c *testCluster) onLeader(what string, op func(leader *testNode) error) *testNode {
	c.t.Helper()
	var ran *testNode
	waitFor(c.t, 15*time.Second, what+" on the leader", func() error {
		leader := c.waitLeader()
		err := op(leader)
		if err != nil && !notLeader(err) {
			c.t.Fatalf("%s on %s: %v", what, leader.id, err)
		}
		if err == nil {
			ran = leader
		}
		return err
	})
	return ran
}

func (c *testCluster) waitLeader() *testNode {
	c.t.Helper()
	var leader *testNode
	waitFor(c.t, 10*time.Second, "a leader", func() error {
		for _, tn := range c.live() {
			if tn.node.IsLeader() {
				leader = tn
				return nil
			}
		}
		return errors.New("no leader")
	})
	return leader
}

// waitConverged waits until every live node applied the same index and holds
// the same state digest.
func (c *testCluster) waitConverged() {
	c.t.Helper()
	waitFor(c.t, 15*time.Second, "convergence", func() error {
		live := c.live()
		want := live[0].fsm.Digest()
		idx := live[0].node.Status().AppliedIndex
		for _, tn := range live[1:] {
			if got := tn.node.Status().AppliedIndex; got != idx || tn.fsm.Digest() != want {
				return fmt.Errorf("%s at %d, %s at %d", live[0].id, idx, tn.id, got)
			}
		}
		return nil
	})
}

func (c *testCluster) propose(via *testNode, typ fsmpb.CommandType, payload proto.Message, reqID string) (*fsmpb.Result, error) {
	c.t.Helper()
	cmd, err := fsm.NewCommand(typ, payload, reqID, "admin:test")
	if err != nil {
		c.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return via.node.Propose(ctx, cmd)
}

func (c *testCluster) mustPropose(via *testNode, typ fsmpb.CommandType, payload proto.Message, reqID string) *fsmpb.Result {
	c.t.Helper()
	res, err := c.propose(via, typ, payload, reqID)
	if err != nil {
		c.t.Fatalf("propose %v via %s: %v", typ, via.id, err)
	}
	if res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
		c.t.Fatalf("propose %v via %s: %v %s", typ, via.id, res.GetCode(), res.GetMessage())
	}
	return res
}

// listenLoopback listens on a 127.0.0.1 port below the ephemeral range that
// this process did not hand out before (internal/testport).
func listenLoopback(t testing.TB) net.Listener { return testport.Listen(t) }
