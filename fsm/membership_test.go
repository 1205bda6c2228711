package fsm

import (
	"bytes"
	"testing"

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
