package transport

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/keyops"
	"github.com/cabinet-kms/cabinet/transport/audit"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

// fakeCluster applies commands straight to a real FSM (no Raft): enough to
// test the API edge; Raft itself is tested in cluster/ and integration/.
type fakeCluster struct {
	mu      sync.Mutex
	fsm     *fsm.FSM
	index   uint64
	readErr error
}

func (f *fakeCluster) Propose(ctx context.Context, cmd *fsmpb.Command) (*fsmpb.Result, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	cmd.LeaderTimeUnixNano = time.Now().UnixNano()
	data, err := fsm.EncodeCommand(cmd)
	if err != nil {
		return nil, err
	}
	f.index++
	switch r := f.fsm.Apply(&raft.Log{Index: f.index, Type: raft.LogCommand, Data: data}).(type) {
	case *fsmpb.Result:
		return r, nil
	case error:
		return nil, r
	}
	return nil, errors.New("unexpected apply response")
}
func (f *fakeCluster) ApplyForwarded(ctx context.Context, data []byte) (*fsmpb.Result, uint64, error) {
	cmd, err := fsm.DecodeCommand(data)
	if err != nil {
		return nil, 0, err
	}
	r, err := f.Propose(ctx, cmd)
	return r, f.index, err
}
func (f *fakeCluster) ReadIndexLocal(context.Context) (uint64, error) { return f.index, nil }
func (f *fakeCluster) CheckRead(context.Context, bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.readErr
}
func (f *fakeCluster) AddVoter(context.Context, string, string) error { return nil }
func (f *fakeCluster) Status() cluster.Status {
	return cluster.Status{NodeID: "node1", State: "leader", LeaderID: "node1", Voter: true}
}
func (f *fakeCluster) Servers() ([]cluster.Server, error) {
	return []cluster.Server{{ID: "node1", RaftAddr: "127.0.0.1:1", Voter: true}}, nil
}
func (f *fakeCluster) Leader() (string, string) { return "node1", "" }
func (f *fakeCluster) IsLeader() bool           { return true }

type apiEnv struct {
	t         *testing.T
	addr      string
	ca        *tlsutil.CA
	cluster   *fakeCluster
	admin     *grpc.ClientConn
	node      *grpc.ClientConn
	caFP      string
	audit     *audit.Log
	auditPath string
	state     *fsm.FSM
	server    *Server
	hsm       *hsm.Memory
}

func issueClient(t *testing.T, ca *tlsutil.CA, name, role string) tls.Certificate {
	t.Helper()
	der, key, err := ca.IssueClient(name, role, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tlsutil.KeyPair(key, der, ca.CertDER)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

func dialTLS(t *testing.T, addr string, cfg *tls.Config) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func newAPIEnv(t *testing.T) *apiEnv {
	t.Helper()
	ctx := context.Background()
	h := hsm.NewMemory()
	if _, err := h.EnsureIdentity(ctx); err != nil {
		t.Fatal(err)
	}
	kcv, err := h.GenerateKEK(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := tlsutil.NewCA("c-test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	caKey, err := ca.KeyPKCS8()
	if err != nil {
		t.Fatal(err)
	}
	sealed, err := h.Seal(ctx, 1, caKey, CAKeyAAD("c-test"))
	if err != nil {
		t.Fatal(err)
	}
	state := fsm.New(fsm.Config{})
	fc := &fakeCluster{fsm: state}
	cmd, _ := fsm.NewCommand(fsmpb.CommandType_COMMAND_TYPE_INIT_CLUSTER, &fsmpb.InitCluster{
		ClusterId: "c-test", CaCertDer: ca.CertDER, CaKey: &fsmpb.WrappedBlob{KekVersion: 1, Blob: sealed},
		Kek: &fsmpb.KEKVersion{Version: 1, CheckValue: kcv, State: fsmpb.KEKState_KEK_STATE_ACTIVE},
		FirstNode: &fsmpb.NodeRecord{NodeId: "node1", ApiAddr: "127.0.0.1:1", RaftAddr: "127.0.0.1:2", IdentityPublicKeyDer: []byte{1},
			FeatureLevel: fsm.FeatureLevel},
	}, "init", "admin:init")
	if res, err := fc.Propose(ctx, cmd); err != nil || res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
		t.Fatalf("init: %v %v", res, err)
	}
	engine, err := keyops.New(keyops.Config{Sealer: h})
	if err != nil {
		t.Fatal(err)
	}
	auditPath := filepath.Join(t.TempDir(), "audit.log")
	alog, err := audit.Open(auditPath, audit.Options{Node: "node1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { alog.Close() })
	srv := NewServer(Config{NodeID: "node1", Cluster: fc, State: state, Crypto: engine, HSM: h, Version: "test",
		Audit: alog, AuditPath: auditPath})
	nodeKey, csr, err := tlsutil.NewNodeKey("node1")
	if err != nil {
		t.Fatal(err)
	}
	nodeDER, err := ca.IssueNode(csr, "node1", []net.IP{net.ParseIP("127.0.0.1")}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	nodeCert, err := tlsutil.KeyPair(nodeKey, nodeDER, ca.CertDER)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := srv.NewGRPCServer(tlsutil.ServerConfig(nodeCert, ca.Pool()))
	go g.Serve(ln)
	t.Cleanup(g.Stop)
	e := &apiEnv{t: t, addr: ln.Addr().String(), ca: ca, cluster: fc, caFP: tlsutil.Fingerprint(ca.CertDER), audit: alog, auditPath: auditPath, state: state, server: srv, hsm: h}
	e.admin = dialTLS(t, e.addr, tlsutil.ClientConfig(issueClient(t, ca, "alice", tlsutil.RoleAdmin), ca.Pool()))
	e.node = dialTLS(t, e.addr, tlsutil.ClientConfig(nodeCert, ca.Pool()))
	return e
}

func code(err error) codes.Code { return status.Code(err) }

func TestKeyLifecycleOverTLS(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	keys := cabinetpb.NewKeyServiceClient(e.admin)
	created, err := keys.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, Alias: "orders", RequestId: "r1"})
	if err != nil {
		t.Fatal(err)
	}
	again, err := keys.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, Alias: "orders", RequestId: "r1"})
	if err != nil || again.GetKey().GetKeyId() != created.GetKey().GetKeyId() {
		t.Fatalf("retry with the same request id: %v %v", again.GetKey().GetKeyId(), err)
	}
	ec := map[string]string{"tenant": "acme"}
	enc, err := keys.Encrypt(ctx, &cabinetpb.EncryptRequest{KeyId: "orders", Plaintext: []byte("secret"), EncryptionContext: ec})
	if err != nil {
		t.Fatal(err)
	}
	dec, err := keys.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: enc.GetCiphertext(), EncryptionContext: ec})
	if err != nil || string(dec.GetPlaintext()) != "secret" || dec.GetKeyId() != created.GetKey().GetKeyId() {
		t.Fatalf("decrypt: %v %v", dec, err)
	}
	dk, err := keys.GenerateDataKey(ctx, &cabinetpb.GenerateDataKeyRequest{KeyId: created.GetKey().GetKeyId()})
	if err != nil || len(dk.GetPlaintext()) != 32 {
		t.Fatalf("data key: %v", err)
	}
	dkBack, err := keys.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: dk.GetCiphertext()})
	if err != nil || string(dkBack.GetPlaintext()) != string(dk.GetPlaintext()) {
		t.Fatalf("data key decrypt: %v", err)
	}
	list, err := keys.ListKeys(ctx, &cabinetpb.ListKeysRequest{})
	if err != nil || len(list.GetKeys()) != 1 {
		t.Fatalf("list: %v %v", list, err)
	}

	tampered := append([]byte{}, enc.GetCiphertext()...)
	tampered[len(tampered)-3] ^= 0x40
	cases := []struct {
		name string
		call func() error
		want codes.Code
	}{
		{"wrong context", func() error {
			_, err := keys.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: enc.GetCiphertext(), EncryptionContext: map[string]string{"tenant": "evil"}})
			return err
		}, codes.InvalidArgument},
		{"tampered", func() error {
			_, err := keys.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: tampered, EncryptionContext: ec})
			return err
		}, codes.InvalidArgument},
		{"garbage ciphertext", func() error {
			_, err := keys.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: []byte("nope")})
			return err
		}, codes.InvalidArgument},
		{"unknown key", func() error {
			_, err := keys.Encrypt(ctx, &cabinetpb.EncryptRequest{KeyId: "k-aaaaaaaaaaaaaaaaaaaaaaaaaa", Plaintext: []byte("x")})
			return err
		}, codes.NotFound},
		{"missing spec", func() error {
			_, err := keys.CreateKey(ctx, &cabinetpb.CreateKeyRequest{})
			return err
		}, codes.InvalidArgument},
		{"duplicate alias", func() error {
			_, err := keys.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, Alias: "orders"})
			return err
		}, codes.AlreadyExists},
		{"plaintext too large", func() error {
			_, err := keys.Encrypt(ctx, &cabinetpb.EncryptRequest{KeyId: "orders", Plaintext: make([]byte, 64<<10+1)})
			return err
		}, codes.InvalidArgument},
	}
	for _, tc := range cases {
		if err := tc.call(); code(err) != tc.want {
			t.Errorf("%s: got %v, want %v", tc.name, err, tc.want)
		}
	}

	// A stale follower refuses crypto with Unavailable so clients move on.
	e.cluster.mu.Lock()
	e.cluster.readErr = cluster.ErrStale
	e.cluster.mu.Unlock()
	if _, err := keys.Encrypt(ctx, &cabinetpb.EncryptRequest{KeyId: "orders", Plaintext: []byte("x")}); code(err) != codes.Unavailable {
		t.Fatalf("stale node: %v", err)
	}
}

func TestAuthentication(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	// No client certificate: refused everywhere but Join.
	anon := dialTLS(t, e.addr, &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: e.ca.Pool()})
	if _, err := cabinetpb.NewKeyServiceClient(anon).ListKeys(ctx, &cabinetpb.ListKeysRequest{}); code(err) != codes.Unauthenticated {
		t.Fatalf("no cert: %v", err)
	}
	// A certificate from another CA never completes the handshake.
	other, err := tlsutil.NewCA("other", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	foreign := dialTLS(t, e.addr, &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: e.ca.Pool(),
		Certificates: []tls.Certificate{issueClient(t, other, "mallory", tlsutil.RoleAdmin)}})
	if _, err := cabinetpb.NewKeyServiceClient(foreign).ListKeys(ctx, &cabinetpb.ListKeysRequest{}); err == nil {
		t.Fatal("certificate from another CA accepted")
	}
	// Admins may not call node-to-node methods; nodes may.
	if _, err := cabinetpb.NewNodeServiceClient(e.admin).ReadIndex(ctx, &cabinetpb.ReadIndexRequest{}); code(err) != codes.PermissionDenied {
		t.Fatalf("admin calling NodeService: %v", err)
	}
	if _, err := cabinetpb.NewNodeServiceClient(e.node).ReadIndex(ctx, &cabinetpb.ReadIndexRequest{}); err != nil {
		t.Fatalf("node calling NodeService: %v", err)
	}
	// A plain client role gets nothing yet (grants arrive later): default deny.
	plain := dialTLS(t, e.addr, tlsutil.ClientConfig(issueClient(t, e.ca, "svc", tlsutil.RoleClient), e.ca.Pool()))
	if _, err := cabinetpb.NewKeyServiceClient(plain).ListKeys(ctx, &cabinetpb.ListKeysRequest{}); code(err) != codes.PermissionDenied {
		t.Fatalf("plain principal: %v", err)
	}
	// Only admins create join tokens.
	if _, err := cabinetpb.NewOperatorServiceClient(e.node).CreateJoinToken(ctx, &cabinetpb.CreateJoinTokenRequest{}); code(err) != codes.PermissionDenied {
		t.Fatalf("node creating a join token: %v", err)
	}
}

func TestJoinCeremony(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	resp, err := cabinetpb.NewOperatorServiceClient(e.admin).CreateJoinToken(ctx, &cabinetpb.CreateJoinTokenRequest{TtlSeconds: 60})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := cluster.ParseJoinToken(resp.GetToken())
	if err != nil {
		t.Fatal(err)
	}
	if tok.CAFingerprint != e.caFP {
		t.Fatalf("token pins %s, CA is %s", tok.CAFingerprint, e.caFP)
	}
	joinerHSM := hsm.NewMemory()
	pub, err := joinerHSM.EnsureIdentity(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pubDER, _ := x509.MarshalPKIXPublicKey(pub)
	_, csr, err := tlsutil.NewNodeKey("node2")
	if err != nil {
		t.Fatal(err)
	}
	joiner := dialTLS(t, e.addr, tlsutil.PinnedConfig(tok.CAFingerprint, nil))
	req := &cabinetpb.JoinRequest{TokenId: tok.ID, TokenSecret: tok.Secret, NodeId: "node2", ApiAddr: "127.0.0.1:3",
		RaftAddr: "127.0.0.1:4", IdentityPublicKeyDer: pubDER, CsrDer: csr}
	// A joiner of an older release (lower feature level than every
	// member) is refused before its token is used; told why only if its
	// token is valid.
	if _, err := cabinetpb.NewOperatorServiceClient(joiner).Join(ctx, req); code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "feature level 0") {
		t.Fatalf("join of an older release: %v", err)
	}
	bad := proto.Clone(req).(*cabinetpb.JoinRequest)
	bad.TokenSecret = make([]byte, 32)
	if _, err := cabinetpb.NewOperatorServiceClient(joiner).Join(ctx, bad); code(err) != codes.PermissionDenied || strings.Contains(err.Error(), "feature level") {
		t.Fatalf("join of an older release with a wrong secret: %v", err)
	}
	req.FeatureLevel = fsm.FeatureLevel
	out, err := cabinetpb.NewOperatorServiceClient(joiner).Join(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if rec, _ := e.state.Node("node2"); rec.GetFeatureLevel() != fsm.FeatureLevel {
		t.Fatalf("joined node's record = %v, want feature level %d", rec, fsm.FeatureLevel)
	}
	cert, err := x509.ParseCertificate(out.GetNodeCertDer())
	if err != nil || tlsutil.IdentityFromCert(cert).NodeID != "node2" {
		t.Fatalf("node cert: %v %+v", err, tlsutil.IdentityFromCert(cert))
	}
	if len(out.GetKeks()) != 1 {
		t.Fatalf("%d KEKs", len(out.GetKeks()))
	}
	kcv, err := joinerHSM.UnwrapKEK(ctx, 1, out.GetKeks()[0].GetWrapped())
	if err != nil || string(kcv) != string(out.GetKeks()[0].GetCheckValue()) {
		t.Fatalf("unwrap KEK in the joiner's HSM: %v", err)
	}
	// The token is single use: another node cannot reuse it.
	req2 := proto.Clone(req).(*cabinetpb.JoinRequest)
	req2.NodeId = "node3"
	if _, err := cabinetpb.NewOperatorServiceClient(joiner).Join(ctx, req2); code(err) != codes.PermissionDenied {
		t.Fatalf("reused token: %v", err)
	}
	// A wrong secret is refused without saying why.
	req3 := proto.Clone(req).(*cabinetpb.JoinRequest)
	req3.NodeId = "node4"
	req3.TokenSecret = make([]byte, 32)
	if _, err := cabinetpb.NewOperatorServiceClient(joiner).Join(ctx, req3); code(err) != codes.PermissionDenied {
		t.Fatalf("wrong secret: %v", err)
	}
	// An expired token is refused too, and no refused join changed the
	// membership or consumed a token.
	short, err := cabinetpb.NewOperatorServiceClient(e.admin).CreateJoinToken(ctx, &cabinetpb.CreateJoinTokenRequest{TtlSeconds: 1})
	if err != nil {
		t.Fatal(err)
	}
	stok, _ := cluster.ParseJoinToken(short.GetToken())
	nodesBefore := len(e.state.Nodes())
	deadline := short.GetExpiresAt().AsTime()
	for time.Now().Before(deadline.Add(50 * time.Millisecond)) {
		time.Sleep(20 * time.Millisecond) // wait (bounded) for the token to expire
	}
	req5 := proto.Clone(req).(*cabinetpb.JoinRequest)
	req5.NodeId, req5.TokenId, req5.TokenSecret = "node5", stok.ID, stok.Secret
	if _, err := cabinetpb.NewOperatorServiceClient(joiner).Join(ctx, req5); code(err) != codes.PermissionDenied {
		t.Fatalf("expired token: %v", err)
	}
	if got := len(e.state.Nodes()); got != nodesBefore {
		t.Fatalf("refused joins changed the membership: %d -> %d nodes", nodesBefore, got)
	}
	if jt, ok := e.state.JoinToken(stok.ID); !ok || jt.GetUsedByNode() != "" {
		t.Fatalf("expired token consumed: %v", jt)
	}
	// A joiner pinning another CA refuses to talk to this cluster.
	other, _ := tlsutil.NewCA("other", time.Now())
	wrongPin := dialTLS(t, e.addr, tlsutil.PinnedConfig(tlsutil.Fingerprint(other.CertDER), nil))
	if _, err := cabinetpb.NewOperatorServiceClient(wrongPin).Join(ctx, req); err == nil {
		t.Fatal("joiner accepted a cluster whose CA does not match the pin")
	}
}

// A key missing on a node that cannot catch up is "try elsewhere"
// (Unavailable), never NotFound, which clients do not retry.
func TestMissingKeyWithoutLeaderIsUnavailable(t *testing.T) {
	e := newAPIEnv(t)
	e.cluster.mu.Lock()
	e.cluster.readErr = cluster.ErrNoLeader
	e.cluster.mu.Unlock()
	_, err := cabinetpb.NewKeyServiceClient(e.admin).DescribeKey(context.Background(), &cabinetpb.DescribeKeyRequest{KeyId: "k-aaaaaaaaaaaaaaaaaaaaaaaaaa"})
	if code(err) != codes.Unavailable {
		t.Fatalf("got %v, want Unavailable", err)
	}
}
