package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// Gossip health of a member, as list-peers shows it.
const (
	GossipAlive   = "alive"
	GossipSuspect = "suspect"
	GossipDead    = "dead"
	GossipLeft    = "left"
	GossipUnknown = "unknown" // never seen (or gossip is not running)
)

// GossipConfig configures memberlist for one node.
type GossipConfig struct {
	NodeID string
	// BindAddr is host:port for both TCP and UDP; AdvertiseAddr (default
	// BindAddr) is what other members dial.
	BindAddr      string
	AdvertiseAddr string
	// Key is memberlist's AES-256 key (32 bytes), unsealed from the
	// replicated state by this node's HSM. Gossip without it is refused:
	// only KEK holders gossip.
	Key []byte
	// ClusterID labels every packet and stream, so two clusters sharing a
	// network never merge even if they shared a key.
	ClusterID string
	Logger    *slog.Logger
	// Fast selects memberlist's local-network timings (tests): failures
	// are detected in about a second instead of several.
	Fast bool
}

// Gossip is a running memberlist member: discovery and failure detection.
// Raft decides who votes; gossip only reports who answers.
type Gossip struct {
	ml      *memberlist.Memberlist
	keyring *memberlist.Keyring
	log     *slog.Logger

	mu     sync.Mutex
	states map[string]gossipState
}

type gossipState struct {
	state string
	since time.Time
	addr  string
}

// GossipPortOffset is added to the Raft port to derive the gossip port.
const GossipPortOffset = 100

// DeriveGossipAddr is the default gossip address: the Raft address's host
// with the Raft port + GossipPortOffset (TCP and UDP). With `make cluster`'s
// layout (API 7101.., Raft 7201..) gossip uses 7301..; +1 would hit the next
// node's Raft port.
func DeriveGossipAddr(raftAddr string) (string, error) {
	host, port, err := net.SplitHostPort(raftAddr)
	if err != nil {
		return "", fmt.Errorf("raft address %q: %w", raftAddr, err)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p <= 0 || p+GossipPortOffset > 65535 {
		return "", fmt.Errorf("raft address %q: port must be at most 65435 to derive the gossip port", raftAddr)
	}
	return net.JoinHostPort(host, strconv.Itoa(p+GossipPortOffset)), nil
}

// StartGossip creates the memberlist member; call Join to meet others.
func StartGossip(cfg GossipConfig) (*Gossip, error) {
	if cfg.NodeID == "" || cfg.BindAddr == "" {
		return nil, errors.New("gossip: node id and bind address are required")
	}
	if err := memberlist.ValidateKey(cfg.Key); err != nil || len(cfg.Key) != 32 {
		return nil, fmt.Errorf("gossip: the key must be 32 bytes (AES-256): %v", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	host, port, err := splitHostPort(cfg.BindAddr)
	if err != nil {
		return nil, fmt.Errorf("gossip bind address: %w", err)
	}
	g := &Gossip{log: cfg.Logger, states: map[string]gossipState{}}
	mc := memberlist.DefaultLANConfig()
	if cfg.Fast {
		mc = memberlist.DefaultLocalConfig()
	}
	mc.Name = cfg.NodeID
	mc.BindAddr, mc.BindPort = host, port
	mc.AdvertiseAddr, mc.AdvertisePort = host, port
	if cfg.AdvertiseAddr != "" {
		if mc.AdvertiseAddr, mc.AdvertisePort, err = splitHostPort(cfg.AdvertiseAddr); err != nil {
			return nil, fmt.Errorf("gossip advertise address: %w", err)
		}
	}
	kr, err := memberlist.NewKeyring(nil, append([]byte(nil), cfg.Key...))
	if err != nil {
		return nil, fmt.Errorf("gossip keyring: %w", err)
	}
	g.keyring, mc.Keyring = kr, kr
	mc.GossipVerifyIncoming, mc.GossipVerifyOutgoing = true, true
	mc.Label = "cabinet/" + cfg.ClusterID
	mc.Events = &gossipEvents{g: g}
	mc.Logger = log.New(&memberlistLog{l: cfg.Logger}, "", 0)
	// A node that restarts under the same name (same id, same address)
	// must be taken back at once.
	mc.DeadNodeReclaimTime = time.Second
	ml, err := memberlist.Create(mc)
	if err != nil {
		return nil, fmt.Errorf("start gossip on %s: %w", cfg.BindAddr, err)
	}
	g.ml = ml
	return g, nil
}

func splitHostPort(addr string) (string, int, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return "", 0, fmt.Errorf("port %q: %w", port, err)
	}
	return host, p, nil
}

// Join contacts the given gossip addresses; it succeeds if one answered.
func (g *Gossip) Join(addrs []string) (int, error) {
	if len(addrs) == 0 {
		return 0, nil
	}
	return g.ml.Join(addrs)
}

// AddKey installs key for decrypting only (a rotation's first step: every
// member learns the new key before anyone encrypts with it). The keyring
// keeps its own copy.
func (g *Gossip) AddKey(key []byte) error {
	return g.keyring.AddKey(bytes.Clone(key))
}

// UseKey makes key the one gossip encrypts with, installing it first if
// needed; the previous keys still decrypt until DropOldKeys.
func (g *Gossip) UseKey(key []byte) error {
	kr := g.keyring
	if bytes.Equal(kr.GetPrimaryKey(), key) {
		return nil
	}
	// memberlist keeps the slices it is given (also UseKey's, as the
	// primary): switch to its own copy if it has one (AddKey), else give it
	// one.
	for _, k := range kr.GetKeys() {
		if bytes.Equal(k, key) {
			return kr.UseKey(k)
		}
	}
	own := bytes.Clone(key)
	if err := kr.AddKey(own); err != nil {
		return err
	}
	return kr.UseKey(own)
}

// IsPrimary reports whether key is the one gossip encrypts with.
func (g *Gossip) IsPrimary(key []byte) bool {
	return bytes.Equal(g.keyring.GetPrimaryKey(), key)
}

// DropOldKeys removes every key but the primary one (a rotation's last
// step: messages under an old key are refused from then on) and returns
// how many it removed.
func (g *Gossip) DropOldKeys() (int, error) {
	kr := g.keyring
	primary := kr.GetPrimaryKey()
	n := 0
	// GetKeys returns the keyring's own slice, which RemoveKey compacts in
	// place: iterate over a copy.
	for _, k := range slices.Clone(kr.GetKeys()) {
		if bytes.Equal(k, primary) {
			continue
		}
		if err := kr.RemoveKey(k); err != nil {
			return n, err
		}
		// Not cleared: memberlist may be decrypting a packet with it right
		// now (it reads its keys without holding the keyring's lock).
		n++
	}
	return n, nil
}

// KeyCount is the number of keys gossip decrypts with (1, or 2+ while a
// rotation is under way).
func (g *Gossip) KeyCount() int {
	if g == nil {
		return 0
	}
	return len(g.keyring.GetKeys())
}

// Health is gossip's view of a member: alive, suspect, dead, left or unknown.
func (g *Gossip) Health(id string) string {
	if g == nil {
		return GossipUnknown
	}
	for _, m := range g.ml.Members() {
		if m.Name == id {
			switch m.State {
			case memberlist.StateAlive:
				return GossipAlive
			case memberlist.StateSuspect:
				return GossipSuspect
			}
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if st, ok := g.states[id]; ok {
		return st.state
	}
	return GossipUnknown
}

// DeadSince returns when gossip declared `id` dead (or gone), if it is.
func (g *Gossip) DeadSince(id string) (time.Time, bool) {
	if g == nil {
		return time.Time{}, false
	}
	h := g.Health(id)
	if h != GossipDead && h != GossipLeft {
		return time.Time{}, false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.states[id].since, true
}

// Leave announces departure (bounded by timeout) and stops gossip.
func (g *Gossip) Leave(timeout time.Duration) error {
	err := g.ml.Leave(timeout)
	if serr := g.ml.Shutdown(); err == nil {
		err = serr
	}
	return err
}

// Shutdown stops gossip without announcing it (others will detect it dead).
func (g *Gossip) Shutdown() error { return g.ml.Shutdown() }

func (g *Gossip) set(n *memberlist.Node, state string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	prev, ok := g.states[n.Name]
	if ok && prev.state == state {
		return
	}
	g.states[n.Name] = gossipState{state: state, since: time.Now(), addr: n.Address()}
	g.log.Info("gossip member changed", "member", n.Name, "addr", n.Address(), "state", state)
}

type gossipEvents struct{ g *Gossip }

func (e *gossipEvents) NotifyJoin(n *memberlist.Node)   { e.g.set(n, GossipAlive) }
func (e *gossipEvents) NotifyUpdate(n *memberlist.Node) { e.g.set(n, GossipAlive) }
func (e *gossipEvents) NotifyLeave(n *memberlist.Node) {
	if n.State == memberlist.StateLeft {
		e.g.set(n, GossipLeft)
		return
	}
	e.g.set(n, GossipDead)
}

// memberlistLog routes memberlist's "[LEVEL] memberlist: ..." lines to slog.
type memberlistLog struct{ l *slog.Logger }

func (m *memberlistLog) Write(p []byte) (int, error) {
	msg := string(bytes.TrimSpace(p))
	lvl := slog.LevelInfo
	for prefix, l := range map[string]slog.Level{"[DEBUG]": slog.LevelDebug, "[INFO]": slog.LevelInfo, "[WARN]": slog.LevelWarn, "[ERR]": slog.LevelError} {
		if len(msg) >= len(prefix) && msg[:len(prefix)] == prefix {
			lvl, msg = l, string(bytes.TrimSpace([]byte(msg[len(prefix):])))
			break
		}
	}
	m.l.Log(context.Background(), lvl, msg, "component", "gossip")
	return len(p), nil
}
