package fsm

import (
	"slices"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// Feature levels let a cluster run mixed releases during a rolling upgrade.
// Each binary has a FeatureLevel; every member's level is in its node record
// (set when it is initialised or joins, updated by SET_NODE_FEATURE_LEVEL
// when it restarts on another release). A feature that every node must
// understand (a new command type or field whose meaning older nodes would
// get wrong, a ciphertext format older nodes cannot open) is used only when
// MinFeatureLevel reaches the level that introduced it; until then the
// servers refuse the operation with a message naming the older nodes, or
// fall back to the older behaviour.
const (
	// FeatureLevel is this binary's level.
	FeatureLevel = FeatureCompactRequestRecords

	// FeatureKEKRotation: the KEK rotation commands (BEGIN_KEK_ROTATION ...
	// ABANDON_KEK_ROTATION) and ciphertext format 2 (BatchEncrypt uses it
	// from this level on).
	FeatureKEKRotation uint32 = 1
	// FeatureGossipKeyGenerations: SET_GOSSIP_KEY's compare-and-set on the
	// generation and REWRAP_MATERIAL's gossip key generation check (an
	// older node would apply a refused rotation and diverge). KEK rotation
	// and gossip key rotation start only from this level on.
	FeatureGossipKeyGenerations uint32 = 2
	// FeatureCompactRequestRecords: snapshots may carry request records'
	// outcomes marshalled (RequestRecord.result_bytes). Below it they are
	// written as messages, which older releases require.
	FeatureCompactRequestRecords uint32 = 3
)

// minLevel is the lowest feature level among nodes (0 for none).
func minLevel(nodes []*fsmpb.NodeRecord) uint32 {
	var low uint32
	for i, n := range nodes {
		if l := n.GetFeatureLevel(); i == 0 || l < low {
			low = l
		}
	}
	return low
}

// applySetNodeFeatureLevel records a member's feature level.
func (s *State) applySetNodeFeatureLevel(_ *cmdContext, p *fsmpb.SetNodeFeatureLevel) *fsmpb.Result {
	node, ok := s.nodes[p.GetNodeId()]
	if !ok {
		return failf(codeNotFound, "node %+q is not a member of the cluster", truncate(p.GetNodeId()))
	}
	if node.GetFeatureLevel() == p.GetLevel() {
		return &fsmpb.Result{Node: node}
	}
	// Stored records are immutable (readers hold the old pointer).
	n := proto.CloneOf(node)
	n.FeatureLevel = p.GetLevel()
	s.nodes[n.GetNodeId()] = n
	return &fsmpb.Result{Node: n}
}

// MinFeatureLevel is the lowest feature level among the members, and the
// members at that level (sorted), or 0 and nil before initialisation.
func (f *FSM) MinFeatureLevel() (uint32, []string) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var low uint32
	var at []string
	for id, n := range f.state.nodes {
		switch l := n.GetFeatureLevel(); {
		case at == nil || l < low:
			low, at = l, append(at[:0], id)
		case l == low:
			at = append(at, id)
		}
	}
	slices.Sort(at)
	return low, at
}
