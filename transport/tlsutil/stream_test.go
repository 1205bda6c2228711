package tlsutil

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// newTestStreamLayer listens on 127.0.0.1:0 and wraps the listener; the
// layer is closed at the end of the test.
func newTestStreamLayer(t *testing.T, serverCfg, clientCfg *tls.Config, opts ...StreamOption) *StreamLayer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	s := NewStreamLayer(ln, nil, serverCfg, clientCfg, opts...)
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// nodeStreamLayer is a stream layer of a node holding a certificate of p.
func nodeStreamLayer(t *testing.T, p *testPKI, nodeID string, opts ...StreamOption) *StreamLayer {
	t.Helper()
	cert := p.node(nodeID)
	return newTestStreamLayer(t, NodeServerConfig(cert, p.pool()), NodeClientConfig(cert, p.pool()), opts...)
}

// errRecorder collects handshake errors reported by a StreamLayer.
type errRecorder struct {
	mu   sync.Mutex
	errs []error
}

func (r *errRecorder) handler(_ net.Addr, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs = append(r.errs, err)
}

func (r *errRecorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.errs)
}

// countingFSM records applied commands.
type countingFSM struct {
	mu      sync.Mutex
	applied []string
}

func (f *countingFSM) Apply(l *raft.Log) any {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.applied = append(f.applied, string(l.Data))
	return nil
}

func (f *countingFSM) has(cmd string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.applied {
		if c == cmd {
			return true
		}
	}
	return false
}

func (f *countingFSM) Snapshot() (raft.FSMSnapshot, error) { return nopSnapshot{}, nil }
func (f *countingFSM) Restore(rc io.ReadCloser) error      { return rc.Close() }

type nopSnapshot struct{}

func (nopSnapshot) Persist(sink raft.SnapshotSink) error { return sink.Close() }
func (nopSnapshot) Release()                             {}

type testNode struct {
	raft *raft.Raft
	fsm  *countingFSM
}

func TestRaftClusterOverTLS(t *testing.T) {
	p := newTestPKI(t, "c1")
	const n = 3
	layers := make([]*StreamLayer, n)
	var servers []raft.Server
	for i := range layers {
		id := fmt.Sprintf("n%d", i+1)
		layers[i] = nodeStreamLayer(t, p, id)
		servers = append(servers, raft.Server{
			ID: raft.ServerID(id), Address: raft.ServerAddress(layers[i].Addr().String()),
		})
	}

	nodes := make([]testNode, n)
	for i, layer := range layers {
		cfg := raft.DefaultConfig()
		cfg.LocalID = servers[i].ID
		// Long enough that a loaded machine (-race, shared CI) does not
		// lose leadership over a late heartbeat.
		cfg.HeartbeatTimeout = time.Second
		cfg.ElectionTimeout = time.Second
		cfg.LeaderLeaseTimeout = 500 * time.Millisecond
		cfg.CommitTimeout = 10 * time.Millisecond
		cfg.Logger = hclog.New(&hclog.LoggerOptions{Name: string(cfg.LocalID), Output: io.Discard})
		trans := raft.NewNetworkTransport(layer, 3, 2*time.Second, io.Discard)
		fsm := &countingFSM{}
		store := raft.NewInmemStore()
		r, err := raft.NewRaft(cfg, fsm, store, store, raft.NewInmemSnapshotStore(), trans)
		if err != nil {
			t.Fatalf("NewRaft %s: %v", cfg.LocalID, err)
		}
		t.Cleanup(func() {
			if err := r.Shutdown().Error(); err != nil {
				t.Errorf("shutdown %s: %v", cfg.LocalID, err)
			}
			_ = trans.Close()
		})
		nodes[i] = testNode{raft: r, fsm: fsm}
	}
	if err := nodes[0].raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error(); err != nil {
		t.Fatalf("bootstrap: %v", err)
	}

	// Apply on the leader; should leadership move meanwhile, again on the
	// new one (the FSM check below only asks that the entry is there).
	var lastErr error
	waitFor(t, 20*time.Second, "the entry applied through a leader", func() bool {
		for _, nd := range nodes {
			if nd.raft.State() != raft.Leader {
				continue
			}
			lastErr = nd.raft.Apply([]byte("hello"), 5*time.Second).Error()
			if lastErr == nil {
				return true
			}
			if !errors.Is(lastErr, raft.ErrNotLeader) && !errors.Is(lastErr, raft.ErrLeadershipLost) &&
				!errors.Is(lastErr, raft.ErrLeadershipTransferInProgress) {
				t.Fatalf("apply: %v", lastErr)
			}
			t.Logf("apply: %v; retrying on the current leader", lastErr)
		}
		return false
	})
	waitFor(t, 10*time.Second, "the entry applied on every node", func() bool {
		for _, nd := range nodes {
			if !nd.fsm.has("hello") {
				return false
			}
		}
		return true
	})
}

// A peer with a valid certificate of the cluster CA that is not a node
// certificate (an admin's) cannot speak Raft to a node; neither can a node
// of another CA.
func TestStreamLayerRefusesNonNodePeer(t *testing.T) {
	p := newTestPKI(t, "c1")
	other := newTestPKI(t, "c2")
	admin := p.client("alice", RoleAdmin)
	foreign := other.node("n9")

	tests := []struct {
		name      string
		clientCfg *tls.Config
	}{
		{"admin certificate", NodeClientConfig(admin, p.pool())},
		{"node of another CA", NodeClientConfig(foreign, p.pool())},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := &errRecorder{}
			target := nodeStreamLayer(t, p, "n1", WithHandshakeErrorHandler(rec.handler))
			accepted := make(chan net.Conn, 1)
			go func() {
				if c, err := target.Accept(); err == nil {
					accepted <- c
				}
			}()

			// Through raft's own transport: the RPC fails.
			intruder := newTestStreamLayer(t, NodeServerConfig(admin, p.pool()), tt.clientCfg)
			trans := raft.NewNetworkTransport(intruder, 1, time.Second, io.Discard)
			defer trans.Close()
			var resp raft.RequestVoteResponse
			err := trans.RequestVote("n1", raft.ServerAddress(target.Addr().String()),
				&raft.RequestVoteRequest{RPCHeader: raft.RPCHeader{ID: []byte("intruder")}, Term: 99}, &resp)
			if err == nil {
				t.Fatal("RequestVote from a non-node peer succeeded")
			}

			waitFor(t, 5*time.Second, "the refused handshake to be reported", func() bool { return rec.count() > 0 })
			if err := target.Close(); err != nil {
				t.Fatal(err)
			}
			select {
			case c := <-accepted:
				c.Close()
				t.Fatal("Accept returned the refused connection")
			default:
			}
		})
	}
}

// A peer that connects and never speaks TLS neither blocks Accept for
// others nor holds its connection past the handshake timeout.
func TestStreamLayerSlowPeer(t *testing.T) {
	p := newTestPKI(t, "c1")
	rec := &errRecorder{}
	// The timeout also bounds the good peer's handshake, which under -race
	// on a loaded machine can take several hundred milliseconds.
	const handshakeTimeout = 2 * time.Second
	target := nodeStreamLayer(t, p, "n1",
		WithHandshakeTimeout(handshakeTimeout), WithHandshakeErrorHandler(rec.handler))
	dialer := nodeStreamLayer(t, p, "n2")

	silent, err := net.Dial("tcp", target.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()

	type result struct {
		c   net.Conn
		err error
	}
	accepted := make(chan result, 1)
	go func() {
		c, err := target.Accept()
		accepted <- result{c, err}
	}()
	good, err := dialer.Dial(raft.ServerAddress(target.Addr().String()), 5*time.Second)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer good.Close()
	select {
	case r := <-accepted:
		if r.err != nil {
			t.Fatalf("accept: %v", r.err)
		}
		// Accepted while the silent peer's handshake was still pending
		// (it connected first and has not timed out yet): it did not
		// hold up the good peer until its timeout.
		if n := rec.count(); n != 0 {
			t.Fatalf("the good peer was accepted only after %d handshake failure(s): the silent peer blocked Accept", n)
		}
		tc, ok := r.c.(*tls.Conn)
		if !ok || !tc.ConnectionState().HandshakeComplete {
			t.Fatalf("Accept returned %T without a completed handshake", r.c)
		}
		if id := IdentityFromCert(tc.ConnectionState().PeerCertificates[0]); id.NodeID != "n2" {
			t.Errorf("peer identity %+v, want node n2", id)
		}
		r.c.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("a silent peer blocked Accept")
	}

	// The silent connection is closed once its handshake times out (well
	// before this read gives up).
	if err := silent.SetReadDeadline(time.Now().Add(5 * handshakeTimeout)); err != nil {
		t.Fatal(err)
	}
	_, err = silent.Read(make([]byte, 1))
	var ne net.Error
	if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
		t.Fatalf("silent connection read = %v, want it closed by the server", err)
	}
	waitFor(t, 5*time.Second, "the timeout to be reported", func() bool { return rec.count() == 1 })
}

func TestStreamLayerClose(t *testing.T) {
	p := newTestPKI(t, "c1")
	target := nodeStreamLayer(t, p, "n1") // default 10s handshake timeout
	silent, err := net.Dial("tcp", target.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	// Let the layer pick the silent connection up and start its handshake.
	if err := silent.SetReadDeadline(time.Now().Add(100 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	_, _ = silent.Read(make([]byte, 1))

	done := make(chan error, 1)
	go func() { done <- target.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Close: %v", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Close waited for a pending handshake")
	}
	if _, err := target.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Close = %v, want net.ErrClosed", err)
	}
	if err := target.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := target.Dial(raft.ServerAddress(target.Addr().String()), time.Second); err == nil {
		t.Error("Dial to a closed layer succeeded")
	}
}
