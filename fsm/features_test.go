package fsm

import (
	"slices"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

const typFeatureLevel = fsmpb.CommandType_COMMAND_TYPE_SET_NODE_FEATURE_LEVEL

// Members' feature levels come from their records (init, admit) and
// SET_NODE_FEATURE_LEVEL; MinFeatureLevel names the lowest and who is at it.
func TestFeatureLevels(t *testing.T) {
	f := New(Config{})
	if l, at := f.MinFeatureLevel(); l != 0 || at != nil {
		t.Fatalf("empty state: %d %v", l, at)
	}
	a := newApplier(t)
	f.state = a.s
	p := initPayload()
	p.FirstNode.FeatureLevel = FeatureLevel
	a.mustOK(typInit, p)
	if l, at := f.MinFeatureLevel(); l != FeatureLevel || !slices.Equal(at, []string{"n1"}) {
		t.Fatalf("after init: %d %v", l, at)
	}
	// A node of an older release joins (its record has no level).
	a.mustOK(typToken, joinTokenPayload("tok", t0+1e12))
	a.mustOK(typAdmit, admitPayload("tok", "n2"))
	if l, at := f.MinFeatureLevel(); l != 0 || !slices.Equal(at, []string{"n2"}) {
		t.Fatalf("with an older member: %d %v", l, at)
	}
	before := a.s.nodes["n2"]
	res := a.mustOK(typFeatureLevel, &fsmpb.SetNodeFeatureLevel{NodeId: "n2", Level: FeatureLevel})
	if res.GetNode().GetFeatureLevel() != FeatureLevel || before.GetFeatureLevel() != 0 {
		t.Fatalf("result %v; the stored record was modified in place: %v", res.GetNode(), before)
	}
	if l, at := f.MinFeatureLevel(); l != FeatureLevel || !slices.Equal(at, []string{"n1", "n2"}) {
		t.Fatalf("after the upgrade: %d %v", l, at)
	}
	res = a.apply(typFeatureLevel, &fsmpb.SetNodeFeatureLevel{NodeId: "gone", Level: 1}, env{})
	checkResult(t, res, fsmpb.ResultCode_RESULT_CODE_NOT_FOUND, "not a member")
	// Older nodes may skip the command; nothing else is ignorable.
	cmd, err := NewCommand(typFeatureLevel, &fsmpb.SetNodeFeatureLevel{NodeId: "n2", Level: 1}, "", "node:n2")
	if err != nil || !cmd.GetIgnorable() {
		t.Fatalf("SET_NODE_FEATURE_LEVEL not ignorable: %v %v", cmd, err)
	}
	if cmd, _ := NewCommand(typGossipKey, gossipKeyPayload(1, "x"), "", "node:n1"); cmd.GetIgnorable() {
		t.Fatal("SET_GOSSIP_KEY is ignorable")
	}
	// The level survives a snapshot.
	st, err := StateFromProto(a.s.ToProto())
	if err != nil || st.nodes["n2"].GetFeatureLevel() != FeatureLevel {
		t.Fatalf("after a snapshot round trip: %v %v", st.nodes["n2"], err)
	}
}

// Snapshots write request records' outcomes as messages while a member may
// run a release that requires them (below FeatureCompactRequestRecords),
// marshalled once every member is at that level; either form restores to
// the compact one and replays the same outcome.
func TestRequestRecordsInSnapshotsFollowLevels(t *testing.T) {
	a := initialised(t) // n1's record has no level: an older release
	first := a.apply(typCreate, createKeyPayload(keyID(1)), env{requestID: "req-1"})
	forms := func() (messages, marshalled int) {
		for _, r := range a.s.ToProto().GetRequests() {
			if r.GetResult() != nil {
				messages++
			}
			if len(r.GetResultBytes()) > 0 {
				marshalled++
			}
		}
		return messages, marshalled
	}
	if m, b := forms(); m == 0 || b != 0 {
		t.Fatalf("below level %d: %d records as messages, %d marshalled; want messages only", FeatureCompactRequestRecords, m, b)
	}
	st, err := StateFromProto(a.s.ToProto())
	if err != nil {
		t.Fatal(err)
	}
	rec, _ := st.request("req-1")
	if rec.GetResult() != nil || !proto.Equal(replayResult(rec), first) {
		t.Fatalf("restored from messages: %v", rec)
	}
	a.mustOK(typFeatureLevel, &fsmpb.SetNodeFeatureLevel{NodeId: "n1", Level: FeatureCompactRequestRecords})
	if m, b := forms(); m != 0 || b == 0 {
		t.Fatalf("at level %d: %d records as messages, %d marshalled; want marshalled only", FeatureCompactRequestRecords, m, b)
	}
	st, err = StateFromProto(a.s.ToProto())
	if err != nil {
		t.Fatal(err)
	}
	if rec, _ := st.request("req-1"); !proto.Equal(replayResult(rec), first) {
		t.Fatalf("restored from marshalled records: %v", rec)
	}
}
