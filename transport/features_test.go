package transport

import (
	"context"
	"crypto/x509"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/internal/testport"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

// TestMixedReleaseCluster: while a member runs an older release (its node
// record has a lower feature level), KEK rotation and gossip key rotation
// are refused with a message naming it, BatchEncrypt emits format 1 (which
// every release opens), and the leader leaves a due gossip key alone. Once
// the member records its level (its node loop does when it runs this
// release), all of them work.
func TestMixedReleaseCluster(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	ops := cabinetpb.NewOperatorServiceClient(e.admin)
	keys := cabinetpb.NewKeyServiceClient(e.admin)
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_CREATE_JOIN_TOKEN, &fsmpb.CreateJoinToken{TokenId: "jt-old", SecretHash: make([]byte, 32), ExpiresUnixNano: time.Now().Add(time.Hour).UnixNano()})
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_ADMIT_NODE, &fsmpb.AdmitNode{TokenId: "jt-old", SecretHash: make([]byte, 32),
		Node: &fsmpb.NodeRecord{NodeId: "old", RaftAddr: "127.0.0.1:9", IdentityPublicKeyDer: identityDER(t, e)}}) // no level: an older release
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_SET_GOSSIP_KEY, &fsmpb.SetGossipKey{GossipKey: sealedGossipKey(t, e)})

	if _, err := ops.RotateKEK(ctx, &cabinetpb.RotateKEKRequest{}); code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "old at level 0") {
		t.Fatalf("RotateKEK with an older member: %v", err)
	}
	if _, err := ops.RotateGossipKey(ctx, &cabinetpb.RotateGossipKeyRequest{}); code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "upgrade them first") {
		t.Fatalf("RotateGossipKey with an older member: %v", err)
	}
	k, err := keys.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256})
	if err != nil {
		t.Fatal(err)
	}
	batch := func() byte {
		t.Helper()
		resp, err := keys.BatchEncrypt(ctx, &cabinetpb.BatchEncryptRequest{Items: []*cabinetpb.EncryptRequest{{KeyId: k.GetKey().GetKeyId(), Plaintext: []byte("x")}}})
		if err != nil || resp.GetResults()[0].GetError() != nil {
			t.Fatalf("BatchEncrypt: %v %v", resp, err)
		}
		return resp.GetResults()[0].GetResponse().GetCiphertext()[0]
	}
	if f := batch(); f != 1 {
		t.Fatalf("BatchEncrypt with an older member: format %d, want 1", f)
	}
	// A removal marks the gossip key due; the leader waits for the upgrade.
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_CREATE_JOIN_TOKEN, &fsmpb.CreateJoinToken{TokenId: "jt-gone", SecretHash: make([]byte, 32), ExpiresUnixNano: time.Now().Add(time.Hour).UnixNano()})
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_ADMIT_NODE, &fsmpb.AdmitNode{TokenId: "jt-gone", SecretHash: make([]byte, 32),
		Node: &fsmpb.NodeRecord{NodeId: "gone", RaftAddr: "127.0.0.1:8", IdentityPublicKeyDer: []byte{3}, FeatureLevel: fsm.FeatureLevel}})
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_REMOVE_NODE, &fsmpb.RemoveNode{NodeId: "gone"})
	r := &gossipRunner{log: e.server.log, srv: e.server, warned: map[string]bool{}}
	r.leaderDuties(ctx)
	if ci := e.state.Cluster(); !ci.GetGossipKeyRotationDue() || fsm.GossipKeyGeneration(ci) != 1 {
		t.Fatalf("the leader rotated the gossip key with an older member: due %v generation %d", ci.GetGossipKeyRotationDue(), fsm.GossipKeyGeneration(ci))
	}
	if st, err := ops.Status(ctx, &cabinetpb.StatusRequest{}); err != nil || !st.GetGossipKeyRotationDue() || st.GetClusterFeatureLevel() != 0 || st.GetFeatureLevel() != fsm.FeatureLevel {
		t.Fatalf("status while waiting: %v %v", st, err)
	}

	// The old node restarts on this release: its node loop records the level.
	oldNode := NewServer(Config{NodeID: "old", Cluster: e.cluster, State: e.state, Crypto: e.server.cfg.Crypto, HSM: e.hsm, Version: "test"})
	oldNode.FeatureStep(ctx)
	if rec, _ := e.state.Node("old"); rec.GetFeatureLevel() != fsm.FeatureLevel {
		t.Fatalf("the node loop did not record the level: %v", rec)
	}
	if l, at := e.state.MinFeatureLevel(); l != fsm.FeatureLevel || len(at) != 2 {
		t.Fatalf("min level %d at %v", l, at)
	}
	if f := batch(); f != 2 {
		t.Fatalf("BatchEncrypt after the upgrade: format %d, want 2", f)
	}
	r.leaderDuties(ctx)
	if ci := e.state.Cluster(); ci.GetGossipKeyRotationDue() || fsm.GossipKeyGeneration(ci) != 2 {
		t.Fatalf("after the upgrade the leader did not rotate: due %v generation %d", ci.GetGossipKeyRotationDue(), fsm.GossipKeyGeneration(ci))
	}
	if _, err := ops.RotateGossipKey(ctx, &cabinetpb.RotateGossipKeyRequest{}); err != nil {
		t.Fatalf("RotateGossipKey after the upgrade: %v", err)
	}
	if _, err := ops.RotateKEK(ctx, &cabinetpb.RotateKEKRequest{}); err != nil {
		t.Fatalf("RotateKEK after the upgrade: %v", err)
	}
}

// identityDER is the env HSM's identity public key (PKIX DER), a usable
// stand-in for another node's.
func identityDER(t *testing.T, e *apiEnv) []byte {
	t.Helper()
	pub, err := e.hsm.EnsureIdentity(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// sealedGossipKey is a gossip key sealed the way the leader seals one.
func sealedGossipKey(t *testing.T, e *apiEnv) *fsmpb.WrappedBlob {
	t.Helper()
	blob, err := e.hsm.Seal(context.Background(), 1, make([]byte, 32), GossipKeyAAD("c-test"))
	if err != nil {
		t.Fatal(err)
	}
	return &fsmpb.WrappedBlob{KekVersion: 1, Blob: blob}
}

// TestRepairStaleFeatureLevels: a node whose state shows a member below its
// real level (it skipped that member's SET_NODE_FEATURE_LEVEL while it ran
// an older release, and a snapshot kept the old record) asks the member
// and records the level it reports, at most every featureProbeEvery.
func TestRepairStaleFeatureLevels(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	// n2 runs this release and serves Status; node1's state says level 0.
	n2 := NewServer(Config{NodeID: "n2", Cluster: e.cluster, State: e.state, Crypto: e.server.cfg.Crypto, HSM: e.hsm, Version: "test",
		Audit: e.audit, AuditPath: e.auditPath})
	key, csr, err := tlsutil.NewNodeKey("n2")
	if err != nil {
		t.Fatal(err)
	}
	der, err := e.ca.IssueNode(csr, "n2", []net.IP{net.ParseIP("127.0.0.1")}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tlsutil.KeyPair(key, der, e.ca.CertDER)
	if err != nil {
		t.Fatal(err)
	}
	ln := testport.Listen(t)
	g := n2.NewGRPCServer(tlsutil.ServerConfig(cert, e.ca.Pool()))
	go g.Serve(ln)
	t.Cleanup(g.Stop)
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_CREATE_JOIN_TOKEN, &fsmpb.CreateJoinToken{TokenId: "jt-n2", SecretHash: make([]byte, 32), ExpiresUnixNano: time.Now().Add(time.Hour).UnixNano()})
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_ADMIT_NODE, &fsmpb.AdmitNode{TokenId: "jt-n2", SecretHash: make([]byte, 32),
		Node: &fsmpb.NodeRecord{NodeId: "n2", ApiAddr: ln.Addr().String(), RaftAddr: "127.0.0.1:9", IdentityPublicKeyDer: identityDER(t, e)}})
	peers := NewPeerClients(tlsutil.ClientConfig(issueClient(t, e.ca, "probe", tlsutil.RoleOperator), e.ca.Pool()))
	t.Cleanup(func() { peers.Close() })
	e.server.cfg.Peers = peers

	e.server.repairFeatureLevels(ctx)
	if rec, _ := e.state.Node("n2"); rec.GetFeatureLevel() != fsm.FeatureLevel {
		t.Fatalf("n2's record after the probe: %v, want level %d", rec, fsm.FeatureLevel)
	}
	if l, _ := e.state.MinFeatureLevel(); l != fsm.FeatureLevel {
		t.Fatalf("cluster level %d", l)
	}
	// Bounded: another stale record within featureProbeEvery waits.
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_SET_NODE_FEATURE_LEVEL, &fsmpb.SetNodeFeatureLevel{NodeId: "n2", Level: 0})
	e.server.repairFeatureLevels(ctx)
	if rec, _ := e.state.Node("n2"); rec.GetFeatureLevel() != 0 {
		t.Fatalf("probed again within %v: %v", featureProbeEvery, rec)
	}
	e.server.features.probe.Store(0)
	e.server.repairFeatureLevels(ctx)
	if rec, _ := e.state.Node("n2"); rec.GetFeatureLevel() != fsm.FeatureLevel {
		t.Fatalf("n2's record after the next probe: %v", rec)
	}
}
