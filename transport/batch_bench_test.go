package transport

import (
	"context"
	"io"
	"testing"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/keyops"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

// Benchmarks of the crypto handlers as the gRPC server runs them, minus
// gRPC: readiness, key lookup, authorization, keyops, the response
// messages. With BatchEncrypt at 100 x 1 KiB, ns/op / 100 is the per-item
// server CPU that issue 7 compares with the batched Echo.

type benchEnv struct {
	srv   *Server
	keyID string
	admin context.Context
	user  context.Context // a plain principal with an encrypt grant
	hsm   *hsm.Memory
	fc    *fakeCluster
}

func newBenchEnv(tb testing.TB) *benchEnv { return newBenchEnvRand(tb, nil) }

// newBenchEnvRand is newBenchEnv with the engine's random source (salts)
// set; nil means crypto/rand.
func newBenchEnvRand(tb testing.TB, rnd io.Reader) *benchEnv {
	tb.Helper()
	ctx := context.Background()
	h := hsm.NewMemory()
	kcv, err := h.GenerateKEK(ctx, 1)
	if err != nil {
		tb.Fatal(err)
	}
	state := fsm.New(fsm.Config{})
	fc := &fakeCluster{fsm: state}
	cmd, _ := fsm.NewCommand(fsmpb.CommandType_COMMAND_TYPE_INIT_CLUSTER, &fsmpb.InitCluster{
		ClusterId: "c-test", CaCertDer: []byte{1}, CaKey: &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte{1}},
		Kek:       &fsmpb.KEKVersion{Version: 1, CheckValue: kcv, State: fsmpb.KEKState_KEK_STATE_ACTIVE},
		FirstNode: &fsmpb.NodeRecord{NodeId: "node1", ApiAddr: "127.0.0.1:1", RaftAddr: "127.0.0.1:2", IdentityPublicKeyDer: []byte{1}, FeatureLevel: fsm.FeatureLevel},
	}, "init", "admin:init")
	if res, err := fc.Propose(ctx, cmd); err != nil || res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
		tb.Fatalf("init: %v %v", res, err)
	}
	engine, err := keyops.New(keyops.Config{Sealer: h, Rand: rnd})
	if err != nil {
		tb.Fatal(err)
	}
	srv := NewServer(Config{NodeID: "node1", Cluster: fc, State: state, Crypto: engine, HSM: h, Version: "test"})
	admin := context.WithValue(ctx, identityKey{}, tlsutil.Identity{Name: "alice", Role: roleAdmin})
	k, err := srv.CreateKey(admin, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256})
	if err != nil {
		tb.Fatal(err)
	}
	id := k.GetKey().GetKeyId()
	if _, err := srv.CreateGrant(admin, &cabinetpb.CreateGrantRequest{KeyId: id, Principal: "bob", Operations: []string{"encrypt", "decrypt"}}); err != nil {
		tb.Fatal(err)
	}
	user := context.WithValue(ctx, identityKey{}, tlsutil.Identity{Name: "bob", Role: roleClient})
	return &benchEnv{srv: srv, keyID: id, admin: admin, user: user, hsm: h, fc: fc}
}

// withNote adds the audit note the interceptor would add per request.
func withNote(ctx context.Context) context.Context {
	return context.WithValue(ctx, auditNoteKey{}, &auditNote{})
}

func benchBatchRequest(keyID string, n int) *cabinetpb.BatchEncryptRequest {
	req := &cabinetpb.BatchEncryptRequest{}
	for range n {
		req.Items = append(req.Items, &cabinetpb.EncryptRequest{KeyId: keyID, Plaintext: make([]byte, 1024),
			EncryptionContext: map[string]string{"tenant": "acme"}})
	}
	return req
}

func BenchmarkEncryptHandler1KiB(b *testing.B) {
	e := newBenchEnv(b)
	req := benchBatchRequest(e.keyID, 1).Items[0]
	b.SetBytes(1024)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.srv.Encrypt(withNote(e.admin), req); err != nil {
			b.Fatal(err)
		}
	}
}

func benchBatch(b *testing.B, ctx context.Context, parallel bool) {
	e := newBenchEnv(b)
	if ctx == nil {
		ctx = e.admin
	} else {
		ctx = e.user
	}
	req := benchBatchRequest(e.keyID, 100)
	run := func() {
		r, err := e.srv.BatchEncrypt(withNote(ctx), req)
		if err != nil {
			b.Fatal(err)
		}
		if res := r.GetResults(); len(res) != 100 || res[99].GetError() != nil {
			b.Fatalf("batch: %v", res[99].GetError())
		}
	}
	b.SetBytes(100 * 1024)
	b.ReportAllocs()
	if !parallel {
		for b.Loop() {
			run()
		}
		return
	}
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			run()
		}
	})
}

// 100 x 1 KiB items, one key, an admin caller.
func BenchmarkBatchEncrypt100x1KiB(b *testing.B) { benchBatch(b, nil, false) }

// The same from a plain principal (grant checks per item).
func BenchmarkBatchEncrypt100x1KiBGrant(b *testing.B) { benchBatch(b, context.TODO(), false) }

func BenchmarkBatchEncrypt100x1KiBParallel(b *testing.B) { benchBatch(b, nil, true) }
