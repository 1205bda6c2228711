package transport

import (
	"context"
	"crypto/sha256"
	"errors"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

func (e *apiEnv) propose(t *testing.T, typ fsmpb.CommandType, payload proto.Message) *fsmpb.Result {
	t.Helper()
	cmd, err := fsm.NewCommand(typ, payload, "", "admin:test")
	if err != nil {
		t.Fatal(err)
	}
	res, err := e.cluster.Propose(context.Background(), cmd)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// TestRotateKEKSingleNode drives a whole rotation through the API and the
// two loops by hand: RotateKEK -> (leader) activate -> re-wrap the CA key
// and a key's material -> retire -> (node) destroy v1 in the HSM -> DESTROYED;
// the key still decrypts what it encrypted before.
func TestRotateKEKSingleNode(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	keys := cabinetpb.NewKeyServiceClient(e.admin)
	ops := cabinetpb.NewOperatorServiceClient(e.admin)
	k, err := keys.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256})
	if err != nil {
		t.Fatal(err)
	}
	enc, err := keys.Encrypt(ctx, &cabinetpb.EncryptRequest{KeyId: k.GetKey().GetKeyId(), Plaintext: []byte("before")})
	if err != nil {
		t.Fatal(err)
	}
	st, err := ops.RotateKEK(ctx, &cabinetpb.RotateKEKRequest{RequestId: "r1"})
	if err != nil || st.GetPhase() != "distributing" {
		t.Fatalf("RotateKEK: %v %v", st, err)
	}
	srv := e.server
	srv.ProposeKEKWork(ctx) // every member (node1, the generator) holds v2: activate
	srv.ProposeKEKWork(ctx) // re-wrap CA key + material, retire v1
	if ci := e.state.Cluster(); ci.GetCurrentKekVersion() != 2 || ci.GetCaKey().GetKekVersion() != 2 {
		t.Fatalf("after the leader steps: current %d, CA key under %d", ci.GetCurrentKekVersion(), ci.GetCaKey().GetKekVersion())
	}
	srv.KEKNodeStep(ctx) // destroy v1 here, report
	st, err = ops.KEKStatus(ctx, &cabinetpb.KEKStatusRequest{})
	if err != nil || !st.GetDone() || st.GetVersions()[0].GetState() != "DESTROYED" || st.GetVersions()[1].GetSealedBlobs() != 2 {
		t.Fatalf("status after the rotation: %v %v", st, err)
	}
	if _, err := e.hsm.KEKCheckValue(ctx, 1); !errors.Is(err, hsm.ErrKEKNotFound) {
		t.Fatalf("KEK v1 still in the HSM: %v", err)
	}
	dec, err := keys.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: enc.GetCiphertext()})
	if err != nil || string(dec.GetPlaintext()) != "before" {
		t.Fatalf("decrypt after the rotation: %q %v", dec.GetPlaintext(), err)
	}
	if _, err := ops.RotateKEK(ctx, &cabinetpb.RotateKEKRequest{RequestId: "r2"}); err != nil {
		t.Fatalf("a second rotation after the first finished: %v", err)
	}
}

// TestKEKAbandonsUnreachablePending: a PENDING version no member holds or
// has a delivery of (as after a restore into other nodes) is abandoned by
// the leader, and a new rotation can start.
func TestKEKAbandonsUnreachablePending(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	secret := sha256.Sum256([]byte("s"))
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_CREATE_JOIN_TOKEN, &fsmpb.CreateJoinToken{TokenId: "jt-ghost", SecretHash: secret[:], ExpiresUnixNano: time.Now().Add(time.Hour).UnixNano()})
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_ADMIT_NODE, &fsmpb.AdmitNode{TokenId: "jt-ghost", SecretHash: secret[:],
		Node: &fsmpb.NodeRecord{NodeId: "ghost", RaftAddr: "127.0.0.1:9", IdentityPublicKeyDer: []byte{2}}})
	if res := e.propose(t, fsmpb.CommandType_COMMAND_TYPE_BEGIN_KEK_ROTATION, &fsmpb.BeginKEKRotation{Kek: &fsmpb.KEKVersion{
		Version: 2, CheckValue: []byte("ghost-kcv"), GeneratedBy: "ghost"}}); res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
		t.Fatalf("begin: %v", res)
	}
	e.propose(t, fsmpb.CommandType_COMMAND_TYPE_REMOVE_NODE, &fsmpb.RemoveNode{NodeId: "ghost"})
	e.server.ProposeKEKWork(ctx)
	if k := e.state.Cluster().GetKekVersions()[1]; k.GetState() != fsmpb.KEKState_KEK_STATE_RETIRED {
		t.Fatalf("unreachable pending version: %v", k)
	}
	e.server.KEKNodeStep(ctx)
	if k := e.state.Cluster().GetKekVersions()[1]; k.GetState() != fsmpb.KEKState_KEK_STATE_DESTROYED {
		t.Fatalf("after node1 reported its removal: %v", k)
	}
	st, err := cabinetpb.NewOperatorServiceClient(e.admin).RotateKEK(ctx, &cabinetpb.RotateKEKRequest{RequestId: "again"})
	if err != nil || st.GetVersions()[2].GetVersion() != 3 {
		t.Fatalf("a new rotation after the abandoned one: %v %v", st, err)
	}
}
