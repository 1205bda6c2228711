package fsm

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

const (
	typRotate      = fsmpb.CommandType_COMMAND_TYPE_ROTATE_KEY
	typUpdate      = fsmpb.CommandType_COMMAND_TYPE_UPDATE_KEY
	typSetAlias    = fsmpb.CommandType_COMMAND_TYPE_SET_ALIAS
	typDeleteAlias = fsmpb.CommandType_COMMAND_TYPE_DELETE_ALIAS
	typEnabled     = fsmpb.CommandType_COMMAND_TYPE_SET_KEY_ENABLED
	typRevoke      = fsmpb.CommandType_COMMAND_TYPE_REVOKE_KEY
	typVerState    = fsmpb.CommandType_COMMAND_TYPE_SET_VERSION_STATE
	typMinVersion  = fsmpb.CommandType_COMMAND_TYPE_SET_MIN_DECRYPTION_VERSION
	typPolicy      = fsmpb.CommandType_COMMAND_TYPE_SET_ROTATION_POLICY
	typSchedule    = fsmpb.CommandType_COMMAND_TYPE_SCHEDULE_DESTRUCTION
	typCancel      = fsmpb.CommandType_COMMAND_TYPE_CANCEL_DESTRUCTION
	typDestroy     = fsmpb.CommandType_COMMAND_TYPE_DESTROY_KEY
	typImportToken = fsmpb.CommandType_COMMAND_TYPE_CREATE_IMPORT_TOKEN
	typImport      = fsmpb.CommandType_COMMAND_TYPE_IMPORT_KEY

	invalid      = fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT
	notFound     = fsmpb.ResultCode_RESULT_CODE_NOT_FOUND
	exists       = fsmpb.ResultCode_RESULT_CODE_ALREADY_EXISTS
	precondition = fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION
	denied       = fsmpb.ResultCode_RESULT_CODE_PERMISSION_DENIED

	reasonSuperseded  = fsmpb.RevocationReason_REVOCATION_REASON_SUPERSEDED
	reasonCeased      = fsmpb.RevocationReason_REVOCATION_REASON_CEASED
	reasonCompromised = fsmpb.RevocationReason_REVOCATION_REASON_COMPROMISED

	hour = int64(time.Hour)
	day  = 24 * hour
)

var (
	k1 = keyID(1)
	k2 = keyID(2)
)

func blob(s string) *fsmpb.WrappedBlob { return &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte(s)} }

func rotatePayload(id string, v uint32) *fsmpb.RotateKey {
	return &fsmpb.RotateKey{KeyId: id, Version: v, Material: blob(fmt.Sprintf("wrapped-material-%s-v%d", id, v))}
}

func importTokenPayload(id string, expires int64) *fsmpb.CreateImportToken {
	return &fsmpb.CreateImportToken{
		TokenId: id, PublicKeyDer: []byte("import-pub-" + id), PrivateKey: blob("wrapped-import-private-" + id),
		ExpiresUnixNano: expires, Spec: fsmpb.KeySpec_KEY_SPEC_AES_256,
	}
}

func importPayload(tokenID, keyID string) *fsmpb.ImportKey {
	return &fsmpb.ImportKey{TokenId: tokenID, Key: createKeyPayload(keyID)}
}

// withKeyIn returns a setup that creates k1 (AES, rotating daily, alias
// "one") and drives it into state st through commands.
func withKeyIn(st fsmpb.KeyState) func(a *applier) {
	return func(a *applier) {
		a.mustOK(typInit, initPayload())
		a.mustOK(typCreate, with(createKeyPayload(k1), func(p *fsmpb.CreateKey) {
			p.Alias = "one"
			p.RotationPeriodSeconds = 86400
		}))
		driveTo(a, k1, st)
	}
}

func driveTo(a *applier, id string, st fsmpb.KeyState) {
	a.t.Helper()
	switch st {
	case stActive:
	case stDisabled:
		a.mustOK(typEnabled, &fsmpb.SetKeyEnabled{KeyId: id})
	case stDeactivated:
		a.mustOK(typRevoke, &fsmpb.RevokeKey{KeyId: id, Reason: reasonSuperseded})
	case stCompromised:
		a.mustOK(typRevoke, &fsmpb.RevokeKey{KeyId: id, Reason: reasonCompromised})
	case stPending:
		a.mustOK(typSchedule, &fsmpb.ScheduleDestruction{KeyId: id, PendingWindowSeconds: 3600})
	case stDestroyed:
		a.mustOK(typSchedule, &fsmpb.ScheduleDestruction{KeyId: id, PendingWindowSeconds: 60})
		a.now += int64(time.Minute)
		a.mustOK(typDestroy, &fsmpb.DestroyKey{KeyId: id})
	default:
		a.t.Fatalf("driveTo %s", st)
	}
	if got := a.s.keys[id].GetState(); got != st {
		a.t.Fatalf("driveTo: key is %s, want %s", got, st)
	}
}

func keyState(want fsmpb.KeyState) func(t *testing.T, s *State, res *fsmpb.Result) {
	return func(t *testing.T, s *State, res *fsmpb.Result) {
		t.Helper()
		if got := s.keys[k1].GetState(); got != want {
			t.Fatalf("key state = %s, want %s", got, want)
		}
	}
}

// noMaterialInResult: Result.key never carries wrapped material.
func noMaterialInResult(t *testing.T, res *fsmpb.Result) {
	t.Helper()
	for _, v := range res.GetKey().GetVersions() {
		if v.GetMaterial() != nil {
			t.Fatalf("result carries material of version %d", v.GetVersion())
		}
	}
	b, _ := EncodeResult(res)
	if bytes.Contains(b, []byte("wrapped-")) {
		t.Fatalf("encoded result contains wrapped material")
	}
}

// A table of every key state x every state-gated command: the resulting
// state, or the refusal (the state then stays as it was).
func TestKeyStateTransitions(t *testing.T) {
	type op struct {
		name    string
		typ     fsmpb.CommandType
		payload proto.Message
		at      int64 // offset from the setup's time
	}
	ops := []op{
		{"disable", typEnabled, &fsmpb.SetKeyEnabled{KeyId: k1}, 0},
		{"enable", typEnabled, &fsmpb.SetKeyEnabled{KeyId: k1, Enabled: true}, 0},
		{"revoke superseded", typRevoke, &fsmpb.RevokeKey{KeyId: k1, Reason: reasonSuperseded}, 0},
		{"revoke ceased", typRevoke, &fsmpb.RevokeKey{KeyId: k1, Reason: reasonCeased}, 0},
		{"revoke compromised", typRevoke, &fsmpb.RevokeKey{KeyId: k1, Reason: reasonCompromised}, 0},
		{"schedule destruction", typSchedule, &fsmpb.ScheduleDestruction{KeyId: k1, PendingWindowSeconds: 3600}, 0},
		{"cancel destruction", typCancel, &fsmpb.CancelDestruction{KeyId: k1}, 0},
		{"destroy (due)", typDestroy, &fsmpb.DestroyKey{KeyId: k1}, 2 * hour},
		{"rotate", typRotate, rotatePayload(k1, 2), 0},
		{"update", typUpdate, &fsmpb.UpdateKey{KeyId: k1, SetDescription: true, Description: "d"}, 0},
		{"set alias", typSetAlias, &fsmpb.SetAlias{KeyId: k1, Alias: "two"}, 0},
		{"set version state", typVerState, &fsmpb.SetVersionState{KeyId: k1, Version: 1, State: verEnabled}, 0},
		{"set min decryption version", typMinVersion, &fsmpb.SetMinDecryptionVersion{KeyId: k1, Version: 1}, 0},
		{"set rotation policy", typPolicy, &fsmpb.SetRotationPolicy{KeyId: k1, PeriodSeconds: 3600}, 0},
	}
	// want[state][op]: a KeyState means OK and that resulting state; a
	// string means FAILED_PRECONDITION with that message fragment.
	type want = any
	const (
		notPending   = "only a key pending destruction can have its destruction cancelled"
		notDestroyP  = "only a key pending destruction is destroyed"
		onlyActive   = "only ACTIVE keys rotate"
		revoked      = "(revoked) and cannot be"
		policyStates = "only ACTIVE or DISABLED keys take a rotation policy"
		tomb         = "a destroyed key cannot change"
		cancelFirst  = "cancel the scheduled destruction first"
		aliasTarget  = "an alias can point only at a key that is not pending destruction or destroyed"
	)
	table := map[fsmpb.KeyState][]want{
		//                 disable       enable        superseded   ceased        compromised   schedule   cancel      destroy      rotate      update      alias        version     min         policy
		stActive:      {stDisabled, stActive, stDeactivated, stDeactivated, stCompromised, stPending, notPending, notDestroyP, stActive, stActive, stActive, stActive, stActive, stActive},
		stDisabled:    {stDisabled, stActive, stDeactivated, stDeactivated, stCompromised, stPending, notPending, notDestroyP, "DISABLED; " + onlyActive, stDisabled, stDisabled, stDisabled, stDisabled, stDisabled},
		stDeactivated: {revoked, revoked, "already DEACTIVATED", "already DEACTIVATED", stCompromised, stPending, notPending, notDestroyP, onlyActive, stDeactivated, stDeactivated, stDeactivated, stDeactivated, policyStates},
		stCompromised: {revoked, revoked, "already COMPROMISED", "already COMPROMISED", "already COMPROMISED", stPending, notPending, notDestroyP, onlyActive, stCompromised, stCompromised, stCompromised, stCompromised, policyStates},
		stPending:     {"already unusable", "cancel the scheduled destruction (the key becomes DISABLED), then enable it", cancelFirst, cancelFirst, cancelFirst, "already PENDING_DESTRUCTION", stDisabled, stDestroyed, onlyActive, stPending, aliasTarget, stPending, stPending, policyStates},
		stDestroyed:   {"DESTROYED and cannot be disabled", "DESTROYED and cannot be enabled", "DESTROYED and cannot be revoked", "cannot be revoked", "cannot be revoked", "already DESTROYED", notPending, notDestroyP, onlyActive, tomb, aliasTarget, tomb, tomb, policyStates},
	}
	for _, from := range []fsmpb.KeyState{stActive, stDisabled, stDeactivated, stCompromised, stPending, stDestroyed} {
		row := table[from]
		if len(row) != len(ops) {
			t.Fatalf("row %s has %d entries, want %d", from, len(row), len(ops))
		}
		for i, o := range ops {
			t.Run(stateName(from)+"/"+o.name, func(t *testing.T) {
				a := newApplier(t)
				withKeyIn(from)(a)
				at := a.now + o.at
				a.apply(typNoop, nil, env{at: at}) // housekeeping first, so a refusal must change nothing
				before := a.s.ToProto()
				res := a.apply(o.typ, o.payload, env{at: at})
				switch w := row[i].(type) {
				case fsmpb.KeyState:
					checkResult(t, res, codeOK, "")
					if got := a.s.keys[k1].GetState(); got != w {
						t.Fatalf("state %s after %s = %s, want %s", from, o.name, got, w)
					}
					noMaterialInResult(t, res)
				case string:
					checkResult(t, res, precondition, w)
					if !strings.Contains(res.GetMessage(), k1) {
						t.Fatalf("refusal %q does not name the key", res.GetMessage())
					}
					if !proto.Equal(before, a.s.ToProto()) {
						t.Fatalf("refused command changed the state")
					}
				}
			})
		}
	}
}

func TestRotateKey(t *testing.T) {
	rotate := func(fn func(*fsmpb.RotateKey)) *fsmpb.RotateKey { return with(rotatePayload(k1, 2), fn) }
	withRSA := func(a *applier) {
		a.mustOK(typInit, initPayload())
		a.mustOK(typCreate, with(createKeyPayload(k1), func(p *fsmpb.CreateKey) {
			p.Spec, p.Usage, p.PublicKeyDer = fsmpb.KeySpec_KEY_SPEC_RSA_3072, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, []byte("pub-v1")
		}))
	}
	withRetiredKEK := func(a *applier) {
		withKeyIn(stActive)(a)
		c := proto.CloneOf(a.s.cluster)
		c.KekVersions[0].State = fsmpb.KEKState_KEK_STATE_RETIRED
		c.KekVersions = append(c.KekVersions, &fsmpb.KEKVersion{Version: 2, State: fsmpb.KEKState_KEK_STATE_ACTIVE})
		c.CurrentKekVersion = 2
		a.s.cluster = c
	}
	active := withKeyIn(stActive)
	runCases(t, []applyCase{
		{
			name: "manual rotation", setup: active, typ: typRotate, payload: rotatePayload(k1, 2), env: env{at: t0 + hour, principal: "bob"}, code: codeOK,
			check: func(t *testing.T, s *State, res *fsmpb.Result) {
				rec := s.keys[k1]
				v := rec.GetVersions()
				if len(v) != 2 || rec.GetPrimaryVersion() != 2 || rec.GetUpdatedUnixNano() != t0+hour ||
					rec.GetNextRotationUnixNano() != t0+hour+day || rec.GetCreatedBy() != "admin" {
					t.Fatalf("record = %v", rec)
				}
				want := &fsmpb.KeyVersion{Version: 2, Material: blob("wrapped-material-" + k1 + "-v2"), CreatedUnixNano: t0 + hour, State: verEnabled}
				if !proto.Equal(v[1], want) || v[0].GetMaterial() == nil {
					t.Fatalf("versions = %v", v)
				}
				noMaterialInResult(t, res)
				if res.GetKey().GetPrimaryVersion() != 2 {
					t.Fatalf("result key = %v", res.GetKey())
				}
			},
		},
		{
			name: "asymmetric rotation keeps the public key", setup: withRSA, typ: typRotate, code: codeOK,
			payload: rotate(func(p *fsmpb.RotateKey) { p.PublicKeyDer = []byte("pub-v2") }),
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				v := s.keys[k1].GetVersions()
				if string(v[0].GetPublicKeyDer()) != "pub-v1" || string(v[1].GetPublicKeyDer()) != "pub-v2" ||
					s.keys[k1].GetNextRotationUnixNano() != 0 {
					t.Fatalf("versions = %v", v)
				}
			},
		},
		{name: "automatic when due", setup: active, typ: typRotate, env: env{at: t0 + day}, code: codeOK,
			payload: rotate(func(p *fsmpb.RotateKey) { p.Automatic = true }),
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				if rec := s.keys[k1]; rec.GetPrimaryVersion() != 2 || rec.GetNextRotationUnixNano() != t0+2*day {
					t.Fatalf("record = %v", rec)
				}
			}},
		{name: "automatic before due", setup: active, typ: typRotate, env: env{at: t0 + day - 1}, code: precondition,
			msg:     "automatic rotation of key " + k1 + " is not due until 2023-11-15T22:13:20Z; nothing changed",
			payload: rotate(func(p *fsmpb.RotateKey) { p.Automatic = true })},
		{name: "automatic without period", typ: typRotate, code: precondition, msg: "has no automatic rotation period",
			setup:   func(a *applier) { a.mustOK(typInit, initPayload()); a.mustOK(typCreate, createKeyPayload(k1)) },
			payload: rotate(func(p *fsmpb.RotateKey) { p.Automatic = true })},
		{name: "no key id", setup: active, typ: typRotate, code: invalid, msg: "key id is required",
			payload: rotate(func(p *fsmpb.RotateKey) { p.KeyId = "" })},
		{name: "alias instead of id", setup: active, typ: typRotate, code: invalid, msg: "commands take key ids, not aliases",
			payload: rotate(func(p *fsmpb.RotateKey) { p.KeyId = "one" })},
		{name: "unknown key", setup: active, typ: typRotate, code: notFound, msg: "key " + k2 + " does not exist",
			payload: rotate(func(p *fsmpb.RotateKey) { p.KeyId = k2 })},
		{name: "disabled key", setup: withKeyIn(stDisabled), typ: typRotate, payload: rotatePayload(k1, 2), code: precondition,
			msg: "key " + k1 + " is DISABLED; only ACTIVE keys rotate (enable it first)"},
		{name: "version 0", setup: active, typ: typRotate, code: invalid, msg: "version is required (the next version of key " + k1 + " is 2)",
			payload: rotate(func(p *fsmpb.RotateKey) { p.Version = 0 })},
		{name: "version exists", setup: active, typ: typRotate, code: precondition, msg: "version 1 already exists on key " + k1 + "; retry with version 2",
			payload: rotate(func(p *fsmpb.RotateKey) { p.Version = 1 })},
		{name: "version skipped", setup: active, typ: typRotate, code: precondition, msg: "version 3 is not the next version",
			payload: rotate(func(p *fsmpb.RotateKey) { p.Version = 3 })},
		{name: "no material", setup: active, typ: typRotate, code: invalid, msg: "key material is required",
			payload: rotate(func(p *fsmpb.RotateKey) { p.Material = nil })},
		{name: "empty material", setup: active, typ: typRotate, code: invalid, msg: "key material is empty",
			payload: rotate(func(p *fsmpb.RotateKey) { p.Material.Blob = nil })},
		{name: "unknown KEK", setup: active, typ: typRotate, code: invalid, msg: "KEK version 7, which does not exist",
			payload: rotate(func(p *fsmpb.RotateKey) { p.Material.KekVersion = 7 })},
		{name: "retired KEK", setup: withRetiredKEK, typ: typRotate, payload: rotatePayload(k1, 2), code: precondition,
			msg: "KEK version 1, which is KEK_STATE_RETIRED; wrap it under KEK version 2"},
		{name: "asymmetric without public key", setup: withRSA, typ: typRotate, payload: rotatePayload(k1, 2), code: invalid,
			msg: "KEY_SPEC_RSA_3072 is asymmetric"},
		{name: "symmetric with public key", setup: active, typ: typRotate, code: invalid, msg: "symmetric and has no public key",
			payload: rotate(func(p *fsmpb.RotateKey) { p.PublicKeyDer = []byte("x") })},
	})
}

// The leader's scheduler may propose the same automatic rotation twice (a
// retry, a new leader): the key rotates exactly once per period.
func TestAutomaticRotationExactlyOnce(t *testing.T) {
	a := newApplier(t)
	withKeyIn(stActive)(a)
	auto := func(v uint32) *fsmpb.RotateKey {
		return with(rotatePayload(k1, v), func(p *fsmpb.RotateKey) { p.Automatic = true })
	}
	due := t0 + day
	if got := a.s.dueRotations(due-1, 0); len(got) != 0 {
		t.Fatalf("due before its time: %v", got)
	}
	if got := a.s.dueRotations(due, 0); len(got) != 1 || got[0].GetKeyId() != k1 {
		t.Fatalf("not due at its time: %v", got)
	}
	checkResult(t, a.apply(typRotate, auto(2), env{at: due}), codeOK, "")
	// Same proposal again, and one rebuilt with the next version.
	checkResult(t, a.apply(typRotate, auto(2), env{at: due + 1}), precondition, "not due until")
	checkResult(t, a.apply(typRotate, auto(3), env{at: due + 2}), precondition, "not due until")
	if rec := a.s.keys[k1]; len(rec.GetVersions()) != 2 || rec.GetNextRotationUnixNano() != due+day {
		t.Fatalf("record = %v", rec)
	}
	if got := a.s.dueRotations(due+day-1, 0); len(got) != 0 {
		t.Fatalf("still due after rotating: %v", got)
	}
	// A manual rotation in between pushes the schedule too.
	a.mustOK(typRotate, rotatePayload(k1, 3))
	if got := a.s.keys[k1].GetNextRotationUnixNano(); got != a.now+day {
		t.Fatalf("next rotation = %d", got)
	}
}

func TestUpdateKey(t *testing.T) {
	active := withKeyIn(stActive)
	runCases(t, []applyCase{
		{name: "description", setup: active, typ: typUpdate, env: env{at: t0 + hour}, code: codeOK,
			payload: &fsmpb.UpdateKey{KeyId: k1, SetDescription: true, Description: "new"},
			check: func(t *testing.T, s *State, res *fsmpb.Result) {
				if rec := s.keys[k1]; rec.GetDescription() != "new" || rec.GetUpdatedUnixNano() != t0+hour {
					t.Fatalf("record = %v", rec)
				}
				noMaterialInResult(t, res)
			}},
		{name: "replace tags", setup: func(a *applier) {
			active(a)
			a.mustOK(typUpdate, &fsmpb.UpdateKey{KeyId: k1, ReplaceTags: true, Tags: map[string]string{"a": "1", "b": "2"}})
		}, typ: typUpdate, code: codeOK,
			payload: &fsmpb.UpdateKey{KeyId: k1, ReplaceTags: true, Tags: map[string]string{"c": "3"}},
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				if tags := s.keys[k1].GetTags(); len(tags) != 1 || tags["c"] != "3" {
					t.Fatalf("tags = %v", tags)
				}
			}},
		{name: "clear tags and description", setup: active, typ: typUpdate, code: codeOK,
			payload: &fsmpb.UpdateKey{KeyId: k1, ReplaceTags: true, SetDescription: true},
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				if rec := s.keys[k1]; len(rec.GetTags()) != 0 || rec.GetDescription() != "" {
					t.Fatalf("record = %v", rec)
				}
			}},
		{name: "nothing to update", setup: active, typ: typUpdate, payload: &fsmpb.UpdateKey{KeyId: k1}, code: invalid, msg: "nothing to update"},
		{name: "description without flag", setup: active, typ: typUpdate, code: invalid, msg: "without set_description",
			payload: &fsmpb.UpdateKey{KeyId: k1, ReplaceTags: true, Description: "x"}},
		{name: "tags without flag", setup: active, typ: typUpdate, code: invalid, msg: "without replace_tags",
			payload: &fsmpb.UpdateKey{KeyId: k1, SetDescription: true, Tags: map[string]string{"a": "b"}}},
		{name: "description too long", setup: active, typ: typUpdate, code: invalid, msg: "description is 8193 bytes",
			payload: &fsmpb.UpdateKey{KeyId: k1, SetDescription: true, Description: strings.Repeat("d", 8193)}},
		{name: "bad tag", setup: active, typ: typUpdate, code: invalid, msg: "tag keys must not be empty",
			payload: &fsmpb.UpdateKey{KeyId: k1, ReplaceTags: true, Tags: map[string]string{"": "v"}}},
		{name: "unknown key", setup: active, typ: typUpdate, code: notFound, msg: "does not exist",
			payload: &fsmpb.UpdateKey{KeyId: k2, SetDescription: true}},
		{name: "destroyed key", setup: withKeyIn(stDestroyed), typ: typUpdate, code: precondition, msg: "is DESTROYED",
			payload: &fsmpb.UpdateKey{KeyId: k1, SetDescription: true}},
	})
}

func TestAliases(t *testing.T) {
	twoKeys := func(a *applier) {
		withKeyIn(stActive)(a)
		a.mustOK(typCreate, with(createKeyPayload(k2), func(p *fsmpb.CreateKey) { p.Alias = "two" }))
	}
	runCases(t, []applyCase{
		{name: "new alias replaces the old one", setup: twoKeys, typ: typSetAlias, payload: &fsmpb.SetAlias{Alias: "uno", KeyId: k1}, code: codeOK,
			check: func(t *testing.T, s *State, res *fsmpb.Result) {
				if rec, ok := s.key("uno"); !ok || rec.GetKeyId() != k1 || res.GetKey().GetAlias() != "uno" {
					t.Fatalf("uno -> %v", rec)
				}
				if _, ok := s.key("one"); ok {
					t.Fatalf("old alias still resolves")
				}
			}},
		{name: "alias moves from another key", setup: twoKeys, typ: typSetAlias, env: env{at: t0 + hour},
			payload: &fsmpb.SetAlias{Alias: "two", KeyId: k1}, code: codeOK,
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				if rec, ok := s.key("two"); !ok || rec.GetKeyId() != k1 {
					t.Fatalf("two -> %v", rec)
				}
				if other := s.keys[k2]; other.GetAlias() != "" || other.GetUpdatedUnixNano() != t0+hour {
					t.Fatalf("previous owner = %v", other)
				}
				if _, ok := s.key("one"); ok || len(s.aliases) != 1 {
					t.Fatalf("aliases = %v", s.aliases)
				}
			}},
		{name: "same alias again changes nothing", setup: twoKeys, typ: typSetAlias, env: env{at: t0 + hour},
			payload: &fsmpb.SetAlias{Alias: "one", KeyId: k1}, code: codeOK,
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				if s.keys[k1].GetUpdatedUnixNano() != t0 {
					t.Fatalf("no-op changed the record")
				}
			}},
		{name: "onto a disabled key", setup: func(a *applier) { twoKeys(a); driveTo(a, k1, stDisabled) }, typ: typSetAlias,
			payload: &fsmpb.SetAlias{Alias: "two", KeyId: k1}, code: codeOK},
		{name: "no alias", setup: twoKeys, typ: typSetAlias, payload: &fsmpb.SetAlias{KeyId: k1}, code: invalid, msg: "alias is required"},
		{name: "malformed alias", setup: twoKeys, typ: typSetAlias, payload: &fsmpb.SetAlias{Alias: "a b", KeyId: k1}, code: invalid, msg: "is malformed"},
		{name: "alias like a key id", setup: twoKeys, typ: typSetAlias, payload: &fsmpb.SetAlias{Alias: "k-x", KeyId: k1}, code: invalid, msg: "must not start with"},
		{name: "unknown key", setup: twoKeys, typ: typSetAlias, payload: &fsmpb.SetAlias{Alias: "x", KeyId: keyID(3)}, code: notFound, msg: "does not exist"},
		{name: "pending key", setup: func(a *applier) { twoKeys(a); driveTo(a, k1, stPending) }, typ: typSetAlias,
			payload: &fsmpb.SetAlias{Alias: "two", KeyId: k1}, code: precondition, msg: "is PENDING_DESTRUCTION; an alias can point only"},

		{name: "delete", setup: twoKeys, typ: typDeleteAlias, payload: &fsmpb.DeleteAlias{Alias: "two"}, code: codeOK,
			check: func(t *testing.T, s *State, res *fsmpb.Result) {
				if _, ok := s.key("two"); ok || s.keys[k2].GetAlias() != "" || res.GetKey().GetKeyId() != k2 {
					t.Fatalf("alias still there: %v", s.keys[k2])
				}
			}},
		{name: "delete without alias", setup: twoKeys, typ: typDeleteAlias, payload: &fsmpb.DeleteAlias{}, code: invalid, msg: "alias is required"},
		{name: "delete unknown", setup: twoKeys, typ: typDeleteAlias, payload: &fsmpb.DeleteAlias{Alias: "three"}, code: notFound,
			msg: "alias \"three\" does not exist"},
	})

	// A released alias is free for a new key; a destroyed key releases its alias.
	a := newApplier(t)
	withKeyIn(stActive)(a)
	a.mustOK(typSetAlias, &fsmpb.SetAlias{Alias: "uno", KeyId: k1})
	a.mustOK(typCreate, with(createKeyPayload(k2), func(p *fsmpb.CreateKey) { p.Alias = "one" }))
	driveTo(a, k1, stDestroyed)
	a.mustOK(typCreate, with(createKeyPayload(keyID(3)), func(p *fsmpb.CreateKey) { p.Alias = "uno" }))
	if rec, _ := a.s.key("uno"); rec.GetKeyId() != keyID(3) {
		t.Fatalf("uno -> %v", rec)
	}
}

func TestSetKeyEnabledAndRevoke(t *testing.T) {
	runCases(t, []applyCase{
		{name: "disable", setup: withKeyIn(stActive), typ: typEnabled, payload: &fsmpb.SetKeyEnabled{KeyId: k1}, env: env{at: t0 + hour}, code: codeOK,
			check: func(t *testing.T, s *State, res *fsmpb.Result) {
				if rec := s.keys[k1]; rec.GetState() != stDisabled || rec.GetUpdatedUnixNano() != t0+hour ||
					rec.GetNextRotationUnixNano() != t0+day {
					t.Fatalf("record = %v", rec)
				}
				noMaterialInResult(t, res)
			}},
		{name: "disable twice is a no-op", setup: withKeyIn(stDisabled), typ: typEnabled, payload: &fsmpb.SetKeyEnabled{KeyId: k1},
			env: env{at: t0 + hour}, code: codeOK,
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				if s.keys[k1].GetUpdatedUnixNano() != t0 {
					t.Fatalf("no-op changed the record")
				}
			}},
		{name: "enable unknown key", typ: typEnabled, payload: &fsmpb.SetKeyEnabled{KeyId: k1, Enabled: true}, code: notFound, msg: "does not exist"},
		{name: "revoke", setup: withKeyIn(stActive), typ: typRevoke, env: env{at: t0 + hour}, code: codeOK,
			payload: &fsmpb.RevokeKey{KeyId: k1, Reason: reasonCeased, Comment: "project ended"},
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				rec := s.keys[k1]
				if rec.GetState() != stDeactivated || rec.GetRevocationReason() != reasonCeased || rec.GetRevocationComment() != "project ended" ||
					rec.GetRevokedUnixNano() != t0+hour || rec.GetNextRotationUnixNano() != 0 || rec.GetRotationPeriodSeconds() != 86400 {
					t.Fatalf("record = %v", rec)
				}
				if len(s.dueRotations(t0+10*day, 0)) != 0 {
					t.Fatalf("a revoked key is due for rotation")
				}
			}},
		{name: "deactivated then compromised", setup: withKeyIn(stDeactivated), typ: typRevoke, code: codeOK,
			payload: &fsmpb.RevokeKey{KeyId: k1, Reason: reasonCompromised, Comment: "leaked"},
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				if rec := s.keys[k1]; rec.GetRevocationReason() != reasonCompromised || rec.GetRevocationComment() != "leaked" {
					t.Fatalf("record = %v", rec)
				}
			}},
		{name: "revoke comment of 1024 bytes", setup: withKeyIn(stActive), typ: typRevoke, code: codeOK,
			payload: &fsmpb.RevokeKey{KeyId: k1, Reason: reasonSuperseded, Comment: strings.Repeat("c", 1024)}},
		{name: "revoke comment too long", setup: withKeyIn(stActive), typ: typRevoke, code: invalid, msg: "comment is 1025 bytes",
			payload: &fsmpb.RevokeKey{KeyId: k1, Reason: reasonSuperseded, Comment: strings.Repeat("c", 1025)}},
		{name: "revoke without reason", setup: withKeyIn(stActive), typ: typRevoke, code: invalid, msg: "revocation reason is required",
			payload: &fsmpb.RevokeKey{KeyId: k1}},
		{name: "revoke with unknown reason", setup: withKeyIn(stActive), typ: typRevoke, code: invalid, msg: "revocation reason 9 is unknown",
			payload: &fsmpb.RevokeKey{KeyId: k1, Reason: 9}},
		{name: "revoke unknown key", typ: typRevoke, code: notFound, msg: "does not exist",
			payload: &fsmpb.RevokeKey{KeyId: k1, Reason: reasonCeased}},
	})
}

func TestVersionCommands(t *testing.T) {
	rotated := func(a *applier) {
		withKeyIn(stActive)(a)
		a.mustOK(typRotate, rotatePayload(k1, 2))
	}
	vs := func(v uint32, st fsmpb.KeyVersionState) *fsmpb.SetVersionState {
		return &fsmpb.SetVersionState{KeyId: k1, Version: v, State: st}
	}
	versionState := func(v int, want fsmpb.KeyVersionState) func(t *testing.T, s *State, _ *fsmpb.Result) {
		return func(t *testing.T, s *State, _ *fsmpb.Result) {
			if got := s.keys[k1].GetVersions()[v-1].GetState(); got != want {
				t.Fatalf("version %d is %s, want %s", v, got, want)
			}
		}
	}
	runCases(t, []applyCase{
		{name: "disable an old version", setup: rotated, typ: typVerState, payload: vs(1, verDisabled), code: codeOK, check: versionState(1, verDisabled)},
		{name: "enable it again", setup: func(a *applier) { rotated(a); a.mustOK(typVerState, vs(1, verDisabled)) },
			typ: typVerState, payload: vs(1, verEnabled), code: codeOK, check: versionState(1, verEnabled)},
		{name: "enable an enabled version", setup: rotated, typ: typVerState, payload: vs(1, verEnabled), code: codeOK, check: versionState(1, verEnabled)},
		{name: "disable the primary", setup: rotated, typ: typVerState, payload: vs(2, verDisabled), code: precondition,
			msg: "version 2 is the primary version of key " + k1 + " and cannot be disabled"},
		{name: "destroy a version", setup: rotated, typ: typVerState, payload: vs(1, verDestroyed), code: invalid,
			msg: "schedule the key's destruction instead"},
		{name: "unspecified state", setup: rotated, typ: typVerState, payload: vs(1, 0), code: invalid, msg: "use ENABLED or DISABLED"},
		{name: "version 0", setup: rotated, typ: typVerState, payload: vs(0, verDisabled), code: invalid, msg: "version is required"},
		{name: "unknown version", setup: rotated, typ: typVerState, payload: vs(5, verDisabled), code: notFound,
			msg: "key " + k1 + " has no version 5 (its newest is 2)"},
		{name: "destroyed version", setup: func(a *applier) {
			rotated(a)
			// Only reachable through a restored snapshot: a destroyed version on a live key.
			rec := proto.CloneOf(a.s.keys[k1])
			rec.Versions[0].State, rec.Versions[0].Material = verDestroyed, nil
			a.s.putKey(rec)
		}, typ: typVerState, payload: vs(1, verEnabled), code: precondition, msg: "version 1 of key " + k1 + " is DESTROYED"},
		{name: "unknown key", typ: typVerState, payload: vs(1, verEnabled), code: notFound, msg: "does not exist"},

		{name: "min decryption version", setup: rotated, typ: typMinVersion, payload: &fsmpb.SetMinDecryptionVersion{KeyId: k1, Version: 2}, code: codeOK,
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				if s.keys[k1].GetMinDecryptionVersion() != 2 {
					t.Fatalf("record = %v", s.keys[k1])
				}
			}},
		{name: "min decryption version 0", setup: rotated, typ: typMinVersion, payload: &fsmpb.SetMinDecryptionVersion{KeyId: k1}, code: invalid,
			msg: "must be at least 1"},
		{name: "min decryption version above primary", setup: rotated, typ: typMinVersion, payload: &fsmpb.SetMinDecryptionVersion{KeyId: k1, Version: 3},
			code: precondition, msg: "minimum decryption version 3 is above the primary version 2"},
		{name: "min decryption version of unknown key", typ: typMinVersion, payload: &fsmpb.SetMinDecryptionVersion{KeyId: k1, Version: 1},
			code: notFound, msg: "does not exist"},
	})
}

func TestSetRotationPolicy(t *testing.T) {
	withEC := func(a *applier) {
		a.mustOK(typInit, initPayload())
		a.mustOK(typCreate, with(createKeyPayload(k1), func(p *fsmpb.CreateKey) {
			p.Spec, p.PublicKeyDer = fsmpb.KeySpec_KEY_SPEC_EC_P256, []byte("pub")
		}))
	}
	policy := func(p int64) *fsmpb.SetRotationPolicy { return &fsmpb.SetRotationPolicy{KeyId: k1, PeriodSeconds: p} }
	rotation := func(period, next int64) func(t *testing.T, s *State, _ *fsmpb.Result) {
		return func(t *testing.T, s *State, _ *fsmpb.Result) {
			if rec := s.keys[k1]; rec.GetRotationPeriodSeconds() != period || rec.GetNextRotationUnixNano() != next {
				t.Fatalf("rotation %d / %d, want %d / %d", rec.GetRotationPeriodSeconds(), rec.GetNextRotationUnixNano(), period, next)
			}
		}
	}
	runCases(t, []applyCase{
		{name: "set", setup: withKeyIn(stActive), typ: typPolicy, payload: policy(3600), env: env{at: t0 + hour}, code: codeOK,
			check: rotation(3600, t0+2*hour)},
		{name: "on a disabled key", setup: withKeyIn(stDisabled), typ: typPolicy, payload: policy(7200), code: codeOK, check: rotation(7200, t0+2*hour)},
		{name: "clear", setup: withKeyIn(stActive), typ: typPolicy, payload: policy(0), code: codeOK, check: rotation(0, 0)},
		{name: "negative", setup: withKeyIn(stActive), typ: typPolicy, payload: policy(-5), code: invalid, msg: "rotation period is -5 seconds"},
		{name: "too long", setup: withKeyIn(stActive), typ: typPolicy, payload: policy(maxPeriodSeconds + 1), code: invalid, msg: "the limit is"},
		{name: "asymmetric", setup: withEC, typ: typPolicy, payload: policy(3600), code: invalid, msg: "KEY_SPEC_EC_P256 is asymmetric and cannot rotate automatically"},
		{name: "asymmetric, none", setup: withEC, typ: typPolicy, payload: policy(0), code: codeOK, check: rotation(0, 0)},
		{name: "unknown key", typ: typPolicy, payload: policy(60), code: notFound, msg: "does not exist"},
	})
	// A re-enabled key that missed its rotation is due at once.
	a := newApplier(t)
	withKeyIn(stDisabled)(a)
	a.now = t0 + 3*day
	if len(a.s.dueRotations(a.now, 0)) != 0 {
		t.Fatalf("a disabled key is due")
	}
	a.mustOK(typEnabled, &fsmpb.SetKeyEnabled{KeyId: k1, Enabled: true})
	if got := a.s.dueRotations(a.now, 0); len(got) != 1 {
		t.Fatalf("re-enabled overdue key not due: %v", got)
	}
}

func TestDestruction(t *testing.T) {
	schedule := func(w int64) *fsmpb.ScheduleDestruction {
		return &fsmpb.ScheduleDestruction{KeyId: k1, PendingWindowSeconds: w}
	}
	runCases(t, []applyCase{
		{name: "schedule", setup: withKeyIn(stActive), typ: typSchedule, payload: schedule(7 * 86400), env: env{at: t0 + hour}, code: codeOK,
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				rec := s.keys[k1]
				if rec.GetState() != stPending || rec.GetDestroyAfterUnixNano() != t0+hour+7*day || rec.GetNextRotationUnixNano() != 0 {
					t.Fatalf("record = %v", rec)
				}
				if len(s.dueRotations(t0+30*day, 0)) != 0 {
					t.Fatalf("a key pending destruction is due for rotation")
				}
			}},
		{name: "schedule with window 0", setup: withKeyIn(stActive), typ: typSchedule, payload: schedule(0), code: invalid, msg: "must be positive"},
		{name: "schedule with negative window", setup: withKeyIn(stActive), typ: typSchedule, payload: schedule(-1), code: invalid, msg: "must be positive"},
		{name: "schedule with huge window", setup: withKeyIn(stActive), typ: typSchedule, payload: schedule(maxPeriodSeconds + 1), code: invalid, msg: "the limit is"},
		{name: "schedule twice", setup: withKeyIn(stPending), typ: typSchedule, payload: schedule(60), code: precondition,
			msg: "already PENDING_DESTRUCTION (due at 2023-11-14T23:13:20Z); cancel it first to reschedule"},
		{name: "schedule unknown key", typ: typSchedule, payload: schedule(60), code: notFound, msg: "does not exist"},
		{name: "cancel", setup: withKeyIn(stPending), typ: typCancel, payload: &fsmpb.CancelDestruction{KeyId: k1}, env: env{at: t0 + 10}, code: codeOK,
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				rec := s.keys[k1]
				if rec.GetState() != stDisabled || rec.GetDestroyAfterUnixNano() != 0 || rec.GetNextRotationUnixNano() != t0+10+day {
					t.Fatalf("record = %v", rec)
				}
			}},
		{name: "cancel on a deactivated key keeps it revoked", setup: func(a *applier) { withKeyIn(stDeactivated)(a); driveTo(a, k1, stPending) },
			typ: typCancel, payload: &fsmpb.CancelDestruction{KeyId: k1}, code: codeOK, check: keyState(stDeactivated)},
		{name: "cancel on a compromised key keeps it revoked", setup: func(a *applier) { withKeyIn(stCompromised)(a); driveTo(a, k1, stPending) },
			typ: typCancel, payload: &fsmpb.CancelDestruction{KeyId: k1}, code: codeOK,
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				if rec := s.keys[k1]; rec.GetState() != stCompromised || rec.GetNextRotationUnixNano() != 0 {
					t.Fatalf("record = %v", rec)
				}
			}},
		{name: "cancel unknown key", typ: typCancel, payload: &fsmpb.CancelDestruction{KeyId: k1}, code: notFound, msg: "does not exist"},
		{name: "destroy before due", setup: withKeyIn(stPending), typ: typDestroy, payload: &fsmpb.DestroyKey{KeyId: k1},
			env: env{at: t0 + hour - 1}, code: precondition, msg: "is not due for destruction until 2023-11-14T23:13:20Z; nothing changed"},
		{name: "destroy exactly when due", setup: withKeyIn(stPending), typ: typDestroy, payload: &fsmpb.DestroyKey{KeyId: k1},
			env: env{at: t0 + hour}, code: codeOK, check: keyState(stDestroyed)},
		{name: "destroy unknown key", typ: typDestroy, payload: &fsmpb.DestroyKey{KeyId: k1}, code: notFound, msg: "does not exist"},
	})
}

// After DESTROY_KEY the tombstone keeps what audit needs and no byte of the
// state or its snapshot holds the key's wrapped material.
func TestDestroyTombstone(t *testing.T) {
	f := New(Config{})
	a := newApplier(t)
	var index uint64
	apply := func(typ fsmpb.CommandType, payload proto.Message, e env) *fsmpb.Result {
		t.Helper()
		index++
		return f.Apply(logOf(t, index, a.command(typ, payload, e))).(*fsmpb.Result)
	}
	mustOK := func(typ fsmpb.CommandType, payload proto.Message, e env) {
		t.Helper()
		checkResult(t, apply(typ, payload, e), codeOK, "")
	}
	mustOK(typInit, initPayload(), env{})
	mustOK(typCreate, with(createKeyPayload(k1), func(p *fsmpb.CreateKey) {
		p.Alias, p.Description, p.Tags = "doomed", "secret project", map[string]string{"team": "x"}
		p.Spec, p.Usage, p.PublicKeyDer = fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, []byte("pub-v1")
	}), env{requestID: "create", principal: "alice"})
	mustOK(typRotate, with(rotatePayload(k1, 2), func(p *fsmpb.RotateKey) { p.PublicKeyDer = []byte("pub-v2") }), env{requestID: "rotate", at: t0 + hour})
	mustOK(typCreate, createKeyPayload(k2), env{}) // a bystander keeps its material
	mustOK(typRevoke, &fsmpb.RevokeKey{KeyId: k1, Reason: reasonCompromised, Comment: "leaked"}, env{at: t0 + 2*hour})
	mustOK(typSchedule, &fsmpb.ScheduleDestruction{KeyId: k1, PendingWindowSeconds: 86400}, env{requestID: "schedule", at: t0 + 3*hour})
	checkResult(t, apply(typDestroy, &fsmpb.DestroyKey{KeyId: k1}, env{at: t0 + 27*hour - 1}), precondition, "not due")

	materials := [][]byte{[]byte("wrapped-material-" + k1), []byte("wrapped-material-" + k1 + "-v2")}
	before := snapshotBytes(t, f)
	for _, m := range materials {
		if !bytes.Contains(before, m) {
			t.Fatalf("test premise: snapshot lacks %q before destruction", m)
		}
	}
	if due := f.DueDestructions(t0+27*hour, 0); len(due) != 1 || due[0].GetKeyId() != k1 {
		t.Fatalf("DueDestructions = %v", due)
	}

	destroyAt := t0 + 27*hour
	res := apply(typDestroy, &fsmpb.DestroyKey{KeyId: k1}, env{requestID: "destroy", at: destroyAt})
	checkResult(t, res, codeOK, "")
	noMaterialInResult(t, res)

	rec, ok := f.Key(k1)
	if !ok {
		t.Fatal("tombstone missing")
	}
	want := &fsmpb.KeyRecord{
		KeyId: k1, Spec: fsmpb.KeySpec_KEY_SPEC_RSA_2048, Usage: fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, State: stDestroyed,
		CreatedUnixNano: t0, UpdatedUnixNano: destroyAt, CreatedBy: "alice", PrimaryVersion: 2,
		Origin: fsmpb.KeyOrigin_KEY_ORIGIN_GENERATED, RevocationReason: reasonCompromised, RevocationComment: "leaked",
		RevokedUnixNano: t0 + 2*hour, DestroyAfterUnixNano: destroyAt, DestroyedUnixNano: destroyAt,
		Versions: []*fsmpb.KeyVersion{
			{Version: 1, CreatedUnixNano: t0, State: verDestroyed, PublicKeyDer: []byte("pub-v1"), DestroyedUnixNano: destroyAt},
			{Version: 2, CreatedUnixNano: t0 + hour, State: verDestroyed, PublicKeyDer: []byte("pub-v2"), DestroyedUnixNano: destroyAt},
		},
	}
	if !proto.Equal(rec, want) {
		t.Fatalf("tombstone = %v\nwant %v", rec, want)
	}
	if _, ok := f.Key("doomed"); ok {
		t.Fatalf("alias survived destruction")
	}
	if len(f.DueDestructions(destroyAt+day, 0)) != 0 {
		t.Fatalf("destroyed key still due for destruction")
	}
	// Destroying again is refused and changes nothing.
	checkResult(t, apply(typDestroy, &fsmpb.DestroyKey{KeyId: k1}, env{at: destroyAt + 1}), precondition, "is DESTROYED")

	after := snapshotBytes(t, f)
	for _, m := range materials {
		if bytes.Contains(after, m) {
			t.Fatalf("snapshot still holds %q after destruction", m)
		}
	}
	if !bytes.Contains(after, []byte("wrapped-material-"+k2)) {
		t.Fatalf("the bystander key lost its material")
	}
	// The tombstone survives a restore, which accepts it.
	g := New(Config{})
	if err := g.Restore(readCloser(after)); err != nil {
		t.Fatal(err)
	}
	if r, _ := g.Key(k1); !proto.Equal(r, want) {
		t.Fatalf("restored tombstone = %v", r)
	}
}

func TestImportTokens(t *testing.T) {
	expires := t0 + day
	const tok = "it-abcdefgh"
	withToken := func(a *applier) {
		a.mustOK(typInit, initPayload())
		a.mustOK(typImportToken, importTokenPayload(tok, expires))
	}
	withUsedToken := func(a *applier) {
		withToken(a)
		a.mustOK(typImport, importPayload(tok, k1))
	}
	token := func(fn func(*fsmpb.CreateImportToken)) *fsmpb.CreateImportToken {
		return with(importTokenPayload(tok, expires), fn)
	}
	imp := func(fn func(*fsmpb.ImportKey)) *fsmpb.ImportKey { return with(importPayload(tok, k1), fn) }
	unused := func(t *testing.T, s *State, _ *fsmpb.Result) {
		if it, _ := s.importToken(tok); it.GetUsedByKey() != "" || it.GetPrivateKey() == nil {
			t.Fatalf("a failed import touched the token: %v", it)
		}
	}
	runCases(t, []applyCase{
		{name: "create token", typ: typImportToken, payload: importTokenPayload(tok, expires), env: env{principal: "ops"}, code: codeOK,
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				want := &fsmpb.ImportToken{TokenId: tok, PublicKeyDer: []byte("import-pub-" + tok), PrivateKey: blob("wrapped-import-private-" + tok),
					ExpiresUnixNano: expires, Spec: fsmpb.KeySpec_KEY_SPEC_AES_256, CreatedUnixNano: t0, CreatedBy: "ops"}
				if it, _ := s.importToken(tok); !proto.Equal(it, want) {
					t.Fatalf("token = %v", it)
				}
			}},
		{name: "create before init", setup: uninitialised, typ: typImportToken, payload: importTokenPayload(tok, expires), code: precondition, msg: "not initialised"},
		{name: "short id", typ: typImportToken, payload: token(func(p *fsmpb.CreateImportToken) { p.TokenId = "it-abc" }), code: invalid, msg: "is malformed"},
		{name: "uppercase id", typ: typImportToken, payload: token(func(p *fsmpb.CreateImportToken) { p.TokenId = "it-ABCDEFGH" }), code: invalid, msg: "is malformed"},
		{name: "id without prefix", typ: typImportToken, payload: token(func(p *fsmpb.CreateImportToken) { p.TokenId = "tok-abcdefgh" }), code: invalid, msg: "is malformed"},
		{name: "duplicate id", setup: withToken, typ: typImportToken, payload: importTokenPayload(tok, expires), code: exists, msg: "import token " + tok + " already exists"},
		{name: "no public key", typ: typImportToken, payload: token(func(p *fsmpb.CreateImportToken) { p.PublicKeyDer = nil }), code: invalid, msg: "public key is required"},
		{name: "public key too big", typ: typImportToken, payload: token(func(p *fsmpb.CreateImportToken) { p.PublicKeyDer = make([]byte, maxPublicKeyLen+1) }),
			code: invalid, msg: "public key is 16385 bytes"},
		{name: "no private key", typ: typImportToken, payload: token(func(p *fsmpb.CreateImportToken) { p.PrivateKey = nil }), code: invalid,
			msg: "import token private key is required"},
		{name: "empty private key", typ: typImportToken, payload: token(func(p *fsmpb.CreateImportToken) { p.PrivateKey.Blob = nil }), code: invalid,
			msg: "import token private key is empty"},
		{name: "private key under unknown KEK", typ: typImportToken, payload: token(func(p *fsmpb.CreateImportToken) { p.PrivateKey.KekVersion = 4 }),
			code: invalid, msg: "import token private key is wrapped under KEK version 4, which does not exist"},
		{name: "expiry not in the future", typ: typImportToken, payload: importTokenPayload(tok, t0), code: invalid, msg: "expiry must be later"},
		{name: "unknown spec", typ: typImportToken, payload: token(func(p *fsmpb.CreateImportToken) { p.Spec = 0 }), code: invalid,
			msg: "KEY_SPEC_UNSPECIFIED is not supported"},

		{name: "import", setup: withToken, typ: typImport, payload: importPayload(tok, k1), env: env{principal: "carol"}, code: codeOK,
			check: func(t *testing.T, s *State, res *fsmpb.Result) {
				rec := s.keys[k1]
				if rec.GetOrigin() != fsmpb.KeyOrigin_KEY_ORIGIN_IMPORTED || rec.GetState() != stActive || rec.GetCreatedBy() != "carol" ||
					rec.GetVersions()[0].GetMaterial() == nil {
					t.Fatalf("record = %v", rec)
				}
				it, _ := s.importToken(tok)
				if it.GetUsedByKey() != k1 || it.GetPrivateKey() != nil {
					t.Fatalf("token after use = %v", it)
				}
				noMaterialInResult(t, res)
			}},
		{name: "import before init", setup: uninitialised, typ: typImport, payload: importPayload(tok, k1), code: precondition, msg: "not initialised"},
		{name: "import with unknown token", setup: withToken, typ: typImport, payload: imp(func(p *fsmpb.ImportKey) { p.TokenId = "it-zzzzzzzz" }),
			code: denied, msg: msgBadImportToken},
		{name: "import with used token", setup: withUsedToken, typ: typImport, payload: importPayload(tok, k2), code: denied, msg: msgBadImportToken},
		{name: "import when expired", setup: withToken, typ: typImport, payload: importPayload(tok, k1), env: env{at: expires},
			code: denied, msg: msgBadImportToken},
		{name: "import without key", setup: withToken, typ: typImport, payload: imp(func(p *fsmpb.ImportKey) { p.Key = nil }), code: invalid,
			msg: "the key to import is required", check: unused},
		{name: "import another spec", setup: withToken, typ: typImport, code: invalid,
			msg:     "import token " + tok + " was made for KEY_SPEC_AES_256 keys, not KEY_SPEC_HMAC_SHA256",
			payload: imp(func(p *fsmpb.ImportKey) { p.Key.Spec = fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256 }), check: unused},
		{name: "import an invalid key", setup: withToken, typ: typImport, code: invalid, msg: "key material is required",
			payload: imp(func(p *fsmpb.ImportKey) { p.Key.Material = nil }), check: unused},
		{name: "import over an existing key", setup: func(a *applier) { withToken(a); a.mustOK(typCreate, createKeyPayload(k1)) }, typ: typImport,
			payload: importPayload(tok, k1), code: exists, msg: "already exists", check: unused},
	})
}

// An expired import token loses its private key at once (even unused) and
// its record after ImportTokenGrace, as join tokens do.
func TestImportTokenPruning(t *testing.T) {
	a := initialised(t)
	expires := t0 + hour
	a.mustOK(typImportToken, importTokenPayload("it-aaaaaaaa", expires))
	a.mustOK(typImportToken, importTokenPayload("it-bbbbbbbb", expires+1))
	a.apply(typNoop, nil, env{at: expires - 1})
	if it, _ := a.s.importToken("it-aaaaaaaa"); it.GetPrivateKey() == nil {
		t.Fatalf("private key dropped before expiry")
	}
	a.apply(typNoop, nil, env{at: expires})
	if it, ok := a.s.importToken("it-aaaaaaaa"); !ok || it.GetPrivateKey() != nil {
		t.Fatalf("expired token = %v", it)
	}
	if it, _ := a.s.importToken("it-bbbbbbbb"); it.GetPrivateKey() == nil {
		t.Fatalf("unexpired token lost its private key")
	}
	st, _ := MarshalState(a.s.ToProto())
	if bytes.Contains(st, []byte("wrapped-import-private-it-aaaaaaaa")) {
		t.Fatalf("state still holds the expired token's private key")
	}
	// A leader with a slower clock cannot revive it.
	checkResult(t, a.apply(typImport, importPayload("it-aaaaaaaa", k1), env{at: expires - hour}), denied, msgBadImportToken)

	a.apply(typNoop, nil, env{at: expires + int64(ImportTokenGrace)})
	if _, ok := a.s.importToken("it-aaaaaaaa"); !ok {
		t.Fatalf("token removed at expiry + grace")
	}
	a.apply(typNoop, nil, env{at: expires + int64(ImportTokenGrace) + 1})
	if _, ok := a.s.importToken("it-aaaaaaaa"); ok {
		t.Fatalf("token kept after expiry + grace")
	}
	if _, ok := a.s.importToken("it-bbbbbbbb"); !ok {
		t.Fatalf("later token removed too early")
	}
	a.apply(typNoop, nil, env{at: expires + int64(ImportTokenGrace) + 2})
	if a.s.importTokens.Len() != 0 || a.s.importByExpiry.Len() != 0 || a.s.importSealed.Len() != 0 {
		t.Fatalf("import token indexes not empty")
	}
}

func TestDueQueries(t *testing.T) {
	f := New(Config{})
	a := newApplier(t)
	var index uint64
	mustOK := func(typ fsmpb.CommandType, payload proto.Message) {
		t.Helper()
		index++
		checkResult(t, f.Apply(logOf(t, index, a.command(typ, payload, env{}))).(*fsmpb.Result), codeOK, "")
	}
	mustOK(typInit, initPayload())
	// Keys 1..6 rotate every 1..6 hours (created in reverse, so the index and
	// not the insertion order decides); key 7 has no period; key 8 rotates
	// hourly like key 1 (ties break by id); key 3 is disabled.
	for n := 8; n >= 1; n-- {
		p := createKeyPayload(keyID(n))
		switch {
		case n <= 6:
			p.RotationPeriodSeconds = int64(n) * 3600
		case n == 8:
			p.RotationPeriodSeconds = 3600
		}
		mustOK(typCreate, p)
	}
	mustOK(typEnabled, &fsmpb.SetKeyEnabled{KeyId: keyID(3)})
	ids := func(recs []*fsmpb.KeyRecord) string {
		var out []string
		for _, r := range recs {
			out = append(out, strings.TrimLeft(strings.TrimPrefix(r.GetKeyId(), "k-"), "0"))
		}
		return strings.Join(out, ",")
	}
	for _, tc := range []struct {
		now   int64
		limit int
		want  string
	}{
		{t0, 0, ""},
		{t0 + hour - 1, 0, ""},
		{t0 + hour, 0, "1,8"},
		{t0 + 4*hour, 0, "1,8,2,4"},
		{t0 + 10*hour, 0, "1,8,2,4,5,6"},
		{t0 + 10*hour, 3, "1,8,2"},
	} {
		if got := ids(f.DueRotations(tc.now, tc.limit)); got != tc.want {
			t.Errorf("DueRotations(+%dh, %d) = %s, want %s", (tc.now-t0)/hour, tc.limit, got, tc.want)
		}
	}
	// Destructions: keys 5 and 6 scheduled with windows of 2h and 1h.
	mustOK(typSchedule, &fsmpb.ScheduleDestruction{KeyId: keyID(5), PendingWindowSeconds: 7200})
	mustOK(typSchedule, &fsmpb.ScheduleDestruction{KeyId: keyID(6), PendingWindowSeconds: 3600})
	if got := ids(f.DueRotations(t0+10*hour, 0)); got != "1,8,2,4" {
		t.Errorf("DueRotations after scheduling = %s", got)
	}
	for _, tc := range []struct {
		now   int64
		limit int
		want  string
	}{
		{t0 + hour - 1, 0, ""},
		{t0 + hour, 0, "6"},
		{t0 + 2*hour, 0, "6,5"},
		{t0 + 2*hour, 1, "6"},
	} {
		if got := ids(f.DueDestructions(tc.now, tc.limit)); got != tc.want {
			t.Errorf("DueDestructions(+%dh, %d) = %s, want %s", (tc.now-t0)/hour, tc.limit, got, tc.want)
		}
	}
	// A restored FSM rebuilds the indexes.
	g := New(Config{})
	if err := g.Restore(readCloser(snapshotBytes(t, f))); err != nil {
		t.Fatal(err)
	}
	for _, now := range []int64{t0, t0 + hour, t0 + 3*hour, t0 + 100*hour} {
		if a, b := ids(f.DueRotations(now, 0)), ids(g.DueRotations(now, 0)); a != b {
			t.Errorf("DueRotations differ after restore: %s vs %s", a, b)
		}
		if a, b := ids(f.DueDestructions(now, 0)), ids(g.DueDestructions(now, 0)); a != b {
			t.Errorf("DueDestructions differ after restore: %s vs %s", a, b)
		}
	}
	// ImportToken read API.
	mustOK(typImportToken, importTokenPayload("it-12345678", t0+hour))
	if tok, ok := f.ImportToken("it-12345678"); !ok || tok.GetSpec() != fsmpb.KeySpec_KEY_SPEC_AES_256 {
		t.Fatalf("ImportToken = %v %v", tok, ok)
	}
	if _, ok := f.ImportToken("it-00000000"); ok {
		t.Fatalf("unknown import token found")
	}
}

// The due-query indexes always agree with a full scan, whatever the log did.
func TestDueIndexesMatchScan(t *testing.T) {
	for _, seed := range []int64{4, 5} {
		s := NewState()
		for _, l := range randomLog(t, seed, 1500) {
			cmd, err := DecodeCommand(l.Data)
			if err != nil {
				t.Fatal(err)
			}
			s.Apply(l.Index, cmd)
			if l.Index%100 != 0 {
				continue
			}
			var rot, des int
			for _, rec := range s.keys {
				if rec.GetState() == stActive && rec.GetRotationPeriodSeconds() > 0 {
					rot++
				}
				if rec.GetState() == stPending {
					des++
				}
			}
			if rot != s.rotations.Len() || des != s.destructions.Len() {
				t.Fatalf("index %d: rotations %d/%d destructions %d/%d", l.Index, s.rotations.Len(), rot, s.destructions.Len(), des)
			}
			for _, rec := range s.dueRotations(0x7fffffffffffffff, 0) {
				if s.keys[rec.GetKeyId()] != rec {
					t.Fatalf("rotation index holds a stale record of %s", rec.GetKeyId())
				}
			}
			for _, rec := range s.dueDestructions(0x7fffffffffffffff, 0) {
				if s.keys[rec.GetKeyId()] != rec {
					t.Fatalf("destruction index holds a stale record of %s", rec.GetKeyId())
				}
			}
		}
	}
}

func readCloser(b []byte) *nopCloser { return &nopCloser{bytes.NewReader(b)} }

type nopCloser struct{ *bytes.Reader }

func (nopCloser) Close() error { return nil }

// Imported material never shares a key with Cabinet-generated material:
// imported keys refuse manual and automatic rotation.
func TestImportedKeysDoNotRotate(t *testing.T) {
	a := initialised(t)
	const tok = "it-abcdefgh"
	a.mustOK(typImportToken, importTokenPayload(tok, t0+day))
	a.mustOK(typImport, importPayload(tok, k1))
	res := a.apply(typRotate, &fsmpb.RotateKey{KeyId: k1, Version: 2, Material: blob("v2")}, env{})
	if res.GetCode() != codePrecondition || !strings.Contains(res.GetMessage(), "imported material") {
		t.Fatalf("rotate imported key: %v %s", res.GetCode(), res.GetMessage())
	}
	res = a.apply(fsmpb.CommandType_COMMAND_TYPE_SET_ROTATION_POLICY, &fsmpb.SetRotationPolicy{KeyId: k1, PeriodSeconds: 86400}, env{})
	if res.GetCode() != codePrecondition {
		t.Fatalf("rotation policy on imported key: %v %s", res.GetCode(), res.GetMessage())
	}
}
