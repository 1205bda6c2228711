package fsm

import (
	"bytes"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

func fuzzSeeds(f *testing.F) {
	a := newApplier(f)
	for _, c := range []struct {
		typ     fsmpb.CommandType
		payload proto.Message
		e       env
	}{
		{typInit, initPayload(), env{}},
		{typCreate, createKeyPayload(keyID(1)), env{requestID: "r"}},
		{typToken, joinTokenPayload("tok", t0+1), env{}},
		{typAdmit, admitPayload("tok", "n2"), env{}},
		{typRemove, &fsmpb.RemoveNode{NodeId: "n1"}, env{}},
		{typNoop, &fsmpb.Noop{}, env{}},
		{typRotate, with(rotatePayload(k1, 2), func(p *fsmpb.RotateKey) { p.Automatic = true }), env{}},
		{typUpdate, &fsmpb.UpdateKey{KeyId: k1, SetDescription: true, Description: "d", ReplaceTags: true, Tags: map[string]string{"a": "b"}}, env{}},
		{typSetAlias, &fsmpb.SetAlias{KeyId: k1, Alias: "a"}, env{}},
		{typDeleteAlias, &fsmpb.DeleteAlias{Alias: "a"}, env{}},
		{typEnabled, &fsmpb.SetKeyEnabled{KeyId: k1, Enabled: true}, env{}},
		{typRevoke, &fsmpb.RevokeKey{KeyId: k1, Reason: reasonCompromised, Comment: "c"}, env{}},
		{typVerState, &fsmpb.SetVersionState{KeyId: k1, Version: 1, State: verDisabled}, env{}},
		{typMinVersion, &fsmpb.SetMinDecryptionVersion{KeyId: k1, Version: 1}, env{}},
		{typPolicy, &fsmpb.SetRotationPolicy{KeyId: k1, PeriodSeconds: 3600}, env{}},
		{typSchedule, &fsmpb.ScheduleDestruction{KeyId: k1, PendingWindowSeconds: 60}, env{}},
		{typCancel, &fsmpb.CancelDestruction{KeyId: k1}, env{}},
		{typDestroy, &fsmpb.DestroyKey{KeyId: k1}, env{}},
		{typImportToken, importTokenPayload("it-abcdefgh", t0+1), env{}},
		{typImport, importPayload("it-abcdefgh", k2), env{}},
		{typCreateGrant, with(grantPayload(grantID(1), k2, "bob"), func(p *fsmpb.CreateGrant) {
			p.Grant.EncryptionContextEquals = map[string]string{"tenant": "acme"}
		}), env{principal: "admin:alice"}},
		{typCreateGrant, grantPayload(grantID(2), k1, "carol", opDescribe), env{requestID: "g"}},
		{typRevokeGrant, &fsmpb.RevokeGrant{GrantId: grantID(1)}, env{}},
		{typDeny, &fsmpb.DenyPrincipal{Principal: "bob", Reason: "left"}, env{principal: "admin:alice"}},
		{typDeny, &fsmpb.DenyPrincipal{Principal: "alice"}, env{principal: "admin:alice"}},
		{typAllow, &fsmpb.AllowPrincipal{Principal: "bob"}, env{}},
		{typBeginKEK, beginV2("n1", "n2"), env{}},
		{typDeliverKEK, &fsmpb.DeliverKEK{Version: 2, Deliveries: []*fsmpb.KEKDelivery{{NodeId: "n2", Wrapped: []byte("w")}}}, env{}},
		{typKEKInstall, &fsmpb.KEKInstalled{Version: 2, NodeId: "n2", CheckValue: kcv2}, env{}},
		{typActivateKEK, &fsmpb.ActivateKEK{Version: 2}, env{}},
		{typRewrap, &fsmpb.RewrapMaterial{CaKey: &fsmpb.WrappedBlob{KekVersion: 2, Blob: []byte("c")}, CaKeyFrom: 1,
			Keys: []*fsmpb.RewrappedKeyVersion{{KeyId: k1, Version: 1, FromKekVersion: 1, Material: &fsmpb.WrappedBlob{KekVersion: 2, Blob: []byte("m")}}}}, env{}},
		{typRetireKEK, &fsmpb.RetireKEK{Version: 1}, env{}},
		{typKEKRemoved, &fsmpb.KEKRemoved{Version: 1, NodeId: "n1"}, env{}},
		{typAbandonKEK, &fsmpb.AbandonKEKRotation{Version: 2, Reason: "r"}, env{}},
		{77, nil, env{ignorable: true}},
		{77, nil, env{}},
		{typNoop, nil, env{format: 2}},
	} {
		data, err := EncodeCommand(a.command(c.typ, c.payload, c.e))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte{})
	f.Add([]byte{0x08, 0x01})
}

// lifecycleState holds k1 (ACTIVE, rotated, aliased, rotating hourly), k2
// pending destruction, k3 destroyed, an unused import token, grants on k1
// and k2 (whose destruction removes its grants), and a denied principal.
func lifecycleState(t testing.TB) *State {
	a := initialised(t)
	a.mustOK(typCreate, with(createKeyPayload(k1), func(p *fsmpb.CreateKey) { p.Alias = "a"; p.RotationPeriodSeconds = 3600 }))
	a.mustOK(typRotate, rotatePayload(k1, 2))
	a.mustOK(typCreate, createKeyPayload(k2))
	a.mustOK(typSchedule, &fsmpb.ScheduleDestruction{KeyId: k2, PendingWindowSeconds: 1})
	a.mustOK(typCreate, createKeyPayload(keyID(3)))
	driveTo(a, keyID(3), stDestroyed)
	a.mustOK(typImportToken, importTokenPayload("it-abcdefgh", a.now+int64(time.Hour)))
	a.mustOK(typCreateGrant, grantPayload(grantID(1), k2, "bob"))
	a.mustOK(typCreateGrant, grantPayload(grantID(3), k1, "bob", opDescribe))
	a.mustOK(typDeny, &fsmpb.DenyPrincipal{Principal: "carol", Reason: "r"})
	return a.s
}

// FuzzDecodeCommand applies whatever decodes to a fresh and to an initialised
// state: nothing may panic, and every reachable state must still snapshot
// and restore.
func FuzzDecodeCommand(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		cmd, err := DecodeCommand(data)
		if err != nil {
			return
		}
		for _, s := range []*State{NewState(), initialised(t).s, lifecycleState(t)} {
			res := s.Apply(100, cmd)
			if res == nil {
				t.Fatal("nil result")
			}
			if _, err := EncodeResult(res); err != nil {
				t.Fatalf("result does not encode: %v", err)
			}
			checkGrantIndexes(t, s)
			var buf bytes.Buffer
			if err := WriteSnapshot(&buf, s.ToProto()); err != nil {
				t.Fatalf("state does not snapshot: %v", err)
			}
			st, err := ReadSnapshot(&buf)
			if err != nil {
				t.Fatalf("snapshot does not read back: %v", err)
			}
			if _, err := StateFromProto(st); err != nil {
				t.Fatalf("snapshot does not restore: %v", err)
			}
		}
	})
}

// FuzzReadSnapshot: arbitrary bytes never panic ReadSnapshot or
// StateFromProto, and whatever is accepted writes back to the same bytes.
func FuzzReadSnapshot(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte(snapshotMagic))
	var empty bytes.Buffer
	if err := WriteSnapshot(&empty, NewState().ToProto()); err != nil {
		f.Fatal(err)
	}
	f.Add(empty.Bytes())
	a := initialised(f)
	a.mustOK(typCreate, with(createKeyPayload(keyID(1)), func(p *fsmpb.CreateKey) { p.Alias = "a"; p.Tags = map[string]string{"x": "y"} }))
	a.apply(typCreate, createKeyPayload(keyID(2)), env{requestID: "r"})
	var full bytes.Buffer
	if err := WriteSnapshot(&full, a.s.ToProto()); err != nil {
		f.Fatal(err)
	}
	f.Add(full.Bytes())
	var lifecycle bytes.Buffer
	if err := WriteSnapshot(&lifecycle, lifecycleState(f).ToProto()); err != nil {
		f.Fatal(err)
	}
	f.Add(lifecycle.Bytes())
	// Built field by field so the fuzzer can mutate grants and the deny list
	// (including on keys that do not exist or are destroyed).
	var authz bytes.Buffer
	if err := WriteSnapshot(&authz, &fsmpb.State{
		Format:           StateFormat,
		Keys:             []*fsmpb.KeyRecord{{KeyId: k1, State: stActive, PrimaryVersion: 1, Versions: []*fsmpb.KeyVersion{{Version: 1}}}},
		Grants:           []*fsmpb.Grant{{GrantId: grantID(1), KeyId: k1, Principal: "bob", Operations: []fsmpb.GrantOperation{opDecrypt}}},
		DeniedPrincipals: []*fsmpb.DeniedPrincipal{{Principal: "carol"}},
	}); err != nil {
		f.Fatal(err)
	}
	f.Add(authz.Bytes())

	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := ReadSnapshot(bytes.NewReader(data))
		if err != nil {
			return
		}
		s, err := StateFromProto(st)
		if err != nil {
			return
		}
		checkGrantIndexes(t, s)
		var buf bytes.Buffer
		if err := WriteSnapshot(&buf, s.ToProto()); err != nil {
			t.Fatalf("accepted state does not write: %v", err)
		}
		if _, err := ReadSnapshot(&buf); err != nil {
			t.Fatalf("rewritten snapshot does not read: %v", err)
		}
		// Applying to a restored state must not panic either.
		s.Apply(1, &fsmpb.Command{Format: 1, Type: typNoop, LeaderTimeUnixNano: t0})
	})
}
