package fsm

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// t0 is the leader time of most test commands (2023-11-14T22:13:20Z).
const t0 = int64(1_700_000_000_000_000_000)

var secretHash = sha256.Sum256([]byte("join-secret"))

// env is the envelope part of a test command. Zero values mean: format 1,
// the applier's current time, no request id, principal "admin".
type env struct {
	requestID string
	principal string
	at        int64
	ignorable bool
	format    uint32
}

// applier feeds commands to a State with increasing indexes.
type applier struct {
	t     testing.TB
	s     *State
	index uint64
	now   int64
}

func newApplier(t testing.TB) *applier {
	t.Helper()
	return &applier{t: t, s: NewState(), now: t0}
}

// initialised returns an applier whose state went through INIT_CLUSTER.
func initialised(t testing.TB) *applier {
	t.Helper()
	a := newApplier(t)
	a.mustOK(fsmpb.CommandType_COMMAND_TYPE_INIT_CLUSTER, initPayload())
	return a
}

func (a *applier) command(typ fsmpb.CommandType, payload proto.Message, e env) *fsmpb.Command {
	a.t.Helper()
	cmd, err := NewCommand(typ, payload, e.requestID, e.principal)
	if err != nil {
		a.t.Fatalf("NewCommand: %v", err)
	}
	if cmd.Principal == "" {
		cmd.Principal = "admin"
	}
	cmd.LeaderTimeUnixNano = a.now
	if e.at != 0 {
		cmd.LeaderTimeUnixNano = e.at
	}
	cmd.Ignorable = e.ignorable
	if e.format != 0 {
		cmd.Format = e.format
	}
	return cmd
}

func (a *applier) apply(typ fsmpb.CommandType, payload proto.Message, e env) *fsmpb.Result {
	a.t.Helper()
	return a.applyCmd(a.command(typ, payload, e))
}

func (a *applier) applyCmd(cmd *fsmpb.Command) *fsmpb.Result {
	a.t.Helper()
	a.index++
	res := a.s.Apply(a.index, cmd)
	if res == nil {
		a.t.Fatalf("Apply returned a nil Result")
	}
	return res
}

func (a *applier) mustOK(typ fsmpb.CommandType, payload proto.Message) *fsmpb.Result {
	a.t.Helper()
	res := a.apply(typ, payload, env{})
	if res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
		a.t.Fatalf("%s: got %s %q, want OK", typ, res.GetCode(), res.GetMessage())
	}
	return res
}

func nodeRecord(id string) *fsmpb.NodeRecord {
	return &fsmpb.NodeRecord{
		NodeId:               id,
		RaftAddr:             id + ".raft:7000",
		ApiAddr:              id + ".api:8443",
		IdentityPublicKeyDer: []byte("identity-pub-" + id),
		Region:               "eu-west",
		Voter:                true,
	}
}

func initPayload() *fsmpb.InitCluster {
	return &fsmpb.InitCluster{
		ClusterId: "c-test",
		CaCertDer: []byte("ca-cert-der"),
		CaKey:     &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte("wrapped-ca-key")},
		Kek:       &fsmpb.KEKVersion{Version: 1, CheckValue: []byte{1, 2, 3, 4}},
		FirstNode: nodeRecord("n1"),
	}
}

// keyID returns a valid key id for n.
func keyID(n int) string { return fmt.Sprintf("k-%026d", n) }

func createKeyPayload(id string) *fsmpb.CreateKey {
	return &fsmpb.CreateKey{
		KeyId:    id,
		Spec:     fsmpb.KeySpec_KEY_SPEC_AES_256,
		Material: &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte("wrapped-material-" + id)},
	}
}

// publicKeyFor returns a stand-in public key for asymmetric specs, nil for
// symmetric ones (the FSM does not parse DER).
func publicKeyFor(spec fsmpb.KeySpec) []byte {
	if keySpecRules[spec].asymmetric {
		return []byte("public-key-der-" + spec.String())
	}
	return nil
}

func joinTokenPayload(id string, expires int64) *fsmpb.CreateJoinToken {
	return &fsmpb.CreateJoinToken{TokenId: id, SecretHash: secretHash[:], ExpiresUnixNano: expires}
}

func admitPayload(tokenID, nodeID string) *fsmpb.AdmitNode {
	return &fsmpb.AdmitNode{TokenId: tokenID, SecretHash: secretHash[:], Node: nodeRecord(nodeID)}
}

// with returns a copy of m changed by fn, so table rows can tweak a fixture.
func with[M proto.Message](m M, fn func(M)) M {
	c := proto.CloneOf(m)
	fn(c)
	return c
}

func checkResult(t testing.TB, res *fsmpb.Result, code fsmpb.ResultCode, msg string) {
	t.Helper()
	if res.GetCode() != code || !strings.Contains(res.GetMessage(), msg) {
		t.Fatalf("got %s %q, want %s containing %q", res.GetCode(), res.GetMessage(), code, msg)
	}
}

func sha256Sum(b []byte) [32]byte { return sha256.Sum256(b) }

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		<-tick.C
	}
}

// logOf builds a raft command entry.
func logOf(t testing.TB, index uint64, cmd *fsmpb.Command) *raft.Log {
	t.Helper()
	data, err := EncodeCommand(cmd)
	if err != nil {
		t.Fatalf("EncodeCommand: %v", err)
	}
	return &raft.Log{Index: index, Term: 1, Type: raft.LogCommand, Data: data}
}

// memSink is an in-memory raft.SnapshotSink.
type memSink struct {
	bytes.Buffer
	mu        sync.Mutex
	closed    bool
	cancelled bool
}

func (s *memSink) ID() string { return "mem" }
func (s *memSink) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	return nil
}
func (s *memSink) Cancel() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cancelled = true
	return nil
}

// snapshotBytes snapshots f through the raft.FSM interface.
func snapshotBytes(t testing.TB, f *FSM) []byte {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	defer snap.Release()
	sink := &memSink{}
	if err := snap.Persist(sink); err != nil {
		t.Fatalf("Persist: %v", err)
	}
	if !sink.closed || sink.cancelled {
		t.Fatalf("Persist left sink closed=%v cancelled=%v", sink.closed, sink.cancelled)
	}
	return sink.Bytes()
}
