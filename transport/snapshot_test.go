package transport

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"io"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

// TestRecoveryExport: admins get every active KEK wrapped under a >= 4096-bit
// recovery key, which unwraps (with the private key) to the cluster's check
// value; smaller keys, garbage and non-admins are refused.
func TestRecoveryExport(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	ops := cabinetpb.NewOperatorServiceClient(e.admin)

	small, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	smallDER, _ := x509.MarshalPKIXPublicKey(&small.PublicKey)
	for name, der := range map[string][]byte{"2048-bit": smallDER, "garbage": []byte("nope")} {
		if _, err := ops.RecoveryExport(ctx, &cabinetpb.RecoveryExportRequest{RecoveryPublicKeyDer: der}); code(err) != codes.InvalidArgument {
			t.Errorf("%s recovery key: %v, want InvalidArgument", name, err)
		}
	}

	rk, err := rsa.GenerateKey(rand.Reader, MinRecoveryKeyBits)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&rk.PublicKey)
	b, err := ops.RecoveryExport(ctx, &cabinetpb.RecoveryExportRequest{RecoveryPublicKeyDer: der})
	if err != nil {
		t.Fatalf("RecoveryExport: %v", err)
	}
	fp := sha256.Sum256(der)
	ci := e.state.Cluster()
	if b.GetFormat() != RecoveryBundleFormat || b.GetClusterId() != ci.GetClusterId() || b.GetCurrentKekVersion() != 1 ||
		b.GetRecoveryKeyFingerprint() != hex.EncodeToString(fp[:]) || b.GetOaepHash() != "sha1" || len(b.GetKeks()) != 1 {
		t.Fatalf("bundle: %+v", b)
	}
	pkcs8, _ := x509.MarshalPKCS8PrivateKey(rk)
	fresh := hsm.NewMemory()
	kcv, err := fresh.UnwrapKEKWithRecoveryKey(ctx, 1, pkcs8, b.GetKeks()[0].GetWrapped())
	if err != nil || string(kcv) != string(ci.GetKekVersions()[0].GetCheckValue()) || string(kcv) != string(b.GetKeks()[0].GetCheckValue()) {
		t.Fatalf("unwrap the exported KEK: %x %v", kcv, err)
	}

	// Admin only: operators, clients and nodes are refused.
	for _, role := range []string{tlsutil.RoleOperator, tlsutil.RoleClient} {
		conn := dialTLS(t, e.addr, tlsutil.ClientConfig(issueClient(t, e.ca, "mallory", role), e.ca.Pool()))
		if _, err := cabinetpb.NewOperatorServiceClient(conn).RecoveryExport(ctx, &cabinetpb.RecoveryExportRequest{RecoveryPublicKeyDer: der}); code(err) != codes.PermissionDenied {
			t.Errorf("%s: %v, want PermissionDenied", role, err)
		}
		stream, err := cabinetpb.NewOperatorServiceClient(conn).SnapshotSave(ctx, &cabinetpb.SnapshotSaveRequest{})
		if err == nil {
			_, err = stream.Recv()
		}
		if code(err) != codes.PermissionDenied {
			t.Errorf("%s SnapshotSave: %v, want PermissionDenied", role, err)
		}
	}
	if _, err := cabinetpb.NewOperatorServiceClient(e.node).RecoveryExport(ctx, &cabinetpb.RecoveryExportRequest{RecoveryPublicKeyDer: der}); code(err) != codes.PermissionDenied {
		t.Errorf("node: %v, want PermissionDenied", err)
	}
}

// chunkStream feeds receiveSnapshot.
type chunkStream struct {
	grpc.ServerStream
	chunks []*cabinetpb.SnapshotChunk
}

func (c *chunkStream) Recv() (*cabinetpb.SnapshotChunk, error) {
	if len(c.chunks) == 0 {
		return nil, io.EOF
	}
	ch := c.chunks[0]
	c.chunks = c.chunks[1:]
	return ch, nil
}
func (c *chunkStream) SendAndClose(*cabinetpb.SnapshotRestoreResponse) error { return nil }

// TestReceiveSnapshotFraming: meta first, size and SHA-256 as announced.
func TestReceiveSnapshotFraming(t *testing.T) {
	data := []byte(strings.Repeat("x", 3*snapshotChunkSize/2))
	var good []*cabinetpb.SnapshotChunk
	meta := &cabinetpb.SnapshotMeta{Index: 5, Term: 2, Size: uint64(len(data))}
	if err := sendSnapshot(func(c *cabinetpb.SnapshotChunk) error { good = append(good, c); return nil }, meta, data); err != nil {
		t.Fatal(err)
	}
	if len(good) != 2 {
		t.Fatalf("%d chunks", len(good))
	}
	m, got, err := receiveSnapshot(&chunkStream{chunks: good})
	if err != nil || string(got) != string(data) || m.GetIndex() != 5 {
		t.Fatalf("round trip: %v", err)
	}
	clone := func() []*cabinetpb.SnapshotChunk {
		var out []*cabinetpb.SnapshotChunk
		for _, c := range good {
			cc := &cabinetpb.SnapshotChunk{Data: append([]byte(nil), c.GetData()...), Meta: c.GetMeta(), Sha256: c.GetSha256()}
			out = append(out, cc)
		}
		return out
	}
	cases := map[string]func([]*cabinetpb.SnapshotChunk) []*cabinetpb.SnapshotChunk{
		"empty":        func([]*cabinetpb.SnapshotChunk) []*cabinetpb.SnapshotChunk { return nil },
		"no meta":      func(c []*cabinetpb.SnapshotChunk) []*cabinetpb.SnapshotChunk { c[0].Meta = nil; return c },
		"meta twice":   func(c []*cabinetpb.SnapshotChunk) []*cabinetpb.SnapshotChunk { c[1].Meta = meta; return c },
		"truncated":    func(c []*cabinetpb.SnapshotChunk) []*cabinetpb.SnapshotChunk { c[1].Data = c[1].Data[1:]; return c },
		"flipped byte": func(c []*cabinetpb.SnapshotChunk) []*cabinetpb.SnapshotChunk { c[1].Data[3] ^= 1; return c },
		"no checksum":  func(c []*cabinetpb.SnapshotChunk) []*cabinetpb.SnapshotChunk { c[1].Sha256 = ""; return c },
		"after checksum": func(c []*cabinetpb.SnapshotChunk) []*cabinetpb.SnapshotChunk {
			return append(c, &cabinetpb.SnapshotChunk{Data: []byte("x")})
		},
	}
	for name, mutate := range cases {
		if _, _, err := receiveSnapshot(&chunkStream{chunks: mutate(clone())}); code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v, want InvalidArgument", name, err)
		}
	}
}

// snapFakeCluster adds snapshots to fakeCluster: OpenSnapshot writes the
// FSM's state, RestoreSnapshot restores the FSM.
type snapFakeCluster struct {
	*fakeCluster
	restored []byte
}

func (f *snapFakeCluster) OpenSnapshot(context.Context) (cluster.SnapshotInfo, io.ReadCloser, error) {
	var buf bytes.Buffer
	if err := fsm.WriteSnapshot(&buf, f.fsm.StateProto()); err != nil {
		return cluster.SnapshotInfo{}, nil, err
	}
	return cluster.SnapshotInfo{Index: f.index, Term: 1, Size: int64(buf.Len())}, io.NopCloser(&buf), nil
}

func (f *snapFakeCluster) RestoreSnapshot(_ context.Context, data []byte) (uint64, error) {
	f.restored = data
	if err := f.fsm.Restore(io.NopCloser(bytes.NewReader(data))); err != nil {
		return 0, err
	}
	return f.index + 1, nil
}

type saveStream struct {
	grpc.ServerStream
	chunks []*cabinetpb.SnapshotChunk
}

func (s *saveStream) Context() context.Context { return context.Background() }
func (s *saveStream) Send(c *cabinetpb.SnapshotChunk) error {
	s.chunks = append(s.chunks, &cabinetpb.SnapshotChunk{Data: bytes.Clone(c.GetData()), Meta: c.GetMeta(), Sha256: c.GetSha256()})
	return nil
}

type restoreStream struct {
	chunkStream
	resp *cabinetpb.SnapshotRestoreResponse
}

func (s *restoreStream) Context() context.Context { return context.Background() }
func (s *restoreStream) SendAndClose(r *cabinetpb.SnapshotRestoreResponse) error {
	s.resp = r
	return nil
}

// TestSnapshotHandlers: save streams the leader's state in chunk framing;
// restore puts it back (keeping the running members), and refuses a snapshot
// of another cluster or one whose KEK this HSM does not hold.
func TestSnapshotHandlers(t *testing.T) {
	ctx := context.Background()
	h := hsm.NewMemory()
	kcv, err := h.GenerateKEK(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	state := fsm.New(fsm.Config{})
	fc := &snapFakeCluster{fakeCluster: &fakeCluster{fsm: state}}
	propose := func(typ fsmpb.CommandType, payload proto.Message) {
		t.Helper()
		cmd, _ := fsm.NewCommand(typ, payload, "", "admin:test")
		if res, err := fc.Propose(ctx, cmd); err != nil || res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
			t.Fatalf("%v: %v %v", typ, res, err)
		}
	}
	propose(fsmpb.CommandType_COMMAND_TYPE_INIT_CLUSTER, &fsmpb.InitCluster{
		ClusterId: "c-test", CaCertDer: []byte("ca"), CaKey: &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte("sealed")},
		Kek:       &fsmpb.KEKVersion{Version: 1, CheckValue: kcv, State: fsmpb.KEKState_KEK_STATE_ACTIVE},
		FirstNode: &fsmpb.NodeRecord{NodeId: "node1", ApiAddr: "127.0.0.1:1", RaftAddr: "127.0.0.1:2", IdentityPublicKeyDer: []byte{1}},
	})
	key := func(id string) *fsmpb.CreateKey {
		return &fsmpb.CreateKey{KeyId: id, Spec: fsmpb.KeySpec_KEY_SPEC_AES_256, Material: &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte("m")}}
	}
	propose(fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, key("k-aaaaaaaaaaaaaaaaaaaaaaaaaa"))
	srv := NewServer(Config{NodeID: "node1", Cluster: fc, State: state, HSM: h})

	save := &saveStream{}
	if err := srv.SnapshotSave(&cabinetpb.SnapshotSaveRequest{}, save); err != nil {
		t.Fatalf("SnapshotSave: %v", err)
	}
	if save.chunks[0].GetMeta().GetClusterId() != "c-test" || save.chunks[len(save.chunks)-1].GetSha256() == "" {
		t.Fatalf("framing: %+v", save.chunks[0].GetMeta())
	}
	_, data, err := receiveSnapshot(&chunkStream{chunks: save.chunks})
	if err != nil {
		t.Fatal(err)
	}
	propose(fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, key("k-bbbbbbbbbbbbbbbbbbbbbbbbbb"))

	restore := func(d []byte) (*cabinetpb.SnapshotRestoreResponse, error) {
		var chunks []*cabinetpb.SnapshotChunk
		_ = sendSnapshot(func(c *cabinetpb.SnapshotChunk) error { chunks = append(chunks, c); return nil },
			&cabinetpb.SnapshotMeta{Index: 9, Term: 1, Size: uint64(len(d))}, d)
		rs := &restoreStream{chunkStream: chunkStream{chunks: chunks}}
		err := srv.SnapshotRestore(rs)
		return rs.resp, err
	}
	mutated := func(mut func(*fsmpb.State)) []byte {
		st, err := fsm.ReadSnapshot(bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		mut(st)
		var buf bytes.Buffer
		if err := fsm.WriteSnapshot(&buf, st); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	other := mutated(func(st *fsmpb.State) { st.Cluster.ClusterId = "c-other" })
	wrongKEK := mutated(func(st *fsmpb.State) { st.Cluster.KekVersions[0].CheckValue = []byte("0123456789abcdef") })
	corrupt := bytes.Clone(data)
	corrupt[len(corrupt)-1] ^= 1
	for name, tc := range map[string]struct {
		data []byte
		code codes.Code
		msg  string
	}{
		"other cluster": {other, codes.FailedPrecondition, "recovery restore"},
		"other KEK":     {wrongKEK, codes.FailedPrecondition, "KEK version"},
		"corrupt":       {corrupt, codes.InvalidArgument, "corrupt snapshot"},
	} {
		if _, err := restore(tc.data); code(err) != tc.code || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("%s: %v, want %v mentioning %q", name, err, tc.code, tc.msg)
		}
	}
	if fc.restored != nil {
		t.Fatal("a refused snapshot reached the cluster")
	}
	resp, err := restore(data)
	if err != nil || resp.GetKeys() != 1 {
		t.Fatalf("restore: %v %v", resp, err)
	}
	if _, ok := state.Key("k-bbbbbbbbbbbbbbbbbbbbbbbbbb"); ok {
		t.Fatal("key created after the snapshot survived the restore")
	}
	if _, ok := state.Key("k-aaaaaaaaaaaaaaaaaaaaaaaaaa"); !ok {
		t.Fatal("key in the snapshot missing after the restore")
	}
	if n := state.Nodes(); len(n) != 1 || n[0].GetNodeId() != "node1" {
		t.Fatalf("nodes after restore: %v", n)
	}
}
