package fsm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// populated returns an FSM holding every kind of record.
func populated(t *testing.T) *FSM {
	t.Helper()
	f := New(Config{})
	a := newApplier(t)
	var index uint64
	apply := func(typ fsmpb.CommandType, payload proto.Message, e env) {
		t.Helper()
		index++
		res := f.Apply(logOf(t, index, a.command(typ, payload, e)))
		if r, ok := res.(*fsmpb.Result); !ok || r.GetCode() != codeOK {
			t.Fatalf("apply %s: %v", typ, res)
		}
	}
	apply(typInit, initPayload(), env{requestID: "init"})
	for _, n := range []int{4, 2, 8, 6} {
		p := createKeyPayload(keyID(n))
		if n%4 == 0 {
			p.Alias = "alias-" + strings.Repeat("x", n)
			p.Tags = map[string]string{"b": "2", "a": "1", "c": "3"}
		}
		apply(typCreate, p, env{requestID: "create-" + keyID(n)})
	}
	apply(typToken, joinTokenPayload("tok-b", t0+int64(time.Hour)), env{})
	apply(typToken, joinTokenPayload("tok-a", t0+int64(time.Hour)), env{})
	apply(typAdmit, admitPayload("tok-b", "n3"), env{})
	apply(typAdmit, admitPayload("tok-a", "n2"), env{requestID: "admit"})
	// Lifecycle records: a rotated key, a used and an unused import token.
	apply(typRotate, rotatePayload(keyID(2), 2), env{})
	apply(typImportToken, importTokenPayload("it-zzzzzzzz", t0+int64(time.Hour)), env{})
	apply(typImportToken, importTokenPayload("it-aaaaaaaa", t0+int64(time.Hour)), env{})
	apply(typImport, importPayload("it-zzzzzzzz", keyID(10)), env{})
	// Authorization: grants (one with a context constraint) and denied
	// principals, added out of order.
	apply(typCreateGrant, grantPayload(grantID(3), keyID(4), "bob", opDecrypt), env{principal: "admin:alice"})
	apply(typCreateGrant, with(grantPayload(grantID(1), keyID(2), "carol"), func(p *fsmpb.CreateGrant) {
		p.Grant.EncryptionContextEquals = map[string]string{"tenant": "acme", "env": "prod"}
	}), env{})
	apply(typCreateGrant, grantPayload(grantID(2), keyID(4), "bob", opEncrypt), env{})
	apply(typDeny, &fsmpb.DenyPrincipal{Principal: "zed", Reason: "left"}, env{})
	apply(typDeny, &fsmpb.DenyPrincipal{Principal: "amy"}, env{})
	return f
}

func TestSnapshotRoundTrip(t *testing.T) {
	f := populated(t)
	data := snapshotBytes(t, f)

	g := New(Config{})
	restored := 0
	g.OnRestore(func() { restored++ })
	if err := g.Restore(io.NopCloser(bytes.NewReader(data))); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	if restored != 1 {
		t.Fatalf("OnRestore called %d times", restored)
	}
	if f.Digest() != g.Digest() {
		t.Fatalf("digests differ after restore")
	}
	if !proto.Equal(f.StateProto(), g.StateProto()) {
		t.Fatalf("states differ after restore")
	}
	// The digest is the snapshot's own checksum.
	d := f.Digest()
	if !bytes.Equal(data[len(data)-32:], d[:]) {
		t.Fatalf("digest is not the snapshot checksum")
	}
	// Snapshotting the restored state gives the same bytes.
	if !bytes.Equal(data, snapshotBytes(t, g)) {
		t.Fatalf("snapshot of the restored state differs")
	}
	// Reads agree, including the alias index.
	for _, q := range []string{keyID(4), "alias-xxxx", keyID(2), "nope"} {
		a, aok := f.Key(q)
		b, bok := g.Key(q)
		if aok != bok || !proto.Equal(a, b) {
			t.Fatalf("Key(%q) differs: %v %v", q, a, b)
		}
	}
	if f.KeyCount() != 5 || g.KeyCount() != 5 {
		t.Fatalf("key counts %d %d", f.KeyCount(), g.KeyCount())
	}
	if len(g.Nodes()) != 3 || g.Cluster().GetClusterId() != "c-test" {
		t.Fatalf("nodes %v cluster %v", g.Nodes(), g.Cluster())
	}
	if tok, ok := g.JoinToken("tok-a"); !ok || tok.GetUsedByNode() != "n2" {
		t.Fatalf("join token %v", tok)
	}
	if tok, ok := g.ImportToken("it-zzzzzzzz"); !ok || tok.GetUsedByKey() != keyID(10) || tok.GetPrivateKey() != nil {
		t.Fatalf("import token %v", tok)
	}
	if tok, ok := g.ImportToken("it-aaaaaaaa"); !ok || tok.GetPrivateKey() == nil {
		t.Fatalf("import token %v", tok)
	}
	// Grants and the deny list, with their rebuilt indexes.
	sameGrants := func(x, y []*fsmpb.Grant) bool {
		return slices.EqualFunc(x, y, func(a, b *fsmpb.Grant) bool { return proto.Equal(a, b) })
	}
	for _, q := range [][2]string{{"", ""}, {keyID(4), ""}, {"", "bob"}, {keyID(4), "bob"}, {keyID(2), "carol"}, {keyID(2), "bob"}} {
		if !sameGrants(f.Grants(q[0], q[1]), g.Grants(q[0], q[1])) || !sameGrants(f.GrantsFor(q[0], q[1]), g.GrantsFor(q[0], q[1])) {
			t.Fatalf("grants for %v differ after restore", q)
		}
	}
	if got := grantIDs(g.GrantsFor(keyID(4), "bob")); got != "2,3" {
		t.Fatalf("GrantsFor after restore = %s", got)
	}
	if gr, ok := g.Grant(grantID(1)); !ok || gr.GetEncryptionContextEquals()["tenant"] != "acme" {
		t.Fatalf("grant 1 after restore = %v", gr)
	}
	if d, ok := g.Denied("zed"); !ok || d.GetReason() != "left" || len(g.DeniedPrincipals()) != 2 {
		t.Fatalf("deny list after restore: %v %v", d, g.DeniedPrincipals())
	}
	// Request records survive: a retry after restore returns the first result.
	a := newApplier(t)
	res := g.Apply(logOf(t, 100, a.command(typCreate, createKeyPayload(keyID(99)), env{requestID: "create-" + keyID(2)})))
	if r := res.(*fsmpb.Result); r.GetKey().GetKeyId() != keyID(2) || g.KeyCount() != 5 {
		t.Fatalf("retry after restore: %v", r)
	}
}

func TestToProtoIsSorted(t *testing.T) {
	st := populated(t).StateProto()
	var ids []string
	for _, k := range st.GetKeys() {
		ids = append(ids, k.GetKeyId())
	}
	var importIDs []string
	for _, it := range st.GetImportTokens() {
		importIDs = append(importIDs, it.GetTokenId())
	}
	var grantIDs, denied []string
	for _, g := range st.GetGrants() {
		grantIDs = append(grantIDs, g.GetGrantId())
	}
	for _, d := range st.GetDeniedPrincipals() {
		denied = append(denied, d.GetPrincipal())
	}
	if len(grantIDs) != 3 || len(denied) != 2 {
		t.Fatalf("grants %v denied %v", grantIDs, denied)
	}
	for _, list := range [][]string{ids, nodeIDs(st), tokenIDs(st), requestIDs(st), importIDs, grantIDs, denied} {
		for i := 1; i < len(list); i++ {
			if list[i-1] >= list[i] {
				t.Fatalf("not sorted: %v", list)
			}
		}
	}
	if len(importIDs) != 2 {
		t.Fatalf("import tokens %v", importIDs)
	}
	if len(ids) != 5 || len(nodeIDs(st)) != 3 || len(tokenIDs(st)) != 2 || len(requestIDs(st)) != 6 {
		t.Fatalf("unexpected sizes: %v %v %v %v", ids, nodeIDs(st), tokenIDs(st), requestIDs(st))
	}
}

func nodeIDs(st *fsmpb.State) (out []string) {
	for _, n := range st.GetNodes() {
		out = append(out, n.GetNodeId())
	}
	return out
}

func tokenIDs(st *fsmpb.State) (out []string) {
	for _, n := range st.GetJoinTokens() {
		out = append(out, n.GetTokenId())
	}
	return out
}

func requestIDs(st *fsmpb.State) (out []string) {
	for _, n := range st.GetRequests() {
		out = append(out, n.GetRequestId())
	}
	return out
}

// A snapshot captures the state at Snapshot(), even if commands are applied
// before Persist runs.
func TestSnapshotIsPointInTime(t *testing.T) {
	f := populated(t)
	want := f.Digest()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	a := newApplier(t)
	f.Apply(logOf(t, 50, a.command(typCreate, createKeyPayload(keyID(50)), env{requestID: "late"})))
	f.Apply(logOf(t, 51, a.command(typRemove, &fsmpb.RemoveNode{NodeId: "n2"}, env{})))
	sink := &memSink{}
	if err := snap.Persist(sink); err != nil {
		t.Fatal(err)
	}
	st, err := ReadSnapshot(bytes.NewReader(sink.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := MarshalState(st)
	if got := sha256Sum(b); got != want {
		t.Fatalf("snapshot does not hold the state at Snapshot()")
	}
	if f.Digest() == want {
		t.Fatalf("later applies did not change the live state")
	}
}

func TestCorruptSnapshotRejected(t *testing.T) {
	f := populated(t)
	good := snapshotBytes(t, f)
	stateLen := len(good) - 16 - 32
	flip := func(i int) []byte {
		b := bytes.Clone(good)
		b[i] ^= 0x01
		return b
	}
	cases := []struct {
		name string
		data []byte
		msg  string
	}{
		{"empty", nil, "truncated: header"},
		{"bad magic", flip(0), "bad magic"},
		{"newer format", append([]byte("CBSNAP2\n"), good[8:]...), "bad magic"},
		{"length grown", withLength(good, uint64(stateLen+100)), "truncated: header announces"},
		{"length shrunk", withLength(good, uint64(stateLen-1)), "checksum mismatch"},
		{"huge length", withLength(good, 1<<62), "exceeds the limit"},
		{"flipped state byte", flip(16 + stateLen/2), "checksum mismatch"},
		{"flipped checksum byte", flip(len(good) - 1), "checksum mismatch"},
		{"truncated in header", good[:10], "truncated: header"},
		{"truncated in state", good[:16+stateLen/2], "truncated: header announces"},
		{"truncated in checksum", good[:len(good)-5], "truncated: checksum"},
		{"trailing byte", append(bytes.Clone(good), 0), "unexpected data after the checksum"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ReadSnapshot(bytes.NewReader(tc.data))
			if !errors.Is(err, ErrCorruptSnapshot) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("ReadSnapshot error = %v, want ErrCorruptSnapshot containing %q", err, tc.msg)
			}
			// Restore into a live FSM keeps the old state.
			g := populated(t)
			before := g.Digest()
			restored := false
			g.OnRestore(func() { restored = true })
			if err := g.Restore(io.NopCloser(bytes.NewReader(tc.data))); !errors.Is(err, ErrCorruptSnapshot) {
				t.Fatalf("Restore error = %v", err)
			}
			if g.Digest() != before || restored {
				t.Fatalf("failed restore changed the state")
			}
			if _, ok := g.Key(keyID(4)); !ok {
				t.Fatalf("key lost after failed restore")
			}
		})
	}
}

func withLength(snap []byte, n uint64) []byte {
	b := bytes.Clone(snap)
	binary.BigEndian.PutUint64(b[8:16], n)
	return b
}

type failingReader struct{}

func (failingReader) Read([]byte) (int, error) { return 0, errors.New("disk on fire") }

func TestReadSnapshotIOError(t *testing.T) {
	_, err := ReadSnapshot(failingReader{})
	if err == nil || errors.Is(err, ErrCorruptSnapshot) || !strings.Contains(err.Error(), "disk on fire") {
		t.Fatalf("err = %v, want the I/O error", err)
	}
}

// A snapshot with a valid checksum but an inconsistent state is refused by
// StateFromProto, and Restore keeps the old state.
func TestStateFromProtoValidation(t *testing.T) {
	base := populated(t).StateProto()
	mutate := func(fn func(st *fsmpb.State)) *fsmpb.State {
		st := proto.CloneOf(base)
		fn(st)
		return st
	}
	cases := []struct {
		name string
		st   *fsmpb.State
		msg  string
	}{
		{"nil", nil, "nil"},
		{"format 0", mutate(func(st *fsmpb.State) { st.Format = 0 }), "unsupported format 0"},
		{"format 2", mutate(func(st *fsmpb.State) { st.Format = 2 }), "unsupported format 2"},
		{"cluster without id", mutate(func(st *fsmpb.State) { st.Cluster.ClusterId = "" }), "no cluster id"},
		{"duplicate KEK version", mutate(func(st *fsmpb.State) {
			st.Cluster.KekVersions = append(st.Cluster.KekVersions, st.Cluster.KekVersions[0])
		}), "duplicate KEK version 1"},
		{"nil KEK version", mutate(func(st *fsmpb.State) { st.Cluster.KekVersions = append(st.Cluster.KekVersions, nil) }), "KEK version entry 1"},
		{"nil key", mutate(func(st *fsmpb.State) { st.Keys = append(st.Keys, nil) }), "key entry 5 has no key id"},
		{"versions out of order", mutate(func(st *fsmpb.State) {
			st.Keys[0].Versions = append(st.Keys[0].Versions, proto.CloneOf(st.Keys[0].Versions[0]))
		}), "version entry 2 is missing or out of order"},
		{"nil version", mutate(func(st *fsmpb.State) { st.Keys[0].Versions = append(st.Keys[0].Versions, nil) }), "version entry 2 is missing"},
		{"primary version missing", mutate(func(st *fsmpb.State) { st.Keys[0].PrimaryVersion = 7 }), "primary version 7 is not among its versions"},
		{"destroyed key with material", mutate(func(st *fsmpb.State) { st.Keys[0].State = stDestroyed }), "destroyed version 1 still holds material"},
		{"destroyed version with material", mutate(func(st *fsmpb.State) { st.Keys[0].Versions[0].State = verDestroyed }), "destroyed version 1 still holds material"},
		{"nil import token", mutate(func(st *fsmpb.State) { st.ImportTokens = append(st.ImportTokens, nil) }), "import token entry 2 has no token id"},
		{"malformed import token id", mutate(func(st *fsmpb.State) { st.ImportTokens[0].TokenId = "it-X" }), "import token id \"it-X\" is malformed"},
		{"duplicate import token", mutate(func(st *fsmpb.State) { st.ImportTokens[1].TokenId = st.ImportTokens[0].TokenId }), "duplicate import token id it-aaaaaaaa"},
		{"used import token with private key", mutate(func(st *fsmpb.State) { st.ImportTokens[1].PrivateKey = blob("x") }),
			"import token it-zzzzzzzz was used but still holds its private key"},
		{"key without id", mutate(func(st *fsmpb.State) { st.Keys[1].KeyId = "" }), "key entry 1 has no key id"},
		{"duplicate key id", mutate(func(st *fsmpb.State) { st.Keys[1].KeyId = st.Keys[0].KeyId }), "duplicate key id"},
		{"duplicate alias", mutate(func(st *fsmpb.State) { st.Keys[0].Alias = "same"; st.Keys[1].Alias = "same" }), "alias \"same\" is used by keys"},
		{"alias like a key id", mutate(func(st *fsmpb.State) { st.Keys[0].Alias = "k-x" }), "looks like a key id"},
		{"nil node", mutate(func(st *fsmpb.State) { st.Nodes = append(st.Nodes, nil) }), "node entry 3"},
		{"duplicate node", mutate(func(st *fsmpb.State) { st.Nodes[1].NodeId = "n1" }), "duplicate node id \"n1\""},
		{"token without id", mutate(func(st *fsmpb.State) { st.JoinTokens[0].TokenId = "" }), "join token entry 0"},
		{"duplicate token", mutate(func(st *fsmpb.State) { st.JoinTokens[1].TokenId = "tok-a" }), "duplicate join token id"},
		{"request without id", mutate(func(st *fsmpb.State) { st.Requests[0].RequestId = "" }), "request record 0"},
		{"request with two outcomes", mutate(func(st *fsmpb.State) {
			st.Requests[0].Result, st.Requests[0].ResultBytes = &fsmpb.Result{}, []byte{8, 1}
		}), "has two outcomes"},
		{"duplicate request", mutate(func(st *fsmpb.State) { st.Requests[1].RequestId = st.Requests[0].RequestId }), "duplicate request id"},
		{"nil grant", mutate(func(st *fsmpb.State) { st.Grants = append(st.Grants, nil) }), "grant entry 3 has no grant id"},
		{"grant without id", mutate(func(st *fsmpb.State) { st.Grants[0].GrantId = "" }), "grant entry 0 has no grant id"},
		{"malformed grant id", mutate(func(st *fsmpb.State) { st.Grants[0].GrantId = "g-X" }), `grant id "g-X" is malformed`},
		{"duplicate grant", mutate(func(st *fsmpb.State) { st.Grants[1].GrantId = st.Grants[0].GrantId }), "duplicate grant id " + grantID(1)},
		{"grant on an unknown key", mutate(func(st *fsmpb.State) { st.Grants[0].KeyId = keyID(77) }),
			"grant " + grantID(1) + " is on key \"" + keyID(77) + "\", which does not exist"},
		{"grant on a destroyed key", mutate(func(st *fsmpb.State) { st.Keys[0] = tombstone(st.Keys[0], t0) }), // grant 1 is on keyID(2)
			"grant " + grantID(1) + " is on key " + keyID(2) + ", which is destroyed"},
		{"grant with a malformed principal", mutate(func(st *fsmpb.State) { st.Grants[2].Principal = "a b" }), "has malformed principal \"a b\""},
		{"nil denied principal", mutate(func(st *fsmpb.State) { st.DeniedPrincipals = append(st.DeniedPrincipals, nil) }),
			"denied principal entry 2 has no principal"},
		{"denied principal without principal", mutate(func(st *fsmpb.State) { st.DeniedPrincipals[1].Principal = "" }),
			"denied principal entry 1 has no principal"},
		{"malformed denied principal", mutate(func(st *fsmpb.State) { st.DeniedPrincipals[1].Principal = "z z" }), `denied principal "z z" is malformed`},
		{"duplicate denied principal", mutate(func(st *fsmpb.State) { st.DeniedPrincipals[1].Principal = "amy" }), "duplicate denied principal amy"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := StateFromProto(tc.st); err == nil || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("StateFromProto error = %v, want one containing %q", err, tc.msg)
			}
			if tc.st == nil {
				return
			}
			var buf bytes.Buffer
			if err := WriteSnapshot(&buf, tc.st); err != nil {
				t.Fatal(err)
			}
			g := populated(t)
			before := g.Digest()
			if err := g.Restore(io.NopCloser(&buf)); err == nil || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Restore error = %v", err)
			}
			if g.Digest() != before {
				t.Fatalf("failed restore changed the state")
			}
		})
	}
}

func TestEmptyStateSnapshot(t *testing.T) {
	f := New(Config{})
	g := New(Config{})
	if err := g.Restore(io.NopCloser(bytes.NewReader(snapshotBytes(t, f)))); err != nil {
		t.Fatal(err)
	}
	if g.Cluster() != nil || g.KeyCount() != 0 || f.Digest() != g.Digest() {
		t.Fatalf("empty state did not round-trip")
	}
}
