package transport

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// GossipSettings configures StartGossip (the server's --gossip* flags).
type GossipSettings struct {
	// Addr is the bind+advertise address (default: the Raft IP at Raft port + 100).
	Addr string
	// Join lists extra gossip addresses to contact.
	Join []string
	// AutoremoveAfter: the leader removes voters gossip saw dead this long (0: off).
	AutoremoveAfter time.Duration
	Enabled         bool
}

const (
	// gossipMinVoters: automatic removal never shrinks the voters below
	// this. Going from 3 voters to 2 gains nothing (2 voters tolerate no
	// failure, like 3 with one dead) and loses the spare vote the dead node
	// gives back when it returns.
	gossipMinVoters = 3
	gossipTick      = time.Second
	// A new gossip key (rotation) is first installed for decryption only;
	// the node encrypts with it gossipKeySwitchDelay later, when every
	// member has normally applied the same Raft entry and installed it too,
	// and drops the old key gossipOldKeyGrace after the switch (a member
	// lagging longer than that is cut off from gossip until it catches up).
	gossipKeySwitchDelay = 2 * gossipTick
	gossipOldKeyGrace    = 10 * gossipTick
)

// gossipRunner owns this node's memberlist member and the leader's gossip
// duties (creating the gossip key; removing dead voters when enabled).
type gossipRunner struct {
	log  *slog.Logger
	gs   GossipSettings
	node *cluster.Node
	srv  *Server

	mu      sync.Mutex
	g       *cluster.Gossip
	keyBlob []byte          // the sealed key last installed in g
	warned  map[string]bool // messages logged once

	now func() time.Time // time.Now; tests step it

	// Rotation progress (run's goroutine only).
	inUse      uint32    // generation g encrypts with
	pendingKey []byte    // installed for decryption, switched to at switchAt
	pendingGen uint32    // its generation
	switchAt   time.Time //
	dropAt     time.Time // when to drop the old keys (zero: nothing to drop)
}

// warnOnce logs msg at warning level the first time it is seen.
func (r *gossipRunner) warnOnce(key, msg string, args ...any) {
	r.mu.Lock()
	seen := r.warned[key]
	r.warned[key] = true
	r.mu.Unlock()
	if !seen {
		r.log.Warn(msg, args...)
	}
}

// StartGossip starts memberlist gossip for this node; the returned function
// stops it (announcing the departure). Gossip starts once the replicated
// state holds the gossip key and this node's HSM unsealed it: nodes without
// the KEK cannot gossip. The leader creates the gossip key and, with
// AutoremoveAfter set, removes voters gossip reports dead (never below 3
// voters nor below a majority of live ones).
func (s *Server) StartGossip(ctx context.Context, log *slog.Logger, gs GossipSettings, node *cluster.Node) (stop func()) {
	log = log.With("component", "gossip")
	if gs.AutoremoveAfter < 0 {
		log.Error("--autoremove-dead-after must not be negative; gossip not started")
		return func() {}
	}
	if !gs.Enabled {
		log.Info("gossip is disabled")
		return func() {}
	}
	r := &gossipRunner{log: log, gs: gs, node: node, srv: s, warned: map[string]bool{}, now: time.Now}
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); node.RunLeaderLoop(ctx, 2*gossipTick, r.leaderDuties) }()
	go func() { defer wg.Done(); r.run(ctx) }()
	return func() {
		cancel()
		wg.Wait()
		r.mu.Lock()
		defer r.mu.Unlock()
		clear(r.pendingKey) // run has returned: nothing else touches it
		r.pendingKey = nil
		if r.g != nil {
			s.SetGossip(nil)
			if err := r.g.Leave(time.Second); err != nil {
				log.Warn("leave gossip", "err", err)
			}
			r.g = nil
		}
	}
}

func (r *gossipRunner) gossip() *cluster.Gossip {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.g
}

// run starts gossip when the key is available, then keeps joining members
// it does not see alive and follows key rotations.
func (r *gossipRunner) run(ctx context.Context) {
	tick := time.NewTicker(gossipTick)
	defer tick.Stop()
	rejoin := time.Time{}
	for {
		if err := r.step(ctx, &rejoin); err != nil {
			r.warnOnce(err.Error(), "gossip", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (r *gossipRunner) step(ctx context.Context, rejoin *time.Time) error {
	ci := r.srv.cfg.State.Cluster()
	blob := ci.GetGossipKey()
	if blob == nil {
		return nil // the leader has not created it yet
	}
	g := r.gossip()
	if g != nil {
		defer func() { r.srv.setGossipKeys(r.inUse, g.KeyCount()) }()
		if err := r.advanceRotation(g, r.now()); err != nil {
			return err
		}
	}
	if g != nil && string(blob.GetBlob()) == string(r.keyBlob) {
		if r.now().After(*rejoin) {
			*rejoin = r.now().Add(5 * gossipTick)
			r.joinMissing(g)
		}
		return nil
	}
	key, err := r.srv.cfg.HSM.Open(ctx, blob.GetKekVersion(), blob.GetBlob(), GossipKeyAAD(ci.GetClusterId()))
	if err != nil {
		return fmt.Errorf("this node's HSM cannot unseal the gossip key (KEK version %d): %w", blob.GetKekVersion(), err)
	}
	defer clear(key)
	gen := fsm.GossipKeyGeneration(ci)
	if g != nil {
		r.mu.Lock()
		r.keyBlob = blob.GetBlob()
		r.mu.Unlock()
		if r.pendingKey != nil && string(r.pendingKey) == string(key) {
			return nil // the pending key, re-wrapped under a new KEK version
		}
		if g.IsPrimary(key) {
			// The same key re-wrapped; or the state went back to the key
			// in use (a snapshot restore): forget a pending switch.
			if r.pendingKey != nil {
				clear(r.pendingKey)
				r.pendingKey = nil
				r.dropAt = r.now().Add(gossipOldKeyGrace)
			}
			r.inUse = gen
			return nil
		}
		if err := g.AddKey(key); err != nil {
			return fmt.Errorf("install the new gossip key: %w", err)
		}
		clear(r.pendingKey)
		r.pendingKey, r.pendingGen = bytes.Clone(key), gen
		r.switchAt = r.now().Add(gossipKeySwitchDelay)
		r.log.Info("new gossip key installed for decryption; switching to it shortly", "generation", gen)
		return nil
	}
	addr := r.gs.Addr
	if addr == "" {
		if addr, err = cluster.DeriveGossipAddr(r.srv.cfg.RaftAddr); err != nil {
			return err
		}
	}
	g, err = cluster.StartGossip(cluster.GossipConfig{NodeID: r.srv.cfg.NodeID, BindAddr: addr, Key: key, ClusterID: ci.GetClusterId(), Logger: r.log})
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.g, r.keyBlob = g, blob.GetBlob()
	r.mu.Unlock()
	r.inUse = gen
	r.srv.setGossipKeys(gen, g.KeyCount())
	r.srv.SetGossip(g)
	r.log.Info("gossip started", "addr", addr, "key_generation", gen)
	*rejoin = r.now().Add(5 * gossipTick)
	r.joinMissing(g)
	return nil
}

// advanceRotation switches to a pending new key once its delay passed and
// drops the old keys once their grace passed.
func (r *gossipRunner) advanceRotation(g *cluster.Gossip, now time.Time) error {
	if r.pendingKey != nil && !now.Before(r.switchAt) {
		if err := g.UseKey(r.pendingKey); err != nil {
			return fmt.Errorf("switch to the new gossip key: %w", err)
		}
		clear(r.pendingKey)
		r.pendingKey = nil
		r.inUse = r.pendingGen
		r.dropAt = now.Add(gossipOldKeyGrace)
		r.log.Info("gossip now encrypts with the new key", "generation", r.inUse)
	}
	if !r.dropAt.IsZero() && !now.Before(r.dropAt) && r.pendingKey == nil {
		n, err := g.DropOldKeys()
		if err != nil {
			return fmt.Errorf("drop the old gossip keys: %w", err)
		}
		if g.KeyCount() > 1 {
			return fmt.Errorf("drop the old gossip keys: %d keys left after dropping %d; retrying", g.KeyCount(), n)
		}
		r.dropAt = time.Time{}
		r.log.Info("old gossip keys dropped", "dropped", n, "generation", r.inUse)
	}
	return nil
}

// joinMissing contacts every recorded member gossip does not see alive, at
// its derived gossip address (plus the configured join addresses).
func (r *gossipRunner) joinMissing(g *cluster.Gossip) {
	addrs := append([]string{}, r.gs.Join...)
	for _, rec := range r.srv.cfg.State.Nodes() {
		if rec.GetNodeId() == r.srv.cfg.NodeID {
			continue
		}
		if h := g.Health(rec.GetNodeId()); h == cluster.GossipAlive || h == cluster.GossipSuspect {
			continue
		}
		if a, err := cluster.DeriveGossipAddr(rec.GetRaftAddr()); err == nil {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		return
	}
	if _, err := g.Join(addrs); err != nil {
		r.log.Debug("gossip join", "addrs", addrs, "err", err)
	}
}

// leaderDuties runs on the leader: create the gossip key once, replace it
// when it is due, and remove dead voters when --autoremove-dead-after is set.
func (r *gossipRunner) leaderDuties(ctx context.Context) {
	if err := r.ensureGossipKey(ctx); err != nil {
		r.log.Warn("create the gossip key", "err", err)
	}
	r.replaceDueGossipKey(ctx)
	if r.gs.AutoremoveAfter > 0 {
		r.removeDead(ctx)
	}
}

// replaceDueGossipKey proposes a new gossip key when the state says the old
// one is due (a member was removed or a snapshot restored since it was
// made), once every member's release can apply the rotation.
func (r *gossipRunner) replaceDueGossipKey(ctx context.Context) {
	ci := r.srv.cfg.State.Cluster()
	if !ci.GetGossipKeyRotationDue() {
		return
	}
	if err := r.srv.requireFeature(fsm.FeatureGossipKeyGenerations, "replacing the gossip key"); err != nil {
		r.warnOnce("rotate-due-level", "the gossip key is due for replacement (a member was removed or a snapshot restored) but waits for every node to be upgraded", "err", err)
		return
	}
	// Leaders racing to do it rotate once: the compare-and-set on the
	// generation refuses the second. A fresh request id per attempt, so
	// that a refusal is not replayed to the next attempt.
	gen, err := r.srv.proposeGossipKey(ctx, fsm.GossipKeyGeneration(ci), requestID(ctx, ""), "node:"+r.srv.cfg.NodeID)
	if err != nil {
		r.warnOnce("rotate-due", "replace the gossip key (a member was removed or a snapshot restored since it was made); retrying", "err", err)
		return
	}
	r.log.Info("gossip key replaced: a member was removed or a snapshot restored since the old one was made", "generation", gen)
}

// ensureGossipKey creates the cluster's first gossip key, proposed with a
// fixed request id so that leaders racing to do it agree on the first one.
func (r *gossipRunner) ensureGossipKey(ctx context.Context) error {
	ci := r.srv.cfg.State.Cluster()
	if ci == nil || ci.GetGossipKey() != nil {
		return nil
	}
	if _, err := r.srv.proposeGossipKey(ctx, 0, "gossip-key/"+ci.GetClusterId(), "node:"+r.srv.cfg.NodeID); err != nil {
		return err
	}
	r.log.Info("gossip key created")
	return nil
}

// proposeGossipKey: 32 bytes from this node's HSM, sealed under the current
// KEK by the HSM, proposed as the gossip key replacing generation
// `replaces` (0: unconditionally). It returns the new generation.
func (s *Server) proposeGossipKey(ctx context.Context, replaces uint32, reqID, by string) (uint32, error) {
	ci := s.cfg.State.Cluster()
	if ci == nil {
		return 0, errors.New("the cluster is not initialised yet")
	}
	key, err := s.cfg.HSM.GenerateRandom(ctx, 32)
	if err != nil {
		return 0, fmt.Errorf("random bytes from the HSM: %w", err)
	}
	sealed, err := s.cfg.HSM.Seal(ctx, ci.GetCurrentKekVersion(), key, GossipKeyAAD(ci.GetClusterId()))
	clear(key)
	if err != nil {
		return 0, fmt.Errorf("seal the gossip key under KEK version %d: %w", ci.GetCurrentKekVersion(), err)
	}
	res, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_SET_GOSSIP_KEY, &fsmpb.SetGossipKey{
		GossipKey:          &fsmpb.WrappedBlob{KekVersion: ci.GetCurrentKekVersion(), Blob: sealed},
		ReplacesGeneration: replaces,
	}, reqID, by)
	if err != nil {
		return 0, err
	}
	return res.GetGossipKeyGeneration(), nil
}

// RotateGossipKey replaces the gossip key (admin). Every node adds the new
// key, switches to it and drops the old one by itself (gossip runner).
func (s *Server) RotateGossipKey(ctx context.Context, req *cabinetpb.RotateGossipKeyRequest) (*cabinetpb.RotateGossipKeyResponse, error) {
	// Read the current generation from an up-to-date state, or the
	// compare-and-set refuses the rotation as stale.
	if err := s.cfg.Cluster.CheckRead(ctx, true); err != nil {
		return nil, toStatus(err)
	}
	ci := s.cfg.State.Cluster()
	if ci == nil {
		return nil, status.Error(codes.Unavailable, "the cluster is not initialised yet")
	}
	if ci.GetGossipKey() == nil {
		return nil, status.Error(codes.FailedPrecondition, "the cluster has no gossip key yet (the leader creates it when gossip runs); nothing to rotate")
	}
	if err := s.requireFeature(fsm.FeatureGossipKeyGenerations, "gossip key rotation"); err != nil {
		return nil, err
	}
	gen, err := s.proposeGossipKey(ctx, fsm.GossipKeyGeneration(ci), requestID(ctx, req.GetRequestId()), principal(ctx))
	if err != nil {
		if _, ok := status.FromError(err); ok {
			return nil, err
		}
		return nil, status.Errorf(codes.Unavailable, "rotate the gossip key on node %s: %v", s.cfg.NodeID, err)
	}
	s.log.Warn("gossip key rotated", "generation", gen, "by", principal(ctx))
	return &cabinetpb.RotateGossipKeyResponse{Generation: gen}, nil
}

// removeDead removes at most one voter per round that gossip reported dead
// for at least autoremoveAfter, when cluster.SafeToRemoveVoter allows it
// with every dead or suspect member counted as down.
func (r *gossipRunner) removeDead(ctx context.Context) {
	g := r.gossip()
	if g == nil {
		return
	}
	servers, err := r.node.Servers()
	if err != nil {
		return
	}
	down := map[string]bool{}
	for _, s := range servers {
		if h := g.Health(s.ID); s.ID != r.srv.cfg.NodeID && h != cluster.GossipAlive {
			down[s.ID] = true
		}
	}
	for _, s := range servers {
		since, dead := g.DeadSince(s.ID)
		if !s.Voter || s.ID == r.srv.cfg.NodeID || !dead || time.Since(since) < r.gs.AutoremoveAfter {
			continue
		}
		if err := cluster.SafeToRemoveVoter(servers, s.ID, down, gossipMinVoters); err != nil {
			r.warnOnce("autoremove:"+err.Error(), "not removing a dead voter", "node_id", s.ID, "reason", err)
			continue
		}
		reqID := fmt.Sprintf("autoremove/%s/%d", s.ID, since.UnixNano())
		if err := r.srv.RemoveNode(ctx, s.ID, reqID, "node:"+r.srv.cfg.NodeID, gossipMinVoters); err != nil {
			r.log.Warn("remove dead voter", "node_id", s.ID, "err", err)
			return
		}
		r.log.Warn("removed dead voter", "node_id", s.ID, "dead_for", time.Since(since).Round(time.Second))
		return
	}
}
