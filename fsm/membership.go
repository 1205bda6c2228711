package fsm

import (
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// applySetGossipKey records memberlist's encryption key, sealed under an
// ACTIVE KEK version by the proposing leader's HSM (AAD
// "cabinet/gossip-key/v1" + cluster id; the FSM never sees the plaintext).
// The leader proposes it once per cluster with a fixed request id, so a
// second leader that races the first gets the first outcome; a later
// SET_GOSSIP_KEY with another request id replaces the key (rotation).
func (s *State) applySetGossipKey(c *cmdContext, p *fsmpb.SetGossipKey) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	key := p.GetGossipKey()
	if res := checkBlob("gossip key", key); res != nil {
		return res
	}
	if res := s.checkKEKActive("gossip key", key.GetKekVersion()); res != nil {
		return res
	}
	cur := GossipKeyGeneration(s.cluster)
	if want := p.GetReplacesGeneration(); want != 0 && want != cur {
		return failf(codePrecondition, "the gossip key changed meanwhile (generation %d, this rotation replaces %d); the cluster already uses a new key",
			cur, want)
	}
	// Stored records are immutable (readers hold the old pointer).
	ci := proto.CloneOf(s.cluster)
	ci.GossipKey = key
	ci.GossipKeyGeneration = cur + 1
	ci.GossipKeySetUnixNano = c.time
	ci.GossipKeyRotationDue = false
	s.cluster = ci
	return &fsmpb.Result{GossipKeyGeneration: cur + 1}
}

// GossipKeyGeneration is ci's gossip key generation: 0 without a key, and
// at least 1 with one (a key set before generations were counted is 1).
func GossipKeyGeneration(ci *fsmpb.ClusterInfo) uint32 {
	if ci.GetGossipKey() == nil {
		return 0
	}
	return max(ci.GetGossipKeyGeneration(), 1)
}

// markGossipKeyRotationDue: a removed member knows the gossip key, so the
// leader must replace it (transport's gossip runner proposes the new one).
func (s *State) markGossipKeyRotationDue() {
	if s.cluster == nil || s.cluster.GetGossipKey() == nil || s.cluster.GetGossipKeyRotationDue() {
		return
	}
	ci := proto.CloneOf(s.cluster)
	ci.GossipKeyRotationDue = true
	s.cluster = ci
}
