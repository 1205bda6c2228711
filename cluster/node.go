// Package cluster runs a Cabinet node's Raft instance: bootstrap, proposing
// and forwarding writes, freshness for follower reads, membership and status.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// Errors callers map to gRPC codes.
// DefaultMaxStaleness is the default bound on a follower's staleness. It
// must exceed the worst leader failover (dead-leader detection, randomised
// between 1 and 2 heartbeat timeouts, plus the election; 1.2-3.0 s measured
// with 1 s timeouts) plus the read-index mark interval (MaxStaleness/4),
// or followers refuse crypto while a new leader is elected (docs/RELIABILITY.md).
const DefaultMaxStaleness = 5 * time.Second

var (
	// ErrNoLeader: no leader is known (election in progress or quorum lost).
	ErrNoLeader = errors.New("no Raft leader is known: the cluster is electing a leader or has lost quorum; retry or use another node")
	// ErrNotLeader: a leader-only call reached a follower.
	ErrNotLeader = errors.New("this node is not the Raft leader")
	// ErrStale: this follower has not heard from the leader within MaxStaleness.
	ErrStale = errors.New("this node has not heard from the leader recently enough to serve reads; use another node")
)

// Forwarder reaches the leader over the node-to-node channel. transport
// implements it with node-certificate gRPC clients.
type Forwarder interface {
	// ForwardApply sends an encoded fsm command to the leader at apiAddr,
	// which stamps and applies it; returns the encoded fsm Result.
	ForwardApply(ctx context.Context, apiAddr string, cmd []byte) (result []byte, index uint64, err error)
	// ReadIndex asks the leader at apiAddr for its commit index after it
	// confirmed its leadership.
	ReadIndex(ctx context.Context, apiAddr string) (uint64, error)
}

// Config configures a Node.
type Config struct {
	NodeID   string
	RaftAddr string // advertised Raft address (host:port)
	// Dir holds raft.db and snapshots/.
	Dir         string
	StreamLayer raft.StreamLayer
	FSM         *fsm.FSM
	Forwarder   Forwarder
	Logger      *slog.Logger
	// MaxStaleness bounds how old a follower's view may be when it serves a
	// crypto operation (default DefaultMaxStaleness).
	MaxStaleness time.Duration
	// LeaderWait is how long a write waits for a leader to appear (default 5s).
	LeaderWait time.Duration
	// ApplyTimeout bounds raft.Apply enqueueing (default 10s).
	ApplyTimeout time.Duration
	// Raft timing; zero values take the defaults below.
	HeartbeatTimeout   time.Duration // default 1s
	ElectionTimeout    time.Duration // default 1s
	LeaderLeaseTimeout time.Duration // default 500ms
	SnapshotThreshold  uint64        // default 8192
	TrailingLogs       uint64        // default 10240
	// Clock stamps leader time; default time.Now.
	Clock func() time.Time
	// CompactAfter, if set, selects applied commands after which this node
	// runs CompactLog in the background, e.g. an OK DESTROY_KEY. Bursts
	// coalesce; installing a snapshot from the leader triggers one too (the
	// node skipped the entries, but its own log may still hold what they
	// dropped). nil: CompactLog runs only when called.
	CompactAfter func(cmd *fsmpb.Command, res *fsmpb.Result) bool
	// CompactDelay is how long an automatic compaction waits for a burst
	// of selected commands to end: it starts once no new one was applied
	// for CompactDelay, or 10*CompactDelay after the first (default 500ms).
	CompactDelay time.Duration
}

func (c *Config) setDefaults() {
	if c.MaxStaleness == 0 {
		c.MaxStaleness = DefaultMaxStaleness
	}
	if c.LeaderWait == 0 {
		c.LeaderWait = 5 * time.Second
	}
	if c.ApplyTimeout == 0 {
		c.ApplyTimeout = 10 * time.Second
	}
	if c.HeartbeatTimeout == 0 {
		c.HeartbeatTimeout = time.Second
	}
	if c.ElectionTimeout == 0 {
		c.ElectionTimeout = time.Second
	}
	if c.LeaderLeaseTimeout == 0 {
		c.LeaderLeaseTimeout = 500 * time.Millisecond
	}
	if c.SnapshotThreshold == 0 {
		c.SnapshotThreshold = 8192
	}
	if c.TrailingLogs == 0 {
		c.TrailingLogs = 10240
	}
	if c.CompactDelay == 0 {
		c.CompactDelay = 500 * time.Millisecond
	}
	if c.Clock == nil {
		c.Clock = time.Now
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
}

// Node is a running Raft member.
type Node struct {
	cfg       Config
	raft      *raft.Raft
	transport *raft.NetworkTransport
	store     *compactingStore
	applied   *appliedWaiter
	log       *slog.Logger

	shutdownOnce sync.Once
	shutdownCh   chan struct{} // closed by Shutdown

	// CompactLog: compactSem (capacity 1) serialises runs; compactPending
	// is the next run, not started yet, that new calls join.
	compactSem     chan struct{}
	compactMu      sync.Mutex
	compactPending *compactRun
	compactions    atomic.Uint64 // runs started (tests)
	compactKick    chan struct{} // wakes autoCompact (CompactAfter set)
	bg             sync.WaitGroup
	fresh          freshness
	// readyTerm is the term in which this leader has applied an entry of its
	// own (leaderReady); readyMu makes concurrent first reads share one Barrier.
	readyTerm atomic.Uint64
	readyMu   sync.Mutex
	// reloadMu serialises read-modify-write of Raft's reloadable config
	// (compaction's TrailingLogs=0, the election nudge).
	reloadMu sync.Mutex
	// Test hooks, set before the node is used.
	compactHook        func() // called at the start of each run
	compactSkipRewrite bool   // skip step 3 (rewrite of raft.db)
}

// Open opens (or creates) the node's Raft state under cfg.Dir and starts Raft.
// It does not bootstrap; see Bootstrap.
func Open(cfg Config) (*Node, error) {
	cfg.setDefaults()
	if cfg.NodeID == "" || cfg.RaftAddr == "" || cfg.Dir == "" || cfg.StreamLayer == nil || cfg.FSM == nil {
		return nil, errors.New("cluster: NodeID, RaftAddr, Dir, StreamLayer and FSM are required")
	}
	if err := os.MkdirAll(cfg.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("create raft dir: %w", err)
	}
	// Leftovers of a compaction or snapshot the process died in.
	if err := removeSnapshotTemps(cfg.Dir); err != nil {
		return nil, fmt.Errorf("remove leftover snapshot temp dirs: %w", err)
	}
	store, err := openCompactingStore(filepath.Join(cfg.Dir, "raft.db"))
	if err != nil {
		return nil, fmt.Errorf("open raft store %s: %w", filepath.Join(cfg.Dir, "raft.db"), err)
	}
	logs, err := raft.NewLogCache(512, store)
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("log cache: %w", err)
	}
	hlog := newHclogAdapter(cfg.Logger)
	// Retain 1: an older snapshot may hold state destroyed since (CompactLog).
	snaps, err := raft.NewFileSnapshotStoreWithLogger(cfg.Dir, 1, hlog.Named("snapshot"))
	if err != nil {
		store.Close()
		return nil, fmt.Errorf("open snapshot store: %w", err)
	}
	trans := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  cfg.StreamLayer,
		MaxPool: 3,
		Timeout: 10 * time.Second,
		Logger:  hlog.Named("raft-net"),
	})
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.NodeID)
	rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	rc.ElectionTimeout = cfg.ElectionTimeout
	rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	rc.SnapshotThreshold = cfg.SnapshotThreshold
	rc.TrailingLogs = cfg.TrailingLogs
	rc.Logger = hlog.Named("raft")
	n := &Node{cfg: cfg, transport: trans, store: store, log: cfg.Logger,
		shutdownCh: make(chan struct{}), compactSem: make(chan struct{}, 1)}
	n.applied = newAppliedWaiter(n.fsmCaughtUp)
	cfg.FSM.OnApply(func(index uint64, _ *fsmpb.Command, _ *fsmpb.Result) { n.applied.advance(index) })
	if cfg.CompactAfter != nil {
		n.compactKick = make(chan struct{}, 1)
		cfg.FSM.OnApply(func(_ uint64, cmd *fsmpb.Command, res *fsmpb.Result) {
			if cfg.CompactAfter(cmd, res) {
				n.kickCompaction()
			}
		})
		cfg.FSM.OnRestore(n.kickCompaction)
	}
	r, err := raft.NewRaft(rc, cfg.FSM, logs, store, snaps, trans)
	if err != nil {
		trans.Close()
		store.Close()
		return nil, fmt.Errorf("start raft: %w", err)
	}
	n.raft = r
	n.bg.Add(1)
	go n.runFreshness()
	n.bg.Add(1)
	go n.runElectionNudge()
	if n.compactKick != nil {
		n.bg.Add(1)
		go n.autoCompact()
	}
	return n, nil
}

// HasState reports whether this node already has Raft state (a log,
// snapshot or term), i.e. it was bootstrapped or joined before.
func (n *Node) HasState() bool {
	return n.raft.LastIndex() > 0 || n.raft.CurrentTerm() > 0
}

// Bootstrap makes this node the single voter of a new cluster. It is a no-op
// error-free call if the node already has state.
func (n *Node) Bootstrap() error {
	if n.HasState() {
		return nil
	}
	cfg := raft.Configuration{Servers: []raft.Server{{
		Suffrage: raft.Voter, ID: raft.ServerID(n.cfg.NodeID), Address: raft.ServerAddress(n.cfg.RaftAddr),
	}}}
	if err := n.raft.BootstrapCluster(cfg).Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
		return fmt.Errorf("bootstrap raft: %w", err)
	}
	return nil
}

// Shutdown stops Raft and closes the stores.
func (n *Node) Shutdown() error {
	n.shutdownOnce.Do(func() { close(n.shutdownCh) })
	err := n.raft.Shutdown().Error()
	n.transport.Close()
	n.bg.Wait()
	if cerr := n.store.Close(); err == nil {
		err = cerr
	}
	n.applied.close()
	return err
}

// IsLeader reports whether this node is the Raft leader now.
func (n *Node) IsLeader() bool { return n.raft.State() == raft.Leader }

// Leader returns the leader's node id and API address as this node knows
// them ("" when unknown).
func (n *Node) Leader() (id, apiAddr string) {
	_, lid := n.raft.LeaderWithID()
	if lid == "" {
		return "", ""
	}
	if rec, ok := n.cfg.FSM.Node(string(lid)); ok {
		return string(lid), rec.GetApiAddr()
	}
	return string(lid), ""
}

// waitLeader waits until some leader is known, up to LeaderWait.
func (n *Node) waitLeader(ctx context.Context) (id, apiAddr string, err error) {
	deadline := time.Now().Add(n.cfg.LeaderWait)
	for {
		id, apiAddr = n.Leader()
		if id != "" && (apiAddr != "" || id == n.cfg.NodeID) {
			return id, apiAddr, nil
		}
		if time.Now().After(deadline) {
			return "", "", ErrNoLeader
		}
		select {
		case <-ctx.Done():
			return "", "", fmt.Errorf("%w (%v)", ErrNoLeader, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Propose submits cmd to the Raft log through the leader and returns the FSM
// result. On a follower it forwards the command; the leader stamps the time.
//
// A leadership change in the middle is retried (with a short backoff, until
// LeaderWait has passed): commands carry request ids, so an entry that the
// old leader appended and that commits anyway is applied once.
func (n *Node) Propose(ctx context.Context, cmd *fsmpb.Command) (*fsmpb.Result, error) {
	deadline := time.Now().Add(n.cfg.LeaderWait)
	idempotent := cmd.GetRequestId() != ""
	retry := func(attempt int) bool {
		if time.Now().After(deadline) {
			return false
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(time.Duration(10*(attempt+1)) * time.Millisecond):
			return true
		}
	}
	for attempt := 0; ; attempt++ {
		lid, addr, err := n.waitLeader(ctx)
		if err != nil {
			return nil, err
		}
		if lid == n.cfg.NodeID {
			res, _, err := n.applyAsLeader(ctx, cmd)
			// Never appended (not leader): always safe to retry. Appended but
			// leadership lost: only commands with a request id are safe.
			if errors.Is(err, ErrNotLeader) && (idempotent || !errors.Is(err, raft.ErrLeadershipLost)) && retry(attempt) {
				continue
			}
			return res, err
		}
		data, err := fsm.EncodeCommand(cmd)
		if err != nil {
			return nil, err
		}
		if n.cfg.Forwarder == nil {
			return nil, fmt.Errorf("%w: forwarding is not configured", ErrNotLeader)
		}
		resBytes, index, err := n.cfg.Forwarder.ForwardApply(ctx, addr, data)
		if errors.Is(err, ErrNotLeader) && idempotent && retry(attempt) {
			continue // the leader we knew just stepped down
		}
		if err != nil {
			return nil, fmt.Errorf("forward to leader %s: %w", lid, err)
		}
		// Read-your-writes through this node: wait (briefly) until it has
		// applied the entry, so a client that disabled or revoked a key here
		// is refused here at once. The write is committed either way.
		wctx, cancel := context.WithTimeout(ctx, n.cfg.MaxStaleness)
		_ = n.applied.wait(wctx, index)
		cancel()
		return fsm.DecodeResult(resBytes)
	}
}

// ApplyForwarded applies an encoded command received from a follower. Only
// the leader accepts it; it stamps the leader time itself.
func (n *Node) ApplyForwarded(ctx context.Context, data []byte) (*fsmpb.Result, uint64, error) {
	cmd, err := fsm.DecodeCommand(data)
	if err != nil {
		return nil, 0, fmt.Errorf("decode forwarded command: %w", err)
	}
	return n.applyAsLeader(ctx, cmd)
}

func (n *Node) applyAsLeader(ctx context.Context, cmd *fsmpb.Command) (*fsmpb.Result, uint64, error) {
	if !n.IsLeader() {
		return nil, 0, ErrNotLeader
	}
	cmd.LeaderTimeUnixNano = n.cfg.Clock().UnixNano()
	data, err := fsm.EncodeCommand(cmd)
	if err != nil {
		return nil, 0, err
	}
	timeout := n.cfg.ApplyTimeout
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < timeout {
		timeout = time.Until(dl)
	}
	f := n.raft.Apply(data, timeout)
	if err := f.Error(); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) || errors.Is(err, raft.ErrLeadershipTransferInProgress) {
			return nil, 0, fmt.Errorf("%w: %w", ErrNotLeader, err)
		}
		if errors.Is(err, raft.ErrEnqueueTimeout) {
			return nil, 0, fmt.Errorf("%w: %v", ErrNoLeader, err)
		}
		return nil, 0, fmt.Errorf("raft apply: %w", err)
	}
	switch r := f.Response().(type) {
	case *fsmpb.Result:
		return r, f.Index(), nil
	case error:
		return nil, f.Index(), fmt.Errorf("apply command: %w", r)
	default:
		return nil, f.Index(), fmt.Errorf("apply command: unexpected response %T", r)
	}
}

// ReadIndexLocal is the leader side of a STRONG read: confirm leadership with
// a quorum and return the commit index.
func (n *Node) ReadIndexLocal(ctx context.Context) (uint64, error) {
	if !n.IsLeader() {
		return 0, ErrNotLeader
	}
	if err := n.leaderReady(); err != nil {
		return 0, err
	}
	if err := n.raft.VerifyLeader().Error(); err != nil {
		return 0, fmt.Errorf("%w: %v", ErrNotLeader, err)
	}
	return n.raft.CommitIndex(), nil
}

// leaderReady returns once this leader has committed and applied an entry
// of its own term (a Barrier, once per term). Until then its commit index
// and its FSM may lag entries the previous leader acknowledged, so neither a
// read index it hands out nor a read it serves would cover them.
func (n *Node) leaderReady() error {
	term := n.raft.CurrentTerm()
	if n.readyTerm.Load() == term {
		return nil
	}
	n.readyMu.Lock()
	defer n.readyMu.Unlock()
	if n.readyTerm.Load() == term {
		return nil
	}
	if err := n.raft.Barrier(n.cfg.ApplyTimeout).Error(); err != nil {
		return fmt.Errorf("%w: new leader not ready: %v", ErrNotLeader, err)
	}
	if n.raft.CurrentTerm() == term && n.IsLeader() {
		n.readyTerm.Store(term)
	}
	return nil
}

// CheckRead decides whether this node may serve a crypto operation now.
// strong=true first catches up to the leader's commit index.
func (n *Node) CheckRead(ctx context.Context, strong bool) error {
	if strong {
		var idx uint64
		var err error
		lid, addr, err := n.waitLeader(ctx)
		if err != nil {
			return err
		}
		if lid == n.cfg.NodeID {
			idx, err = n.ReadIndexLocal(ctx)
		} else if n.cfg.Forwarder != nil {
			idx, err = n.cfg.Forwarder.ReadIndex(ctx, addr)
		} else {
			err = ErrNotLeader
		}
		if err != nil {
			return fmt.Errorf("strong read: %w", err)
		}
		return n.applied.wait(ctx, idx)
	}
	switch st := n.raft.State(); st {
	case raft.Leader:
		return n.leaderReady()
	case raft.Follower, raft.Candidate:
		if n.cfg.Forwarder == nil { // no read index to ask for: contact only
			lc := n.raft.LastContact()
			if id, _ := n.raft.LeaderWithID(); st != raft.Follower || id == "" || lc.IsZero() || time.Since(lc) > n.cfg.MaxStaleness {
				return ErrStale
			}
			return nil
		}
		// The node must have applied a leader commit index learnt within
		// MaxStaleness (freshness.go). That alone bounds staleness, whatever
		// the Raft state: while a dead leader is detected and a new one
		// elected (no leader known, or this node a candidate), the node
		// keeps serving on its last mark until it is MaxStaleness old, so a
		// failover shorter than that refuses nothing. With marks too old it
		// fetches one now (one round trip) if a leader is known.
		if n.isFresh() {
			return nil
		}
		if st == raft.Follower {
			return n.refreshNow(ctx)
		}
		return ErrStale
	default:
		return ErrStale
	}
}

// WaitApplied blocks until the local FSM applied index reaches idx.
func (n *Node) WaitApplied(ctx context.Context, idx uint64) error { return n.applied.wait(ctx, idx) }

// Barrier (leader only) waits until every preceding entry is applied.
func (n *Node) Barrier(timeout time.Duration) error { return n.raft.Barrier(timeout).Error() }

// AddVoter adds (or re-addresses) a voter. Leader only.
func (n *Node) AddVoter(ctx context.Context, id, raftAddr string) error {
	if !n.IsLeader() {
		return ErrNotLeader
	}
	if err := n.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(raftAddr), 0, 10*time.Second).Error(); err != nil {
		return fmt.Errorf("add voter %s: %w", id, err)
	}
	return nil
}

// RemoveServer removes a server from the configuration. Leader only.
func (n *Node) RemoveServer(ctx context.Context, id string) error {
	if !n.IsLeader() {
		return ErrNotLeader
	}
	if err := n.raft.RemoveServer(raft.ServerID(id), 0, 10*time.Second).Error(); err != nil {
		return fmt.Errorf("remove server %s: %w", id, err)
	}
	return nil
}

// Server is a member of the Raft configuration.
type Server struct {
	ID       string
	RaftAddr string
	Voter    bool
}

// Servers returns the latest Raft configuration this node knows.
func (n *Node) Servers() ([]Server, error) {
	f := n.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, fmt.Errorf("raft configuration: %w", err)
	}
	var out []Server
	for _, s := range f.Configuration().Servers {
		out = append(out, Server{ID: string(s.ID), RaftAddr: string(s.Address), Voter: s.Suffrage == raft.Voter})
	}
	return out, nil
}

// InConfiguration reports whether this node is a member of the configuration
// it knows.
func (n *Node) InConfiguration() bool {
	servers, err := n.Servers()
	if err != nil {
		return false
	}
	for _, s := range servers {
		if s.ID == n.cfg.NodeID {
			return true
		}
	}
	return false
}

// Status is this node's Raft view.
type Status struct {
	NodeID       string
	RaftAddr     string
	State        string // leader, follower, candidate, shutdown
	LeaderID     string
	LeaderAddr   string // API address
	Term         uint64
	CommitIndex  uint64
	AppliedIndex uint64
	LastLogIndex uint64
	// LastContact: 0 on the leader, -1 if never, else time since contact.
	LastContact time.Duration
	Voter       bool
	// LastSnapshotIndex is the index the latest snapshot covers (taken
	// here or installed from the leader); 0 if none.
	LastSnapshotIndex uint64
	// FirstLogIndex is the first entry still in this node's log (0 if the
	// log is empty); after CompactLog it is past LastSnapshotIndex.
	FirstLogIndex uint64
}

// Status reports this node's Raft view.
func (n *Node) Status() Status {
	st := Status{
		NodeID:       n.cfg.NodeID,
		RaftAddr:     n.cfg.RaftAddr,
		State:        stateName(n.raft.State()),
		Term:         n.raft.CurrentTerm(),
		CommitIndex:  n.raft.CommitIndex(),
		AppliedIndex: n.raft.AppliedIndex(),
		LastLogIndex: n.raft.LastIndex(),
	}
	st.LeaderID, st.LeaderAddr = n.Leader()
	if v, err := strconv.ParseUint(n.raft.Stats()["last_snapshot_index"], 10, 64); err == nil {
		st.LastSnapshotIndex = v
	}
	if v, err := n.store.FirstIndex(); err == nil {
		st.FirstLogIndex = v
	}
	if n.IsLeader() {
		st.LastContact = 0
	} else if lc := n.raft.LastContact(); lc.IsZero() {
		st.LastContact = -1
	} else {
		st.LastContact = time.Since(lc)
	}
	if servers, err := n.Servers(); err == nil {
		for _, s := range servers {
			if s.ID == n.cfg.NodeID {
				st.Voter = s.Voter
			}
		}
	}
	return st
}

// Snapshot forces a Raft snapshot (and log compaction).
func (n *Node) Snapshot() error { return n.raft.Snapshot().Error() }

func stateName(s raft.RaftState) string {
	switch s {
	case raft.Leader:
		return "leader"
	case raft.Follower:
		return "follower"
	case raft.Candidate:
		return "candidate"
	default:
		return "shutdown"
	}
}

// fsmCaughtUp reports whether the FSM has applied every entry up to idx.
// raft.AppliedIndex alone does not say so: Raft advances it when it hands a
// batch to the FSM goroutine, before FSM.ApplyBatch ran. So once Raft is
// past idx, the FSM must also be past the last entry <= idx it is given
// (commands and configuration entries; leader no-ops and barriers never
// reach it).
func (n *Node) fsmCaughtUp(idx uint64) bool {
	if n.raft == nil || n.raft.AppliedIndex() < idx {
		return false
	}
	fsmIdx := n.cfg.FSM.AppliedIndex()
	for i := idx; i > fsmIdx; i-- {
		var l raft.Log
		if err := n.store.GetLog(i, &l); err != nil {
			// Compacted away: covered by a snapshot, which holds FSM state.
			return true
		}
		if l.Type == raft.LogCommand || l.Type == raft.LogConfiguration {
			return false
		}
	}
	return true
}

// appliedWaiter lets readers wait for this node to apply an index. Command
// entries wake waiters at once (FSM OnApply); entries the FSM never sees
// (leader no-ops, barriers) or sees without OnApply (configuration changes,
// a snapshot restore) are caught by re-checking caughtUp every few
// milliseconds.
type appliedWaiter struct {
	mu       sync.Mutex
	index    uint64
	closed   bool
	waiters  map[chan struct{}]uint64
	caughtUp func(idx uint64) bool
}

func newAppliedWaiter(caughtUp func(idx uint64) bool) *appliedWaiter {
	return &appliedWaiter{waiters: map[chan struct{}]uint64{}, caughtUp: caughtUp}
}

func (w *appliedWaiter) advance(idx uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if idx > w.index {
		w.index = idx
	}
	for ch, want := range w.waiters {
		if want <= w.index {
			close(ch)
			delete(w.waiters, ch)
		}
	}
}

func (w *appliedWaiter) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.closed = true
	for ch := range w.waiters {
		close(ch)
		delete(w.waiters, ch)
	}
}

func (w *appliedWaiter) wait(ctx context.Context, idx uint64) error {
	if w.caughtUp(idx) {
		return nil
	}
	w.mu.Lock()
	if w.index >= idx {
		w.mu.Unlock()
		return nil
	}
	if w.closed {
		w.mu.Unlock()
		return errors.New("node is shutting down")
	}
	ch := make(chan struct{})
	w.waiters[ch] = idx
	w.mu.Unlock()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			if w.caughtUp(idx) {
				w.mu.Lock()
				delete(w.waiters, ch)
				w.mu.Unlock()
				return nil
			}
			continue
		case <-ch:
			w.mu.Lock()
			ok := w.index >= idx
			w.mu.Unlock()
			if !ok {
				return errors.New("node is shutting down")
			}
			return nil
		case <-ctx.Done():
			w.mu.Lock()
			delete(w.waiters, ch)
			w.mu.Unlock()
			return fmt.Errorf("waiting for index %d to be applied: %w", idx, ctx.Err())
		}
	}
}
