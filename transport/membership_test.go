package transport

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

// fakeMembership is a leader whose Raft configuration is a list.
type fakeMembership struct {
	*fakeCluster
	mu       sync.Mutex
	servers  []cluster.Server
	leader   string
	removed  []string
	nonvoter []string
}

func (f *fakeMembership) Servers() ([]cluster.Server, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]cluster.Server(nil), f.servers...), nil
}
func (f *fakeMembership) IsLeader() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.leader == "node1"
}
func (f *fakeMembership) Leader() (string, string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.leader, ""
}
func (f *fakeMembership) AddNonvoter(_ context.Context, id, addr string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nonvoter = append(f.nonvoter, id)
	f.servers = append(f.servers, cluster.Server{ID: id, RaftAddr: addr})
	return nil
}
func (f *fakeMembership) RemoveServer(_ context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.removed = append(f.removed, id)
	for i, s := range f.servers {
		if s.ID == id {
			f.servers = append(f.servers[:i], f.servers[i+1:]...)
			break
		}
	}
	return nil
}
func (f *fakeMembership) TransferLeadershipTo(_ context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, s := range f.servers {
		if s.ID == id || (id == "" && s.ID != "node1" && s.Voter) {
			if !s.Voter {
				return errNonVoter
			}
			f.leader = s.ID
			return nil
		}
	}
	return cluster.ErrNotMember
}

var errNonVoter = errors.New("node is a non-voter and cannot lead")

type staticGossip map[string]string

func (g staticGossip) Health(id string) string {
	if h, ok := g[id]; ok {
		return h
	}
	return cluster.GossipUnknown
}

func newMembershipEnv(t *testing.T) (*Server, *fakeMembership, context.Context) {
	t.Helper()
	e := newAPIEnv(t)
	fm := &fakeMembership{fakeCluster: e.cluster, leader: "node1", servers: []cluster.Server{
		{ID: "node1", RaftAddr: "127.0.0.1:2", Voter: true},
		{ID: "node2", RaftAddr: "127.0.0.1:12", Voter: true},
	}}
	ctx := context.Background()
	for i, p := range []struct {
		id    string
		voter bool
	}{{"node2", true}, {"replica", false}} {
		secret := sha256.Sum256([]byte(p.id))
		tok, _ := fsm.NewCommand(fsmpb.CommandType_COMMAND_TYPE_CREATE_JOIN_TOKEN, &fsmpb.CreateJoinToken{
			TokenId: p.id, SecretHash: secret[:], ExpiresUnixNano: time.Now().Add(time.Hour).UnixNano()}, "", "admin:t")
		admit, _ := fsm.NewCommand(fsmpb.CommandType_COMMAND_TYPE_ADMIT_NODE, &fsmpb.AdmitNode{TokenId: p.id, SecretHash: secret[:],
			Node: &fsmpb.NodeRecord{NodeId: p.id, RaftAddr: fmt.Sprintf("127.0.0.1:%d2", 3+i), ApiAddr: fmt.Sprintf("127.0.0.1:%d1", 3+i),
				IdentityPublicKeyDer: []byte{1}, Region: "r-" + p.id, Voter: p.voter}}, "", "node:"+p.id)
		for _, cmd := range []*fsmpb.Command{tok, admit} {
			if res, err := fm.Propose(ctx, cmd); err != nil || res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
				t.Fatalf("%v: %v %v", cmd.GetType(), res, err)
			}
		}
	}
	srv := NewServer(Config{NodeID: "node1", Cluster: fm, State: e.state, HSM: hsm.NewMemory(), Version: "test"})
	return srv, fm, context.WithValue(ctx, identityKey{}, tlsutil.Identity{Name: "alice", Role: roleAdmin})
}

func TestRemovePeer(t *testing.T) {
	srv, fm, ctx := newMembershipEnv(t)
	if _, err := srv.RemovePeer(ctx, &cabinetpb.RemovePeerRequest{NodeId: "node1"}); code(err) != codes.FailedPrecondition {
		t.Fatalf("removing the leader: %v", err)
	}
	if _, err := srv.RemovePeer(ctx, &cabinetpb.RemovePeerRequest{NodeId: "ghost"}); code(err) != codes.NotFound {
		t.Fatalf("removing an unknown node: %v", err)
	}
	if _, err := srv.RemovePeer(ctx, &cabinetpb.RemovePeerRequest{NodeId: "node2", RequestId: "r"}); err != nil {
		t.Fatal(err)
	}
	if _, ok := srv.cfg.State.Node("node2"); ok || len(fm.removed) != 1 {
		t.Fatalf("node2 still recorded, or raft removals %v", fm.removed)
	}
	// In the state but not in Raft (a half-done removal, or a node lost
	// before recover-quorum): the record goes.
	if _, err := srv.RemovePeer(ctx, &cabinetpb.RemovePeerRequest{NodeId: "replica"}); err != nil {
		t.Fatal(err)
	}
	if _, ok := srv.cfg.State.Node("replica"); ok || len(fm.removed) != 1 {
		t.Fatalf("replica still recorded, or raft removals %v", fm.removed)
	}
}

func TestAddPeerHonoursNonVoter(t *testing.T) {
	srv, fm, _ := newMembershipEnv(t)
	ctx := context.WithValue(context.Background(), identityKey{}, tlsutil.Identity{Name: "replica", Role: roleNode, IsNode: true, NodeID: "replica"})
	resp, err := srv.AddPeer(ctx, &cabinetpb.AddPeerRequest{Voter: true})
	if err != nil || !resp.GetAdded() {
		t.Fatalf("AddPeer: %v %v", resp, err)
	}
	if len(fm.nonvoter) != 1 || fm.nonvoter[0] != "replica" {
		t.Fatalf("non-voters added: %v", fm.nonvoter)
	}
}

func TestTransferLeadershipAndListPeers(t *testing.T) {
	srv, fm, ctx := newMembershipEnv(t)
	srv.SetGossip(staticGossip{"node1": cluster.GossipAlive, "node2": cluster.GossipDead})
	peers, err := srv.ListPeers(ctx, &cabinetpb.ListPeersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]*cabinetpb.Peer{}
	for _, p := range peers.GetPeers() {
		got[p.GetNodeId()] = p
	}
	if got["node1"].GetGossip() != "alive" || got["node2"].GetGossip() != "dead" || got["node2"].GetRegion() != "r-node2" || got["node1"].GetVersion() != "test" {
		t.Fatalf("peers: %v", peers)
	}
	if _, err := srv.TransferLeadership(ctx, &cabinetpb.TransferLeadershipRequest{ToNodeId: "ghost"}); code(err) != codes.NotFound {
		t.Fatalf("transfer to an unknown node: %v", err)
	}
	resp, err := srv.TransferLeadership(ctx, &cabinetpb.TransferLeadershipRequest{ToNodeId: "node2"})
	if err != nil || resp.GetLeaderId() != "node2" || fm.leader != "node2" {
		t.Fatalf("transfer: %v %v", resp, err)
	}
}
