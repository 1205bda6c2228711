package fsm

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

const (
	typCreateGrant = fsmpb.CommandType_COMMAND_TYPE_CREATE_GRANT
	typRevokeGrant = fsmpb.CommandType_COMMAND_TYPE_REVOKE_GRANT
	typDeny        = fsmpb.CommandType_COMMAND_TYPE_DENY_PRINCIPAL
	typAllow       = fsmpb.CommandType_COMMAND_TYPE_ALLOW_PRINCIPAL

	opEncrypt  = fsmpb.GrantOperation_GRANT_OPERATION_ENCRYPT
	opDecrypt  = fsmpb.GrantOperation_GRANT_OPERATION_DECRYPT
	opDescribe = fsmpb.GrantOperation_GRANT_OPERATION_DESCRIBE
)

// grantID returns a valid grant id for n.
func grantID(n int) string { return fmt.Sprintf("g-%026d", n) }

func grantPayload(id, keyID, principal string, ops ...fsmpb.GrantOperation) *fsmpb.CreateGrant {
	if len(ops) == 0 {
		ops = []fsmpb.GrantOperation{opEncrypt, opDecrypt}
	}
	return &fsmpb.CreateGrant{Grant: &fsmpb.Grant{GrantId: id, KeyId: keyID, Principal: principal, Operations: ops}}
}

// withTwoKeys: an initialised cluster with k1 and k2 (AES, ACTIVE).
func withTwoKeys(a *applier) {
	a.mustOK(typInit, initPayload())
	a.mustOK(typCreate, createKeyPayload(k1))
	a.mustOK(typCreate, createKeyPayload(k2))
}

// withGrants: withTwoKeys plus grant 1 (k1 to bob), 2 (k1 to carol) and 3
// (k2 to bob).
func withGrants(a *applier) {
	withTwoKeys(a)
	a.mustOK(typCreateGrant, grantPayload(grantID(1), k1, "bob"))
	a.mustOK(typCreateGrant, grantPayload(grantID(2), k1, "carol"))
	a.mustOK(typCreateGrant, grantPayload(grantID(3), k2, "bob"))
}

// checkGrantIndexes checks every grant index against the records by id.
func checkGrantIndexes(t testing.TB, s *State) {
	t.Helper()
	n := len(s.grants)
	if s.grantOrder.Len() != n || s.grantsByKey.Len() != n || s.grantsByPrincipal.Len() != n {
		t.Fatalf("grant index sizes: %d by id, %d ordered, %d by key, %d by principal",
			n, s.grantOrder.Len(), s.grantsByKey.Len(), s.grantsByPrincipal.Len())
	}
	inFor := 0
	for k, list := range s.grantsFor {
		if len(list) == 0 {
			t.Fatalf("empty grantsFor entry %v", k)
		}
		for i, g := range list {
			if s.grants[g.GetGrantId()] != g || g.GetKeyId() != k.keyID || g.GetPrincipal() != k.principal {
				t.Fatalf("grantsFor[%v] holds %v", k, g)
			}
			if i > 0 && list[i-1].GetGrantId() >= g.GetGrantId() {
				t.Fatalf("grantsFor[%v] not sorted", k)
			}
		}
		inFor += len(list)
	}
	if inFor != n {
		t.Fatalf("grantsFor holds %d grants, want %d", inFor, n)
	}
	for id, g := range s.grants {
		if id != g.GetGrantId() {
			t.Fatalf("grant %s stored under %s", g.GetGrantId(), id)
		}
		key := s.keys[g.GetKeyId()]
		if key == nil || key.GetState() == stDestroyed {
			t.Fatalf("grant %s on missing or destroyed key %s", id, g.GetKeyId())
		}
		if !s.grantOrder.Has(g) || !s.grantsByKey.Has(g) || !s.grantsByPrincipal.Has(g) {
			t.Fatalf("grant %s missing from an index", id)
		}
	}
	if len(s.denied) != s.deniedOrder.Len() {
		t.Fatalf("deny list sizes %d/%d", len(s.denied), s.deniedOrder.Len())
	}
	for _, d := range s.listDenied() {
		if s.denied[d.GetPrincipal()] != d {
			t.Fatalf("deny list index holds a stale record of %s", d.GetPrincipal())
		}
	}
}

func grantIDs(gs []*fsmpb.Grant) string {
	var out []string
	for _, g := range gs {
		out = append(out, strings.TrimLeft(strings.TrimPrefix(g.GetGrantId(), "g-"), "0"))
	}
	return strings.Join(out, ",")
}

func TestCreateGrant(t *testing.T) {
	mutate := func(fn func(*fsmpb.Grant)) *fsmpb.CreateGrant {
		return with(grantPayload(grantID(9), k1, "bob"), func(p *fsmpb.CreateGrant) { fn(p.Grant) })
	}
	context := func(pairs, keyLen, valueLen int) map[string]string {
		m := make(map[string]string, pairs)
		for i := range pairs {
			k := fmt.Sprintf("%02d", i)
			m[k+strings.Repeat("k", keyLen-len(k))] = strings.Repeat("v", valueLen)
		}
		return m
	}
	fillKey := func(id string, n, from int) func(a *applier) {
		return func(a *applier) {
			for i := range n {
				a.mustOK(typCreateGrant, grantPayload(grantID(from+i), id, fmt.Sprint("svc-", i%7)))
			}
		}
	}
	stored := func(want *fsmpb.Grant) func(t *testing.T, s *State, res *fsmpb.Result) {
		return func(t *testing.T, s *State, res *fsmpb.Result) {
			t.Helper()
			g := s.grants[want.GetGrantId()]
			if !proto.Equal(g, want) {
				t.Fatalf("grant = %v\nwant %v", g, want)
			}
			if res.GetGrant() != g {
				t.Fatalf("result grant = %v, want the stored record", res.GetGrant())
			}
			if list := s.grantsFor[grantKey{want.GetKeyId(), want.GetPrincipal()}]; !slices.Contains(list, g) {
				t.Fatalf("grant not indexed by key and principal: %v", list)
			}
			checkGrantIndexes(t, s)
		}
	}
	runCases(t, []applyCase{
		{name: "success", setup: withTwoKeys, typ: typCreateGrant, env: env{principal: "admin:alice", at: t0 + hour}, code: codeOK,
			payload: with(grantPayload(grantID(9), k1, "bob", opDecrypt, opDescribe), func(p *fsmpb.CreateGrant) {
				p.Grant.EncryptionContextEquals = map[string]string{"tenant": "acme"}
				p.Grant.CreatedUnixNano, p.Grant.CreatedBy = 1, "forged" // set by Apply
			}),
			check: stored(&fsmpb.Grant{GrantId: grantID(9), KeyId: k1, Principal: "bob",
				Operations:              []fsmpb.GrantOperation{opDecrypt, opDescribe},
				EncryptionContextEquals: map[string]string{"tenant": "acme"}, CreatedUnixNano: t0 + hour, CreatedBy: "admin:alice"})},
		{name: "every allowed principal character and the limits", setup: withTwoKeys, typ: typCreateGrant, code: codeOK,
			payload: mutate(func(g *fsmpb.Grant) {
				g.Principal = "Svc.a_b@x:y/z-09" + strings.Repeat("p", maxPrincipalLen-16)
				g.EncryptionContextEquals = context(maxGrantContextPairs, maxGrantContextKeyLen, maxGrantContextValueLen)
				g.Operations = []fsmpb.GrantOperation{9, 8, 7, 6, 5, 4, 3, 2, 1}
			}),
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				if g := s.grants[grantID(9)]; len(g.GetPrincipal()) != maxPrincipalLen || len(g.GetOperations()) != 9 {
					t.Fatalf("grant = %v", g)
				}
			}},
		{name: "on a disabled key", setup: func(a *applier) { withTwoKeys(a); driveTo(a, k1, stDisabled) },
			typ: typCreateGrant, payload: grantPayload(grantID(9), k1, "bob"), code: codeOK},
		{name: "on a key pending destruction", setup: func(a *applier) { withTwoKeys(a); driveTo(a, k1, stPending) },
			typ: typCreateGrant, payload: grantPayload(grantID(9), k1, "bob"), code: codeOK},
		{name: "a second grant for the same key and principal", setup: withGrants, typ: typCreateGrant,
			payload: grantPayload(grantID(10), k1, "bob", opDescribe), code: codeOK,
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				if got := grantIDs(s.grantsFor[grantKey{k1, "bob"}]); got != "1,10" {
					t.Fatalf("grantsFor = %s", got)
				}
			}},

		{name: "before init", setup: uninitialised, typ: typCreateGrant, payload: grantPayload(grantID(9), k1, "bob"),
			code: precondition, msg: "not initialised"},
		{name: "no grant", setup: withTwoKeys, typ: typCreateGrant, payload: &fsmpb.CreateGrant{}, code: invalid, msg: "grant is required"},
		{name: "no grant id", setup: withTwoKeys, typ: typCreateGrant, payload: mutate(func(g *fsmpb.Grant) { g.GrantId = "" }),
			code: invalid, msg: `grant id "" is malformed: want "g-" followed by 26 lowercase letters or digits`},
		{name: "short grant id", setup: withTwoKeys, typ: typCreateGrant, payload: mutate(func(g *fsmpb.Grant) { g.GrantId = "g-abc" }),
			code: invalid, msg: `grant id "g-abc" is malformed`},
		{name: "long grant id", setup: withTwoKeys, typ: typCreateGrant, payload: mutate(func(g *fsmpb.Grant) { g.GrantId += "0" }),
			code: invalid, msg: "is malformed"},
		{name: "uppercase grant id", setup: withTwoKeys, typ: typCreateGrant,
			payload: mutate(func(g *fsmpb.Grant) { g.GrantId = "g-" + strings.Repeat("A", 26) }), code: invalid, msg: "is malformed"},
		{name: "grant id with a key prefix", setup: withTwoKeys, typ: typCreateGrant, payload: mutate(func(g *fsmpb.Grant) { g.GrantId = k2 }),
			code: invalid, msg: "is malformed"},
		{name: "grant id in use", setup: withGrants, typ: typCreateGrant, payload: grantPayload(grantID(1), k2, "dave"),
			code: exists, msg: "grant " + grantID(1) + " already exists"},
		{name: "no key id", setup: withTwoKeys, typ: typCreateGrant, payload: mutate(func(g *fsmpb.Grant) { g.KeyId = "" }),
			code: invalid, msg: "key id is required"},
		{name: "alias instead of key id", setup: withTwoKeys, typ: typCreateGrant, payload: mutate(func(g *fsmpb.Grant) { g.KeyId = "my-alias" }),
			code: invalid, msg: "commands take key ids, not aliases"},
		{name: "unknown key", setup: withTwoKeys, typ: typCreateGrant, payload: mutate(func(g *fsmpb.Grant) { g.KeyId = keyID(3) }),
			code: notFound, msg: "key " + keyID(3) + " does not exist"},
		{name: "destroyed key", setup: func(a *applier) { withTwoKeys(a); driveTo(a, k1, stDestroyed) }, typ: typCreateGrant,
			payload: grantPayload(grantID(9), k1, "bob"), code: precondition, msg: "key " + k1 + " is DESTROYED; a destroyed key cannot be granted"},
		{name: "no principal", setup: withTwoKeys, typ: typCreateGrant, payload: mutate(func(g *fsmpb.Grant) { g.Principal = "" }),
			code: invalid, msg: "principal is required"},
		{name: "principal too long", setup: withTwoKeys, typ: typCreateGrant,
			payload: mutate(func(g *fsmpb.Grant) { g.Principal = strings.Repeat("p", maxPrincipalLen+1) }), code: invalid, msg: "principal is 257 bytes; the limit is 256"},
		{name: "principal with a space", setup: withTwoKeys, typ: typCreateGrant, payload: mutate(func(g *fsmpb.Grant) { g.Principal = "bob smith" }),
			code: invalid, msg: `principal "bob smith" is malformed: use 1-256 of A-Z a-z 0-9 . _ @ : / -`},
		{name: "principal with non-ASCII", setup: withTwoKeys, typ: typCreateGrant, payload: mutate(func(g *fsmpb.Grant) { g.Principal = "bøb" }),
			code: invalid, msg: `principal "b\u00f8b" is malformed`},
		{name: "principal with a comma", setup: withTwoKeys, typ: typCreateGrant, payload: mutate(func(g *fsmpb.Grant) { g.Principal = "CN=a,O=b" }),
			code: invalid, msg: "is malformed"},
		{name: "no operations", setup: withTwoKeys, typ: typCreateGrant, payload: mutate(func(g *fsmpb.Grant) { g.Operations = nil }),
			code: invalid, msg: "a grant needs at least one operation: ENCRYPT, DECRYPT, RE_ENCRYPT, GENERATE_DATA_KEY, SIGN, VERIFY, GENERATE_MAC, VERIFY_MAC, DESCRIBE"},
		{name: "UNSPECIFIED operation", setup: withTwoKeys, typ: typCreateGrant,
			payload: mutate(func(g *fsmpb.Grant) { g.Operations = []fsmpb.GrantOperation{opEncrypt, 0} }), code: invalid, msg: "operation UNSPECIFIED is not allowed; use ENCRYPT,"},
		{name: "unknown operation", setup: withTwoKeys, typ: typCreateGrant,
			payload: mutate(func(g *fsmpb.Grant) { g.Operations = []fsmpb.GrantOperation{42} }), code: invalid, msg: "operation 42 is unknown; use ENCRYPT,"},
		{name: "negative operation", setup: withTwoKeys, typ: typCreateGrant,
			payload: mutate(func(g *fsmpb.Grant) { g.Operations = []fsmpb.GrantOperation{-1} }), code: invalid, msg: "operation -1 is unknown"},
		{name: "duplicate operation", setup: withTwoKeys, typ: typCreateGrant, code: invalid, msg: "operation DECRYPT is listed twice",
			payload: mutate(func(g *fsmpb.Grant) { g.Operations = []fsmpb.GrantOperation{opDecrypt, opEncrypt, opDecrypt} })},
		{name: "too many context pairs", setup: withTwoKeys, typ: typCreateGrant, code: invalid, msg: "encryption context constraint has 17 pairs; the limit is 16",
			payload: mutate(func(g *fsmpb.Grant) { g.EncryptionContextEquals = context(maxGrantContextPairs+1, 2, 1) })},
		{name: "empty context key", setup: withTwoKeys, typ: typCreateGrant, code: invalid, msg: "encryption context constraint keys must not be empty",
			payload: mutate(func(g *fsmpb.Grant) { g.EncryptionContextEquals = map[string]string{"": "x"} })},
		{name: "context key too long", setup: withTwoKeys, typ: typCreateGrant, code: invalid, msg: "is 257 bytes; the limit is 256",
			payload: mutate(func(g *fsmpb.Grant) { g.EncryptionContextEquals = context(1, maxGrantContextKeyLen+1, 1) })},
		{name: "context value too long", setup: withTwoKeys, typ: typCreateGrant,
			payload: mutate(func(g *fsmpb.Grant) {
				g.EncryptionContextEquals = map[string]string{"tenant": strings.Repeat("v", maxGrantContextValueLen+1)}
			}),
			code: invalid, msg: `value of encryption context constraint "tenant" is 1025 bytes; the limit is 1024`},
		{name: "empty context value is allowed", setup: withTwoKeys, typ: typCreateGrant,
			payload: mutate(func(g *fsmpb.Grant) { g.EncryptionContextEquals = map[string]string{"tenant": ""} }), code: codeOK},

		{name: "100th grant on a key", setup: func(a *applier) { withTwoKeys(a); fillKey(k1, maxGrantsPerKey-1, 100)(a) },
			typ: typCreateGrant, payload: grantPayload(grantID(9), k1, "bob"), code: codeOK},
		{name: "101st grant on a key", setup: func(a *applier) { withTwoKeys(a); fillKey(k1, maxGrantsPerKey, 100)(a) },
			typ: typCreateGrant, payload: grantPayload(grantID(9), k1, "bob"), code: precondition,
			msg: "key " + k1 + " already has 100 grants, the limit; revoke grants it no longer needs first"},
		{name: "a full key does not limit another key", setup: func(a *applier) { withTwoKeys(a); fillKey(k1, maxGrantsPerKey, 100)(a) },
			typ: typCreateGrant, payload: grantPayload(grantID(9), k2, "bob"), code: codeOK},
		{name: "after a revocation a full key takes a grant again", typ: typCreateGrant, payload: grantPayload(grantID(9), k1, "bob"), code: codeOK,
			setup: func(a *applier) {
				withTwoKeys(a)
				fillKey(k1, maxGrantsPerKey, 100)(a)
				a.mustOK(typRevokeGrant, &fsmpb.RevokeGrant{GrantId: grantID(150)})
			}},
		{name: "10001st grant in the cluster", typ: typCreateGrant, payload: grantPayload(grantID(9), k1, "bob"), code: precondition,
			msg: "the cluster already has 10000 grants, the limit",
			setup: func(a *applier) {
				withTwoKeys(a)
				for i := range maxGrants / maxGrantsPerKey {
					id := keyID(1000 + i)
					a.mustOK(typCreate, createKeyPayload(id))
					fillKey(id, maxGrantsPerKey, 100_000+i*maxGrantsPerKey)(a)
				}
			}},
	})
}

func TestRevokeGrant(t *testing.T) {
	runCases(t, []applyCase{
		{name: "success", setup: withGrants, typ: typRevokeGrant, payload: &fsmpb.RevokeGrant{GrantId: grantID(1)}, code: codeOK,
			check: func(t *testing.T, s *State, res *fsmpb.Result) {
				want := &fsmpb.Grant{GrantId: grantID(1), KeyId: k1, Principal: "bob", Operations: []fsmpb.GrantOperation{opEncrypt, opDecrypt},
					CreatedUnixNano: t0, CreatedBy: "admin"}
				if !proto.Equal(res.GetGrant(), want) {
					t.Fatalf("result grant = %v, want the removed grant %v", res.GetGrant(), want)
				}
				if _, ok := s.grants[grantID(1)]; ok {
					t.Fatalf("grant still stored")
				}
				if _, ok := s.grantsFor[grantKey{k1, "bob"}]; ok {
					t.Fatalf("grantsFor keeps an empty entry")
				}
				if got := grantIDs(s.listGrants("", "")); got != "2,3" {
					t.Fatalf("grants left = %s", got)
				}
				checkGrantIndexes(t, s)
			}},
		{name: "unknown grant", setup: withGrants, typ: typRevokeGrant, payload: &fsmpb.RevokeGrant{GrantId: grantID(7)},
			code: notFound, msg: "grant " + grantID(7) + " does not exist"},
		{name: "revoked twice", setup: func(a *applier) { withGrants(a); a.mustOK(typRevokeGrant, &fsmpb.RevokeGrant{GrantId: grantID(2)}) },
			typ: typRevokeGrant, payload: &fsmpb.RevokeGrant{GrantId: grantID(2)}, code: notFound, msg: "does not exist"},
		{name: "no grant id", setup: withGrants, typ: typRevokeGrant, payload: &fsmpb.RevokeGrant{}, code: invalid, msg: "grant id is required"},
		{name: "malformed grant id", setup: withGrants, typ: typRevokeGrant, payload: &fsmpb.RevokeGrant{GrantId: "g-1"},
			code: invalid, msg: `grant id "g-1" is malformed`},
		{name: "before init", setup: uninitialised, typ: typRevokeGrant, payload: &fsmpb.RevokeGrant{GrantId: grantID(1)},
			code: notFound, msg: "does not exist"},
	})
}

// A destroyed key's grants are removed in the same apply; scheduling and
// cancelling the destruction keeps them.
func TestGrantsRemovedWithDestroyedKey(t *testing.T) {
	a := newApplier(t)
	withGrants(a)
	a.mustOK(typCreateGrant, grantPayload(grantID(4), k1, "bob", opDescribe))
	driveTo(a, k1, stPending)
	a.mustOK(typCancel, &fsmpb.CancelDestruction{KeyId: k1})
	if got := grantIDs(a.s.grantsOfKey(k1, 0)); got != "1,2,4" {
		t.Fatalf("grants of k1 after schedule+cancel = %s", got)
	}
	a.mustOK(typSchedule, &fsmpb.ScheduleDestruction{KeyId: k1, PendingWindowSeconds: 60})
	a.now += 60 * int64(1e9)
	res := a.mustOK(typDestroy, &fsmpb.DestroyKey{KeyId: k1})
	checkResult(t, res, codeOK, "key "+k1+" destroyed; 3 grant(s) on it removed")
	if got := grantIDs(a.s.listGrants("", "")); got != "3" {
		t.Fatalf("grants after destroying k1 = %s, want only k2's", got)
	}
	if a.s.grantsFor[grantKey{k1, "bob"}] != nil || a.s.grantsFor[grantKey{k2, "bob"}] == nil {
		t.Fatalf("grantsFor = %v", a.s.grantsFor)
	}
	checkGrantIndexes(t, a.s)
	checkResult(t, a.apply(typRevokeGrant, &fsmpb.RevokeGrant{GrantId: grantID(1)}, env{}), notFound, "removed when its key was destroyed")
	checkResult(t, a.apply(typCreateGrant, grantPayload(grantID(5), k1, "bob"), env{}), precondition, "DESTROYED")
	// The state restores (StateFromProto refuses grants on destroyed keys).
	s, err := StateFromProto(a.s.ToProto())
	if err != nil {
		t.Fatal(err)
	}
	checkGrantIndexes(t, s)

	// A key destroyed without grants reports no removal.
	a.mustOK(typCreate, createKeyPayload(keyID(3)))
	driveTo(a, keyID(3), stPending)
	a.now += 2 * hour
	if res := a.mustOK(typDestroy, &fsmpb.DestroyKey{KeyId: keyID(3)}); res.GetMessage() != "" {
		t.Fatalf("message = %q", res.GetMessage())
	}
}

func TestDenyAllowPrincipal(t *testing.T) {
	deny := func(p, reason string) *fsmpb.DenyPrincipal { return &fsmpb.DenyPrincipal{Principal: p, Reason: reason} }
	denyBob := func(a *applier) {
		a.mustOK(typInit, initPayload())
		a.apply(typDeny, deny("bob", "r1"), env{principal: "admin:carol"})
	}
	isDenied := func(want *fsmpb.DeniedPrincipal) func(t *testing.T, s *State, _ *fsmpb.Result) {
		return func(t *testing.T, s *State, _ *fsmpb.Result) {
			t.Helper()
			if d := s.denied[want.GetPrincipal()]; !proto.Equal(d, want) {
				t.Fatalf("denied = %v, want %v", d, want)
			}
			checkGrantIndexes(t, s)
		}
	}
	notDenied := func(p string) func(t *testing.T, s *State, _ *fsmpb.Result) {
		return func(t *testing.T, s *State, _ *fsmpb.Result) {
			t.Helper()
			if _, ok := s.denied[p]; ok || s.deniedOrder.Len() != len(s.denied) {
				t.Fatalf("%s still denied", p)
			}
		}
	}
	runCases(t, []applyCase{
		{name: "deny", typ: typDeny, payload: deny("bob", "left the company"), env: env{principal: "admin:alice", at: t0 + hour}, code: codeOK,
			msg:   `principal "bob" is denied`,
			check: isDenied(&fsmpb.DeniedPrincipal{Principal: "bob", Reason: "left the company", DeniedUnixNano: t0 + hour, DeniedBy: "admin:alice"})},
		{name: "deny again updates reason, time and author", setup: denyBob, typ: typDeny, payload: deny("bob", "r2"),
			env: env{principal: "admin:alice", at: t0 + hour}, code: codeOK, msg: "already denied; reason and time updated",
			check: func(t *testing.T, s *State, res *fsmpb.Result) {
				isDenied(&fsmpb.DeniedPrincipal{Principal: "bob", Reason: "r2", DeniedUnixNano: t0 + hour, DeniedBy: "admin:alice"})(t, s, res)
				if len(s.listDenied()) != 1 {
					t.Fatalf("deny list = %v", s.listDenied())
				}
			}},
		{name: "deny without reason", typ: typDeny, payload: deny("svc/batch", ""), code: codeOK,
			check: isDenied(&fsmpb.DeniedPrincipal{Principal: "svc/batch", DeniedUnixNano: t0, DeniedBy: "admin"})},
		{name: "deny with the longest reason", typ: typDeny, payload: deny("bob", strings.Repeat("r", maxDenyReasonLen)), code: codeOK},
		{name: "deny works before init", setup: uninitialised, typ: typDeny, payload: deny("bob", ""), code: codeOK},
		{name: "deny a role-like name that is not yours", typ: typDeny, payload: deny("admin", ""), env: env{principal: "admin:alice"}, code: codeOK},
		{name: "deny reason too long", typ: typDeny, payload: deny("bob", strings.Repeat("r", maxDenyReasonLen+1)), code: invalid,
			msg: "deny reason is 1025 bytes; the limit is 1024"},
		{name: "deny nobody", typ: typDeny, payload: deny("", "x"), code: invalid, msg: "principal is required"},
		{name: "deny a malformed principal", typ: typDeny, payload: deny("bob smith", ""), code: invalid, msg: `principal "bob smith" is malformed`},
		{name: "deny a too long principal", typ: typDeny, payload: deny(strings.Repeat("p", maxPrincipalLen+1), ""), code: invalid, msg: "principal is 257 bytes"},
		{name: "deny yourself", typ: typDeny, payload: deny("alice", ""), env: env{principal: "admin:alice"}, code: precondition,
			msg: `you cannot deny yourself ("alice" issued this command)`},
		{name: "deny yourself when already denied", setup: denyBob, typ: typDeny, payload: deny("bob", "r2"), env: env{principal: "admin:bob"},
			code: precondition, msg: "you cannot deny yourself"},
		{name: "deny yourself: the name follows the first colon", typ: typDeny, payload: deny("svc:ci", ""), env: env{principal: "operator:svc:ci"},
			code: precondition, msg: "you cannot deny yourself"},
		{name: "deny yourself: a principal without role", typ: typDeny, payload: deny("alice", ""), env: env{principal: "alice"},
			code: precondition, msg: "you cannot deny yourself"},
		{name: "allow", setup: denyBob, typ: typAllow, payload: &fsmpb.AllowPrincipal{Principal: "bob"}, code: codeOK,
			msg: `principal "bob" is no longer denied`, check: notDenied("bob")},
		{name: "allow yourself", setup: denyBob, typ: typAllow, payload: &fsmpb.AllowPrincipal{Principal: "bob"}, env: env{principal: "admin:bob"},
			code: codeOK, check: notDenied("bob")},
		{name: "allow a principal that is not denied", setup: denyBob, typ: typAllow, payload: &fsmpb.AllowPrincipal{Principal: "carol"},
			code: notFound, msg: `principal "carol" is not denied`},
		{name: "allow twice", setup: func(a *applier) { denyBob(a); a.mustOK(typAllow, &fsmpb.AllowPrincipal{Principal: "bob"}) },
			typ: typAllow, payload: &fsmpb.AllowPrincipal{Principal: "bob"}, code: notFound, msg: "is not denied"},
		{name: "allow nobody", setup: denyBob, typ: typAllow, payload: &fsmpb.AllowPrincipal{}, code: invalid, msg: "principal is required"},
		{name: "allow a malformed principal", setup: denyBob, typ: typAllow, payload: &fsmpb.AllowPrincipal{Principal: "b\nb"},
			code: invalid, msg: `principal "b\nb" is malformed`},
	})
}

// A retried DENY_PRINCIPAL (same request id) returns the first outcome and
// does not update the record.
func TestDenyRequestIDRetry(t *testing.T) {
	a := initialised(t)
	first := a.apply(typDeny, &fsmpb.DenyPrincipal{Principal: "bob", Reason: "r1"}, env{requestID: "req"})
	checkResult(t, first, codeOK, "is denied")
	again := a.apply(typDeny, &fsmpb.DenyPrincipal{Principal: "bob", Reason: "r2"}, env{requestID: "req", at: t0 + hour})
	if !proto.Equal(first, again) || a.s.denied["bob"].GetReason() != "r1" || a.s.denied["bob"].GetDeniedUnixNano() != t0 {
		t.Fatalf("retry = %v, record %v", again, a.s.denied["bob"])
	}
}

// The FSM read API: filters, order, and that returned slices never change.
func TestGrantReadAPI(t *testing.T) {
	f := New(Config{})
	a := newApplier(t)
	var index uint64
	mustOK := func(typ fsmpb.CommandType, payload proto.Message) {
		t.Helper()
		index++
		checkResult(t, f.Apply(logOf(t, index, a.command(typ, payload, env{}))).(*fsmpb.Result), codeOK, "")
	}
	mustOK(typInit, initPayload())
	mustOK(typCreate, createKeyPayload(k1))
	mustOK(typCreate, createKeyPayload(k2))
	for _, g := range []struct {
		n         int
		key, user string
	}{{3, k1, "bob"}, {1, k1, "bob"}, {2, k1, "carol"}, {5, k2, "bob"}, {4, k2, "dave"}} {
		mustOK(typCreateGrant, grantPayload(grantID(g.n), g.key, g.user))
	}
	mustOK(typDeny, &fsmpb.DenyPrincipal{Principal: "zed"})
	mustOK(typDeny, &fsmpb.DenyPrincipal{Principal: "amy", Reason: "x"})

	for _, tc := range []struct {
		key, principal, want string
	}{
		{"", "", "1,2,3,4,5"},
		{k1, "", "1,2,3"},
		{k2, "", "4,5"},
		{"", "bob", "1,3,5"},
		{"", "dave", "4"},
		{k1, "bob", "1,3"},
		{k2, "carol", ""},
		{keyID(9), "", ""},
		{"", "nobody", ""},
	} {
		if got := grantIDs(f.Grants(tc.key, tc.principal)); got != tc.want {
			t.Errorf("Grants(%q, %q) = %s, want %s", tc.key, tc.principal, got, tc.want)
		}
		if tc.key != "" && tc.principal != "" {
			if got := grantIDs(f.GrantsFor(tc.key, tc.principal)); got != tc.want {
				t.Errorf("GrantsFor(%q, %q) = %s, want %s", tc.key, tc.principal, got, tc.want)
			}
		}
	}
	if f.GrantsFor("", "") != nil || f.GrantsFor(k1, "") != nil {
		t.Errorf("GrantsFor with an empty argument found grants")
	}
	if g, ok := f.Grant(grantID(2)); !ok || g.GetPrincipal() != "carol" || g.GetKeyId() != k1 {
		t.Errorf("Grant(2) = %v, %v", g, ok)
	}
	if _, ok := f.Grant(grantID(9)); ok {
		t.Errorf("Grant(9) found")
	}
	if d, ok := f.Denied("amy"); !ok || d.GetReason() != "x" {
		t.Errorf("Denied(amy) = %v, %v", d, ok)
	}
	if _, ok := f.Denied("bob"); ok {
		t.Errorf("Denied(bob) found")
	}
	var names []string
	for _, d := range f.DeniedPrincipals() {
		names = append(names, d.GetPrincipal())
	}
	if strings.Join(names, ",") != "amy,zed" {
		t.Errorf("DeniedPrincipals = %v", names)
	}

	// A slice from GrantsFor is a snapshot: later grants and revocations
	// replace it, never modify it; appending to it does not reach the state.
	before := f.GrantsFor(k1, "bob")
	_ = append(before, nil)
	mustOK(typCreateGrant, grantPayload(grantID(10), k1, "bob"))
	mustOK(typRevokeGrant, &fsmpb.RevokeGrant{GrantId: grantID(3)})
	if got := grantIDs(before); got != "1,3" {
		t.Errorf("an earlier GrantsFor result changed to %s", got)
	}
	if got := grantIDs(f.GrantsFor(k1, "bob")); got != "1,10" {
		t.Errorf("GrantsFor after changes = %s", got)
	}
	// Grants returns the caller's own slice.
	list := f.Grants(k1, "bob")
	list[0] = nil
	if f.GrantsFor(k1, "bob")[0] == nil {
		t.Errorf("Grants shares its slice with the state")
	}
	mustOK(typAllow, &fsmpb.AllowPrincipal{Principal: "amy"})
	if _, ok := f.Denied("amy"); ok || len(f.DeniedPrincipals()) != 1 {
		t.Errorf("amy still denied")
	}
}

// The grant and deny-list indexes always agree with the records, whatever
// the log did.
func TestGrantIndexesMatchScan(t *testing.T) {
	for _, seed := range []int64{6, 7} {
		s := NewState()
		grants := 0
		for _, l := range randomLog(t, seed, 1500) {
			cmd, err := DecodeCommand(l.Data)
			if err != nil {
				t.Fatal(err)
			}
			s.Apply(l.Index, cmd)
			grants = max(grants, len(s.grants))
			if l.Index%50 == 0 {
				checkGrantIndexes(t, s)
			}
		}
		checkGrantIndexes(t, s)
		if grants < 5 {
			t.Fatalf("seed %d: at most %d grants at once; the log does not exercise grants", seed, grants)
		}
	}
}

// Readers of the authorization API run against grants, revocations,
// key destructions, deny/allow and snapshots; -race checks the locking, and
// the readers check that what they see is consistent and that a slice they
// got earlier never changes.
func TestConcurrentGrantReads(t *testing.T) {
	f := New(Config{})
	a := newApplier(t)
	var index uint64
	apply := func(typ fsmpb.CommandType, payload proto.Message) *fsmpb.Result {
		index++
		a.now += int64(1e9)
		return f.Apply(logOf(t, index, a.command(typ, payload, env{principal: "admin:root"}))).(*fsmpb.Result)
	}
	apply(typInit, initPayload())
	const keys, users = 8, 4
	for k := range keys {
		apply(typCreate, createKeyPayload(keyID(k)))
	}

	var done atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	for r := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			type seen struct {
				list []*fsmpb.Grant
				ids  string
			}
			var kept []seen
			for i := 0; !done.Load(); i++ {
				key, user := keyID((r+i)%keys), fmt.Sprint("user", i%users)
				list := f.GrantsFor(key, user)
				for j, g := range list {
					if g.GetKeyId() != key || g.GetPrincipal() != user || (j > 0 && list[j-1].GetGrantId() >= g.GetGrantId()) {
						report(fmt.Errorf("GrantsFor(%s, %s) = %v", key, user, list))
					}
				}
				if i%64 == 0 && len(list) > 0 {
					kept = append(kept, seen{list, grantIDs(list)})
				}
				if d, ok := f.Denied(user); ok && d.GetPrincipal() != user {
					report(fmt.Errorf("Denied(%s) = %v", user, d))
				}
				if i%16 == 0 {
					all := f.Grants("", "")
					for j := 1; j < len(all); j++ {
						if all[j-1].GetGrantId() >= all[j].GetGrantId() {
							report(fmt.Errorf("Grants not sorted"))
						}
					}
					for _, g := range f.Grants(key, "") {
						if g.GetKeyId() != key {
							report(fmt.Errorf("Grants(%s) holds %v", key, g))
						}
					}
					f.Grants("", user)
					f.DeniedPrincipals()
					f.Grant(grantID(i % 200))
				}
			}
			for _, k := range kept {
				if grantIDs(k.list) != k.ids {
					report(fmt.Errorf("a GrantsFor result changed from %s to %s", k.ids, grantIDs(k.list)))
				}
			}
		}()
	}

	var persists sync.WaitGroup
	for i := range 600 {
		user := fmt.Sprint("user", i%users)
		switch i % 10 {
		case 0, 1, 2, 3, 4:
			apply(typCreateGrant, grantPayload(grantID(i), keyID(i%keys), user))
		case 5, 6:
			apply(typRevokeGrant, &fsmpb.RevokeGrant{GrantId: grantID(i - 5)})
		case 7:
			apply(typDeny, &fsmpb.DenyPrincipal{Principal: user, Reason: fmt.Sprint(i)})
		case 8:
			apply(typAllow, &fsmpb.AllowPrincipal{Principal: user})
		case 9:
			if i%100 == 99 { // destroy a key with its grants, then replace it
				id := keyID(i / 100 % keys)
				apply(typSchedule, &fsmpb.ScheduleDestruction{KeyId: id, PendingWindowSeconds: 1})
				apply(typDestroy, &fsmpb.DestroyKey{KeyId: id})
			}
			snap, err := f.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			persists.Add(1)
			go func() {
				defer persists.Done()
				defer snap.Release()
				if err := snap.Persist(&memSink{}); err != nil {
					report(err)
				}
			}()
		}
	}
	done.Store(true)
	wg.Wait()
	persists.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	f.mu.RLock()
	checkGrantIndexes(t, f.state)
	f.mu.RUnlock()
	if len(f.Grants("", "")) == 0 {
		t.Fatalf("no grants left: the test exercised nothing")
	}
}
