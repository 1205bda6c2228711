package fsm

import (
	"bytes"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

const typGossipKey = fsmpb.CommandType_COMMAND_TYPE_SET_GOSSIP_KEY

func gossipKeyPayload(kek uint32, blob string) *fsmpb.SetGossipKey {
	return &fsmpb.SetGossipKey{GossipKey: &fsmpb.WrappedBlob{KekVersion: kek, Blob: []byte(blob)}}
}

func TestSetGossipKey(t *testing.T) {
	invalid := fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT
	gossipIs := func(blob string) func(t *testing.T, s *State, _ *fsmpb.Result) {
		return func(t *testing.T, s *State, _ *fsmpb.Result) {
			t.Helper()
			if got := s.cluster.GetGossipKey(); got.GetKekVersion() != 1 || !bytes.Equal(got.GetBlob(), []byte(blob)) {
				t.Fatalf("gossip key = %v, want KEK 1 blob %q", got, blob)
			}
		}
	}
	runCases(t, []applyCase{
		{name: "set", typ: typGossipKey, payload: gossipKeyPayload(1, "sealed-1"), code: codeOK, check: gossipIs("sealed-1")},
		{name: "replace (rotation)", setup: func(a *applier) {
			a.mustOK(typInit, initPayload())
			a.mustOK(typGossipKey, gossipKeyPayload(1, "sealed-1"))
		}, typ: typGossipKey, payload: gossipKeyPayload(1, "sealed-2"), code: codeOK, check: gossipIs("sealed-2")},
		{name: "before init", setup: uninitialised, typ: typGossipKey, payload: gossipKeyPayload(1, "x"),
			code: fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION, msg: "not initialised"},
		{name: "missing", typ: typGossipKey, payload: &fsmpb.SetGossipKey{}, code: invalid, msg: "gossip key is required"},
		{name: "empty", typ: typGossipKey, payload: gossipKeyPayload(1, ""), code: invalid, msg: "gossip key is empty"},
		{name: "unknown KEK version", typ: typGossipKey, payload: gossipKeyPayload(9, "x"), code: invalid, msg: "does not exist"},
	})
}

// The cluster info a reader got before SET_GOSSIP_KEY is not modified.
func TestSetGossipKeyKeepsOldRecord(t *testing.T) {
	a := initialised(t)
	before := a.s.cluster
	a.mustOK(typGossipKey, gossipKeyPayload(1, "sealed"))
	if before.GetGossipKey() != nil {
		t.Fatal("SET_GOSSIP_KEY modified the stored cluster info in place")
	}
	if a.s.cluster.GetGossipKey() == nil {
		t.Fatal("gossip key not recorded")
	}
}

// Generations count keys, a removal marks the key due for rotation (the
// removed node knows it), the next key clears the mark, and a rotation
// built against an older generation is refused.
func TestGossipKeyGenerationsAndRotationDue(t *testing.T) {
	a := initialised(t)
	a.mustOK(typToken, joinTokenPayload("tok", t0+1e12))
	a.mustOK(typAdmit, admitPayload("tok", "n2"))
	a.mustOK(typRemove, &fsmpb.RemoveNode{NodeId: "n2"})
	if a.s.cluster.GetGossipKeyRotationDue() {
		t.Fatal("a removal before any gossip key exists marked a rotation due")
	}
	a.mustOK(typGossipKey, gossipKeyPayload(1, "k1"))
	if ci := a.s.cluster; ci.GetGossipKeyGeneration() != 1 || ci.GetGossipKeySetUnixNano() == 0 {
		t.Fatalf("after the first key: generation %d set %d", ci.GetGossipKeyGeneration(), ci.GetGossipKeySetUnixNano())
	}
	a.mustOK(typToken, joinTokenPayload("tok2", t0+1e12))
	a.mustOK(typAdmit, admitPayload("tok2", "n3"))
	before := a.s.cluster
	a.mustOK(typRemove, &fsmpb.RemoveNode{NodeId: "n3"})
	if !a.s.cluster.GetGossipKeyRotationDue() {
		t.Fatal("removing a member did not mark the gossip key due for rotation")
	}
	if before.GetGossipKeyRotationDue() {
		t.Fatal("REMOVE_NODE modified the stored cluster info in place")
	}
	stale := gossipKeyPayload(1, "k-stale")
	stale.ReplacesGeneration = 7
	res := a.apply(typGossipKey, stale, env{})
	if res.GetCode() != fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION || !strings.Contains(res.GetMessage(), "changed meanwhile") {
		t.Fatalf("stale rotation: %s %q", res.GetCode(), res.GetMessage())
	}
	next := gossipKeyPayload(1, "k2")
	next.ReplacesGeneration = 1
	a.mustOK(typGossipKey, next)
	if ci := a.s.cluster; ci.GetGossipKeyGeneration() != 2 || ci.GetGossipKeyRotationDue() || string(ci.GetGossipKey().GetBlob()) != "k2" {
		t.Fatalf("after the rotation: generation %d due %v blob %q", ci.GetGossipKeyGeneration(), ci.GetGossipKeyRotationDue(), ci.GetGossipKey().GetBlob())
	}
}

// A gossip key set before generations were counted (generation 0 in the
// state) is generation 1: a rotation replacing 1 applies and makes 2, one
// replacing 0 is unconditional as before.
func TestGossipKeyLegacyGeneration(t *testing.T) {
	a := initialised(t)
	a.mustOK(typGossipKey, gossipKeyPayload(1, "k1"))
	ci := proto.CloneOf(a.s.cluster)
	ci.GossipKeyGeneration = 0 // as a state written by an older release
	a.s.cluster = ci
	if g := GossipKeyGeneration(a.s.cluster); g != 1 {
		t.Fatalf("legacy generation = %d, want 1", g)
	}
	next := gossipKeyPayload(1, "k2")
	next.ReplacesGeneration = 1
	if res := a.mustOK(typGossipKey, next); res.GetGossipKeyGeneration() != 2 || a.s.cluster.GetGossipKeyGeneration() != 2 {
		t.Fatalf("result generation %d, state %d; want 2", res.GetGossipKeyGeneration(), a.s.cluster.GetGossipKeyGeneration())
	}
	if g := GossipKeyGeneration(&fsmpb.ClusterInfo{}); g != 0 {
		t.Fatalf("no key: generation %d", g)
	}
}

func TestAdmitNonVoter(t *testing.T) {
	a := initialised(t)
	a.mustOK(typToken, joinTokenPayload("tok", t0+1e12))
	p := admitPayload("tok", "replica")
	p.Node.Voter = false
	p.Node.Region = "ap-south"
	res := a.mustOK(typAdmit, p)
	n := a.s.nodes["replica"]
	if n == nil || n.GetVoter() || n.GetRegion() != "ap-south" || res.GetNode().GetVoter() {
		t.Fatalf("admitted node = %v, want a non-voter in ap-south", n)
	}
	// A removed node can be admitted again (rejoin) with a new token.
	a.mustOK(typRemove, &fsmpb.RemoveNode{NodeId: "replica"})
	a.mustOK(typToken, joinTokenPayload("tok2", t0+1e12))
	p2 := admitPayload("tok2", "replica")
	if res := a.mustOK(typAdmit, p2); !res.GetNode().GetVoter() {
		t.Fatal("rejoined node should be a voter")
	}
}
