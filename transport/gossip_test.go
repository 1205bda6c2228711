package transport

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/internal/testport"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// TestGossipRunnerRotations drives one node's gossip runner through
// overlapping rotations, a KEK re-wrap of the pending key and a removal
// (which makes the leader rotate by itself), with the switch and drop
// delays stepped explicitly: keys are installed first, the newest one is
// switched to, every older one is dropped, and Status reports it.
func TestGossipRunnerRotations(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	ops := cabinetpb.NewOperatorServiceClient(e.admin)
	clock := time.Now()
	r := &gossipRunner{log: slog.New(slog.NewTextHandler(io.Discard, nil)), gs: GossipSettings{Addr: testport.Addr(t), Enabled: true},
		srv: e.server, warned: map[string]bool{}, now: func() time.Time { return clock }}
	t.Cleanup(func() {
		if g := r.gossip(); g != nil {
			_ = g.Shutdown()
		}
	})
	if _, err := ops.RotateGossipKey(ctx, &cabinetpb.RotateGossipKeyRequest{}); code(err) != codes.FailedPrecondition {
		t.Fatalf("rotate before any key: %v", err)
	}
	r.leaderDuties(ctx) // creates generation 1
	var rejoin time.Time
	step := func() {
		t.Helper()
		if err := r.step(ctx, &rejoin); err != nil {
			t.Fatal(err)
		}
	}
	status := func(gen, inUse, held uint32) {
		t.Helper()
		st, err := ops.Status(ctx, &cabinetpb.StatusRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if st.GetGossipKeyGeneration() != gen || st.GetGossipKeyInUse() != inUse || st.GetGossipKeysHeld() != held {
			t.Fatalf("status: generation %d, in use %d, held %d; want %d, %d, %d",
				st.GetGossipKeyGeneration(), st.GetGossipKeyInUse(), st.GetGossipKeysHeld(), gen, inUse, held)
		}
	}
	step() // starts gossip
	if r.gossip() == nil {
		t.Fatal("gossip did not start")
	}
	status(1, 1, 1)

	// Two rotations before the first switch: both keys are installed, the
	// newest becomes pending.
	for want := uint32(2); want <= 3; want++ {
		resp, err := ops.RotateGossipKey(ctx, &cabinetpb.RotateGossipKeyRequest{})
		if err != nil || resp.GetGeneration() != want {
			t.Fatalf("rotate: %v %v, want generation %d", resp, err, want)
		}
		step()
	}
	status(3, 1, 3)
	// A KEK rotation re-wraps the pending key: a new blob, the same key.
	if _, err := ops.RotateKEK(ctx, &cabinetpb.RotateKEKRequest{}); err != nil {
		t.Fatal(err)
	}
	e.server.ProposeKEKWork(ctx) // activate v2
	e.server.ProposeKEKWork(ctx) // re-wrap (the gossip key too), retire v1
	if b := e.state.Cluster().GetGossipKey(); b.GetKekVersion() != 2 || fsm.GossipKeyGeneration(e.state.Cluster()) != 3 {
		t.Fatalf("after the KEK rotation: gossip key under KEK %d, generation %d", b.GetKekVersion(), fsm.GossipKeyGeneration(e.state.Cluster()))
	}
	step()
	status(3, 1, 3) // still pending: a re-wrap is not a new key
	clock = clock.Add(gossipKeySwitchDelay - time.Millisecond)
	step()
	status(3, 1, 3) // not yet
	clock = clock.Add(time.Millisecond)
	step()
	status(3, 3, 3) // switched, old keys kept for the grace period
	clock = clock.Add(gossipOldKeyGrace)
	step()
	status(3, 3, 1)

	// Removing a member marks the key due; the leader's duty replaces it.
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_CREATE_JOIN_TOKEN, &fsmpb.CreateJoinToken{TokenId: "jt-n2", SecretHash: make([]byte, 32), ExpiresUnixNano: time.Now().Add(time.Hour).UnixNano()})
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_ADMIT_NODE, &fsmpb.AdmitNode{TokenId: "jt-n2", SecretHash: make([]byte, 32),
		Node: &fsmpb.NodeRecord{NodeId: "n2", RaftAddr: "127.0.0.1:9", IdentityPublicKeyDer: []byte{2}}})
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_REMOVE_NODE, &fsmpb.RemoveNode{NodeId: "n2"})
	if !e.state.Cluster().GetGossipKeyRotationDue() {
		t.Fatal("removal did not mark the gossip key due")
	}
	r.leaderDuties(ctx)
	if ci := e.state.Cluster(); ci.GetGossipKeyRotationDue() || fsm.GossipKeyGeneration(ci) != 4 {
		t.Fatalf("after the leader's duty: due %v, generation %d", ci.GetGossipKeyRotationDue(), fsm.GossipKeyGeneration(ci))
	}
	step()
	status(4, 3, 2)
}
