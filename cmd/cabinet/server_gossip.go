package main

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/transport"
)

// Gossip settings. They follow the server's configuration convention
// (CABINET_<FLAG> in the environment); registering them as `cabinet server`
// flags needs addGossipFlags in newServerCmd (see gossipSettings).
//
//	--gossip-addr / CABINET_GOSSIP_ADDR        bind+advertise address (default:
//	                                            the Raft IP, Raft port + 100, TCP and UDP)
//	--gossip-join / CABINET_GOSSIP_JOIN        extra gossip addresses to join (comma
//	                                            separated); members are otherwise found
//	                                            at their derived addresses
//	--autoremove-dead-after / CABINET_AUTOREMOVE_DEAD_AFTER
//	                                            leader removes voters gossip reports
//	                                            dead this long (0: off), never below 3
//	                                            voters nor below a majority of live ones
//	--gossip=false / CABINET_GOSSIP=false      disable gossip
type gossipSettings struct {
	addr            string
	join            []string
	autoremoveAfter time.Duration
	enabled         bool
}

const (
	// gossipMinVoters: automatic removal never shrinks the voters below
	// this. Going from 3 voters to 2 gains nothing (2 voters tolerate no
	// failure, like 3 with one dead) and loses the spare vote the dead node
	// gives back when it returns.
	gossipMinVoters = 3
	gossipTick      = time.Second
)

// gossipHSM is what gossip needs from the node's HSM.
type gossipHSM interface {
	Seal(ctx context.Context, kekVersion uint32, plaintext, aad []byte) ([]byte, error)
	Open(ctx context.Context, kekVersion uint32, sealed, aad []byte) ([]byte, error)
	GenerateRandom(ctx context.Context, n int) ([]byte, error)
}

// gossipRunner owns this node's memberlist member and the leader's gossip
// duties (creating the gossip key; removing dead voters when enabled).
type gossipRunner struct {
	log   *slog.Logger
	nc    *nodeConfig
	gs    gossipSettings
	node  *cluster.Node
	state *fsm.FSM
	hsm   gossipHSM
	srv   *transport.Server

	mu      sync.Mutex
	g       *cluster.Gossip
	keyBlob []byte          // the sealed key g runs with
	warned  map[string]bool // messages logged once
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

// startGossip starts gossip for this node; the returned function stops it
// (announcing the departure). Gossip starts once the replicated state holds
// the gossip key and this node's HSM unsealed it: nodes without the KEK
// cannot gossip.
func startGossip(ctx context.Context, log *slog.Logger, gs gossipSettings, nc *nodeConfig, node *cluster.Node, state *fsm.FSM, h gossipHSM, srv *transport.Server) (stop func()) {
	log = log.With("component", "gossip")
	if gs.autoremoveAfter < 0 {
		log.Error("--autoremove-dead-after must not be negative; gossip not started")
		return func() {}
	}
	if !gs.enabled {
		log.Info("gossip is disabled")
		return func() {}
	}
	r := &gossipRunner{log: log, nc: nc, gs: gs, node: node, state: state, hsm: h, srv: srv, warned: map[string]bool{}}
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
		if r.g != nil {
			srv.SetGossip(nil)
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
	ci := r.state.Cluster()
	blob := ci.GetGossipKey()
	if blob == nil {
		return nil // the leader has not created it yet
	}
	g := r.gossip()
	if g != nil && string(blob.GetBlob()) == string(r.keyBlob) {
		if time.Now().After(*rejoin) {
			*rejoin = time.Now().Add(5 * gossipTick)
			r.joinMissing(g)
		}
		return nil
	}
	key, err := r.hsm.Open(ctx, blob.GetKekVersion(), blob.GetBlob(), transport.GossipKeyAAD(ci.GetClusterId()))
	if err != nil {
		return fmt.Errorf("this node's HSM cannot unseal the gossip key (KEK version %d): %w", blob.GetKekVersion(), err)
	}
	defer clear(key)
	if g != nil { // rotation
		if err := g.UseKey(key); err != nil {
			return fmt.Errorf("install the new gossip key: %w", err)
		}
		r.mu.Lock()
		r.keyBlob = blob.GetBlob()
		r.mu.Unlock()
		r.log.Info("gossip key rotated")
		return nil
	}
	addr := r.gs.addr
	if addr == "" {
		if addr, err = cluster.DeriveGossipAddr(r.nc.RaftAddr); err != nil {
			return err
		}
	}
	g, err = cluster.StartGossip(cluster.GossipConfig{NodeID: r.nc.NodeID, BindAddr: addr, Key: key, ClusterID: ci.GetClusterId(), Logger: r.log})
	if err != nil {
		return err
	}
	r.mu.Lock()
	r.g, r.keyBlob = g, blob.GetBlob()
	r.mu.Unlock()
	r.srv.SetGossip(g)
	r.log.Info("gossip started", "addr", addr)
	*rejoin = time.Now().Add(5 * gossipTick)
	r.joinMissing(g)
	return nil
}

// joinMissing contacts every recorded member gossip does not see alive, at
// its derived gossip address (plus the configured join addresses).
func (r *gossipRunner) joinMissing(g *cluster.Gossip) {
	addrs := append([]string{}, r.gs.join...)
	for _, rec := range r.state.Nodes() {
		if rec.GetNodeId() == r.nc.NodeID {
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

// leaderDuties runs on the leader: create the gossip key once, and remove
// dead voters when --autoremove-dead-after is set.
func (r *gossipRunner) leaderDuties(ctx context.Context) {
	if err := r.ensureGossipKey(ctx); err != nil {
		r.log.Warn("create the gossip key", "err", err)
	}
	if r.gs.autoremoveAfter > 0 {
		r.removeDead(ctx)
	}
}

// ensureGossipKey: 32 bytes from this node's HSM, sealed under the current
// KEK by the HSM, proposed with a fixed request id so that leaders racing
// to do it agree on the first one.
func (r *gossipRunner) ensureGossipKey(ctx context.Context) error {
	ci := r.state.Cluster()
	if ci == nil || ci.GetGossipKey() != nil {
		return nil
	}
	key, err := r.hsm.GenerateRandom(ctx, 32)
	if err != nil {
		return err
	}
	sealed, err := r.hsm.Seal(ctx, ci.GetCurrentKekVersion(), key, transport.GossipKeyAAD(ci.GetClusterId()))
	clear(key)
	if err != nil {
		return err
	}
	cmd, err := fsm.NewCommand(fsmpb.CommandType_COMMAND_TYPE_SET_GOSSIP_KEY, &fsmpb.SetGossipKey{
		GossipKey: &fsmpb.WrappedBlob{KekVersion: ci.GetCurrentKekVersion(), Blob: sealed},
	}, "gossip-key/"+ci.GetClusterId(), "node:"+r.nc.NodeID)
	if err != nil {
		return err
	}
	res, err := r.node.Propose(ctx, cmd)
	if err != nil {
		return err
	}
	if res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
		return fmt.Errorf("refused: %s %s", res.GetCode(), res.GetMessage())
	}
	r.log.Info("gossip key created")
	return nil
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
		if h := g.Health(s.ID); s.ID != r.nc.NodeID && h != cluster.GossipAlive {
			down[s.ID] = true
		}
	}
	for _, s := range servers {
		since, dead := g.DeadSince(s.ID)
		if !s.Voter || s.ID == r.nc.NodeID || !dead || time.Since(since) < r.gs.autoremoveAfter {
			continue
		}
		if err := cluster.SafeToRemoveVoter(servers, s.ID, down, gossipMinVoters); err != nil {
			r.warnOnce("autoremove:"+err.Error(), "not removing a dead voter", "node_id", s.ID, "reason", err)
			continue
		}
		reqID := fmt.Sprintf("autoremove/%s/%d", s.ID, since.UnixNano())
		if err := r.srv.RemoveNode(ctx, s.ID, reqID, "node:"+r.nc.NodeID, gossipMinVoters); err != nil {
			r.log.Warn("remove dead voter", "node_id", s.ID, "err", err)
			return
		}
		r.log.Warn("removed dead voter", "node_id", s.ID, "dead_for", time.Since(since).Round(time.Second))
		return
	}
}
