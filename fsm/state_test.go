package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

const (
	typInit   = fsmpb.CommandType_COMMAND_TYPE_INIT_CLUSTER
	typCreate = fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY
	typToken  = fsmpb.CommandType_COMMAND_TYPE_CREATE_JOIN_TOKEN
	typAdmit  = fsmpb.CommandType_COMMAND_TYPE_ADMIT_NODE
	typRemove = fsmpb.CommandType_COMMAND_TYPE_REMOVE_NODE
	typNoop   = fsmpb.CommandType_COMMAND_TYPE_NOOP

	codeOK = fsmpb.ResultCode_RESULT_CODE_OK
)

// applyCase is one row of a handler table: prepare a state, apply one
// command, expect a code and message, then check the state.
type applyCase struct {
	name    string
	setup   func(a *applier) // nil: an initialised cluster
	typ     fsmpb.CommandType
	payload proto.Message
	env     env
	code    fsmpb.ResultCode
	msg     string // substring of the Result message
	check   func(t *testing.T, s *State, res *fsmpb.Result)
}

func runCases(t *testing.T, cases []applyCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := newApplier(t)
			if tc.setup == nil {
				a.mustOK(typInit, initPayload())
			} else {
				tc.setup(a)
			}
			if tc.code != codeOK {
				// Housekeeping at the command's time first (it may prune),
				// so the refusal itself must change nothing.
				a.apply(typNoop, nil, env{at: tc.env.at})
			}
			before := a.s.ToProto()
			res := a.apply(tc.typ, tc.payload, tc.env)
			checkResult(t, res, tc.code, tc.msg)
			if tc.code != codeOK {
				// A rejected command changes nothing but housekeeping.
				after := a.s.ToProto()
				after.LastAppliedTimeUnixNano = before.LastAppliedTimeUnixNano
				after.Requests = before.Requests
				if !proto.Equal(before, after) {
					t.Fatalf("rejected command changed the state")
				}
			}
			if tc.check != nil {
				tc.check(t, a.s, res)
			}
		})
	}
}

func uninitialised(*applier) {}

func TestInitCluster(t *testing.T) {
	mutate := func(fn func(*fsmpb.InitCluster)) *fsmpb.InitCluster { return with(initPayload(), fn) }
	invalid := fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT
	runCases(t, []applyCase{
		{
			name: "success", setup: uninitialised, typ: typInit, payload: initPayload(), code: codeOK,
			check: func(t *testing.T, s *State, res *fsmpb.Result) {
				c := s.cluster
				if c.GetClusterId() != "c-test" || c.GetCurrentKekVersion() != 1 || c.GetCreatedUnixNano() != t0 ||
					!bytes.Equal(c.GetCaCertDer(), []byte("ca-cert-der")) || c.GetCaKey().GetKekVersion() != 1 {
					t.Fatalf("cluster = %v", c)
				}
				if k := c.GetKekVersions(); len(k) != 1 || k[0].GetState() != fsmpb.KEKState_KEK_STATE_ACTIVE ||
					k[0].GetCreatedUnixNano() != t0 || k[0].GetVersion() != 1 {
					t.Fatalf("kek versions = %v", k)
				}
				n := s.nodes["n1"]
				if n == nil || !n.GetVoter() || n.GetJoinedUnixNano() != t0 || n.GetRaftAddr() != "n1.raft:7000" {
					t.Fatalf("first node = %v", n)
				}
				if res.GetNode() != n {
					t.Fatalf("result node = %v, want the stored record", res.GetNode())
				}
			},
		},
		{name: "already initialised", typ: typInit, payload: initPayload(),
			code: fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION, msg: "cluster already initialised"},
		{name: "no cluster id", setup: uninitialised, typ: typInit, code: invalid, msg: "cluster id",
			payload: mutate(func(p *fsmpb.InitCluster) { p.ClusterId = "" })},
		{name: "cluster id with space", setup: uninitialised, typ: typInit, code: invalid, msg: "cluster id",
			payload: mutate(func(p *fsmpb.InitCluster) { p.ClusterId = "a b" })},
		{name: "cluster id too long", setup: uninitialised, typ: typInit, code: invalid, msg: "cluster id",
			payload: mutate(func(p *fsmpb.InitCluster) { p.ClusterId = strings.Repeat("c", maxIDLen+1) })},
		{name: "no CA certificate", setup: uninitialised, typ: typInit, code: invalid, msg: "CA certificate is required",
			payload: mutate(func(p *fsmpb.InitCluster) { p.CaCertDer = nil })},
		{name: "CA certificate too big", setup: uninitialised, typ: typInit, code: invalid, msg: "CA certificate is",
			payload: mutate(func(p *fsmpb.InitCluster) { p.CaCertDer = make([]byte, maxCertLen+1) })},
		{name: "no KEK", setup: uninitialised, typ: typInit, code: invalid, msg: "KEK version is required",
			payload: mutate(func(p *fsmpb.InitCluster) { p.Kek = nil })},
		{name: "KEK version not 1", setup: uninitialised, typ: typInit, code: invalid, msg: "first KEK version must be 1, got 2",
			payload: mutate(func(p *fsmpb.InitCluster) { p.Kek.Version = 2; p.CaKey.KekVersion = 2 })},
		{name: "no KEK check value", setup: uninitialised, typ: typInit, code: invalid, msg: "check value is required",
			payload: mutate(func(p *fsmpb.InitCluster) { p.Kek.CheckValue = nil })},
		{name: "KEK check value too long", setup: uninitialised, typ: typInit, code: invalid, msg: "check value is",
			payload: mutate(func(p *fsmpb.InitCluster) { p.Kek.CheckValue = make([]byte, maxCheckValueLen+1) })},
		{name: "no CA key", setup: uninitialised, typ: typInit, code: invalid, msg: "CA key is required",
			payload: mutate(func(p *fsmpb.InitCluster) { p.CaKey = nil })},
		{name: "empty CA key", setup: uninitialised, typ: typInit, code: invalid, msg: "CA key is empty",
			payload: mutate(func(p *fsmpb.InitCluster) { p.CaKey.Blob = nil })},
		{name: "CA key too big", setup: uninitialised, typ: typInit, code: invalid, msg: "CA key is",
			payload: mutate(func(p *fsmpb.InitCluster) { p.CaKey.Blob = make([]byte, maxBlobLen+1) })},
		{name: "CA key under another KEK", setup: uninitialised, typ: typInit, code: invalid,
			msg:     "CA key is wrapped under KEK version 3, but the cluster KEK is version 1",
			payload: mutate(func(p *fsmpb.InitCluster) { p.CaKey.KekVersion = 3 })},
		{name: "no first node", setup: uninitialised, typ: typInit, code: invalid, msg: "first node is required",
			payload: mutate(func(p *fsmpb.InitCluster) { p.FirstNode = nil })},
		{name: "first node without id", setup: uninitialised, typ: typInit, code: invalid, msg: "node id must be",
			payload: mutate(func(p *fsmpb.InitCluster) { p.FirstNode.NodeId = "" })},
		{name: "first node without raft address", setup: uninitialised, typ: typInit, code: invalid, msg: "no raft address",
			payload: mutate(func(p *fsmpb.InitCluster) { p.FirstNode.RaftAddr = "" })},
		{name: "first node address too long", setup: uninitialised, typ: typInit, code: invalid, msg: "addresses are limited",
			payload: mutate(func(p *fsmpb.InitCluster) { p.FirstNode.ApiAddr = strings.Repeat("a", maxAddrLen+1) })},
		{name: "first node region too long", setup: uninitialised, typ: typInit, code: invalid, msg: "region is limited",
			payload: mutate(func(p *fsmpb.InitCluster) { p.FirstNode.Region = strings.Repeat("r", maxRegionLen+1) })},
		{name: "first node without identity key", setup: uninitialised, typ: typInit, code: invalid, msg: "no identity public key",
			payload: mutate(func(p *fsmpb.InitCluster) { p.FirstNode.IdentityPublicKeyDer = nil })},
		{name: "first node identity key too big", setup: uninitialised, typ: typInit, code: invalid, msg: "identity public key is",
			payload: mutate(func(p *fsmpb.InitCluster) { p.FirstNode.IdentityPublicKeyDer = make([]byte, maxPublicKeyLen+1) })},
	})
}

func TestCreateKey(t *testing.T) {
	id := keyID(1)
	mutate := func(fn func(*fsmpb.CreateKey)) *fsmpb.CreateKey { return with(createKeyPayload(id), fn) }
	invalid := fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT
	exists := fsmpb.ResultCode_RESULT_CODE_ALREADY_EXISTS
	withKey := func(a *applier) {
		a.mustOK(typInit, initPayload())
		a.mustOK(typCreate, with(createKeyPayload(keyID(2)), func(p *fsmpb.CreateKey) { p.Alias = "taken" }))
	}
	usage := func(spec fsmpb.KeySpec, u, want fsmpb.KeyUsage) applyCase {
		return applyCase{
			name: fmt.Sprintf("%s %s", spec, u), typ: typCreate, code: codeOK,
			payload: mutate(func(p *fsmpb.CreateKey) { p.Spec = spec; p.Usage = u; p.PublicKeyDer = publicKeyFor(spec) }),
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				if got := s.keys[id].GetUsage(); got != want {
					t.Fatalf("usage = %s, want %s", got, want)
				}
				if got := s.keys[id].GetVersions()[0].GetPublicKeyDer(); !bytes.Equal(got, publicKeyFor(spec)) {
					t.Fatalf("public key = %q", got)
				}
			},
		}
	}
	badUsage := func(spec fsmpb.KeySpec, u fsmpb.KeyUsage, msg string) applyCase {
		return applyCase{
			name: fmt.Sprintf("%s %s rejected", spec, u), typ: typCreate, code: invalid, msg: msg,
			payload: mutate(func(p *fsmpb.CreateKey) { p.Spec = spec; p.Usage = u }),
		}
	}
	const (
		encrypt = fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT
		sign    = fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY
		mac     = fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC
		unspec  = fsmpb.KeyUsage_KEY_USAGE_UNSPECIFIED
	)
	manyTags := map[string]string{}
	for i := range maxTags + 1 {
		manyTags[fmt.Sprintf("t%d", i)] = "v"
	}
	cases := []applyCase{
		{
			name: "success", typ: typCreate, code: codeOK, env: env{principal: "alice"},
			payload: mutate(func(p *fsmpb.CreateKey) {
				p.Alias = "app/orders_db-key"
				p.Description = "orders"
				p.Tags = map[string]string{"team": "payments"}
			}),
			check: func(t *testing.T, s *State, res *fsmpb.Result) {
				rec, ok := s.key("app/orders_db-key")
				if !ok || rec != s.keys[id] {
					t.Fatalf("key not found by alias")
				}
				want := &fsmpb.KeyRecord{
					KeyId: id, Spec: fsmpb.KeySpec_KEY_SPEC_AES_256, Usage: encrypt,
					State: fsmpb.KeyState_KEY_STATE_ACTIVE, Alias: "app/orders_db-key", Description: "orders",
					Tags: map[string]string{"team": "payments"}, CreatedUnixNano: t0, UpdatedUnixNano: t0,
					CreatedBy: "alice", PrimaryVersion: 1, Origin: fsmpb.KeyOrigin_KEY_ORIGIN_GENERATED,
					Versions: []*fsmpb.KeyVersion{{
						Version: 1, CreatedUnixNano: t0, State: fsmpb.KeyVersionState_KEY_VERSION_STATE_ENABLED,
						Material: &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte("wrapped-material-" + id)},
					}},
				}
				if !proto.Equal(rec, want) {
					t.Fatalf("record = %v\nwant %v", rec, want)
				}
				view := proto.CloneOf(want)
				view.Versions[0].Material = nil
				if !proto.Equal(res.GetKey(), view) {
					t.Fatalf("result key = %v, want the record without material", res.GetKey())
				}
			},
		},
		{name: "not initialised", setup: uninitialised, typ: typCreate, payload: createKeyPayload(id),
			code: fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION, msg: "cluster is not initialised"},
		{name: "empty key id", typ: typCreate, code: invalid, msg: "key id \"\" is malformed",
			payload: mutate(func(p *fsmpb.CreateKey) { p.KeyId = "" })},
		{name: "uppercase key id", typ: typCreate, code: invalid, msg: "is malformed",
			payload: mutate(func(p *fsmpb.CreateKey) { p.KeyId = "k-" + strings.Repeat("A", 26) })},
		{name: "short key id", typ: typCreate, code: invalid, msg: "is malformed",
			payload: mutate(func(p *fsmpb.CreateKey) { p.KeyId = "k-abc" })},
		{name: "key id without prefix", typ: typCreate, code: invalid, msg: "is malformed",
			payload: mutate(func(p *fsmpb.CreateKey) { p.KeyId = "x-" + strings.Repeat("a", 26) })},
		{name: "duplicate key id", setup: withKey, typ: typCreate, payload: createKeyPayload(keyID(2)),
			code: exists, msg: "key " + keyID(2) + " already exists"},
		{name: "unspecified spec", typ: typCreate, code: invalid, msg: "KEY_SPEC_UNSPECIFIED is not supported",
			payload: mutate(func(p *fsmpb.CreateKey) { p.Spec = fsmpb.KeySpec_KEY_SPEC_UNSPECIFIED })},
		{name: "unknown spec", typ: typCreate, code: invalid, msg: "key spec 42 is not supported",
			payload: mutate(func(p *fsmpb.CreateKey) { p.Spec = 42 })},
		usage(fsmpb.KeySpec_KEY_SPEC_AES_256, unspec, encrypt),
		usage(fsmpb.KeySpec_KEY_SPEC_AES_256, encrypt, encrypt),
		usage(fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, unspec, mac),
		usage(fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512, mac, mac),
		usage(fsmpb.KeySpec_KEY_SPEC_RSA_2048, encrypt, encrypt),
		usage(fsmpb.KeySpec_KEY_SPEC_RSA_3072, sign, sign),
		usage(fsmpb.KeySpec_KEY_SPEC_RSA_4096, sign, sign),
		usage(fsmpb.KeySpec_KEY_SPEC_EC_P256, unspec, sign),
		usage(fsmpb.KeySpec_KEY_SPEC_EC_P384, sign, sign),
		usage(fsmpb.KeySpec_KEY_SPEC_ED25519, unspec, sign),
		badUsage(fsmpb.KeySpec_KEY_SPEC_AES_256, sign, "KEY_USAGE_SIGN_VERIFY is not allowed for key spec KEY_SPEC_AES_256"),
		badUsage(fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, encrypt, "not allowed"),
		badUsage(fsmpb.KeySpec_KEY_SPEC_RSA_2048, mac, "not allowed"),
		badUsage(fsmpb.KeySpec_KEY_SPEC_RSA_2048, unspec, "needs an explicit usage"),
		badUsage(fsmpb.KeySpec_KEY_SPEC_EC_P256, encrypt, "not allowed"),
		badUsage(fsmpb.KeySpec_KEY_SPEC_ED25519, mac, "not allowed"),
		badUsage(fsmpb.KeySpec_KEY_SPEC_AES_256, 9, "key usage 9 is not allowed"),
		{name: "alias with bad characters", typ: typCreate, code: invalid, msg: "alias \"my key\" is malformed",
			payload: mutate(func(p *fsmpb.CreateKey) { p.Alias = "my key" })},
		{name: "alias too long", typ: typCreate, code: invalid, msg: "is malformed",
			payload: mutate(func(p *fsmpb.CreateKey) { p.Alias = strings.Repeat("a", 257) })},
		{name: "alias of 256 bytes", typ: typCreate, code: codeOK,
			payload: mutate(func(p *fsmpb.CreateKey) { p.Alias = strings.Repeat("a", 256) })},
		{name: "alias like a key id", typ: typCreate, code: invalid, msg: "must not start with \"k-\"",
			payload: mutate(func(p *fsmpb.CreateKey) { p.Alias = "k-orders" })},
		{name: "alias in use", setup: withKey, typ: typCreate, code: exists,
			msg:     "alias \"taken\" is already used by key " + keyID(2),
			payload: mutate(func(p *fsmpb.CreateKey) { p.Alias = "taken" })},
		{name: "description too long", typ: typCreate, code: invalid, msg: "description is 8193 bytes",
			payload: mutate(func(p *fsmpb.CreateKey) { p.Description = strings.Repeat("d", 8193) })},
		{name: "description of 8192 bytes", typ: typCreate, code: codeOK,
			payload: mutate(func(p *fsmpb.CreateKey) { p.Description = strings.Repeat("d", 8192) })},
		{name: "too many tags", typ: typCreate, code: invalid, msg: "51 tags",
			payload: mutate(func(p *fsmpb.CreateKey) { p.Tags = manyTags })},
		{name: "empty tag key", typ: typCreate, code: invalid, msg: "tag keys must not be empty",
			payload: mutate(func(p *fsmpb.CreateKey) { p.Tags = map[string]string{"": "v"} })},
		{name: "tag key too long", typ: typCreate, code: invalid, msg: "tag key",
			payload: mutate(func(p *fsmpb.CreateKey) { p.Tags = map[string]string{strings.Repeat("k", maxTagKeyLen+1): "v"} })},
		{name: "tag value too long", typ: typCreate, code: invalid, msg: "value of tag \"a\"",
			payload: mutate(func(p *fsmpb.CreateKey) {
				p.Tags = map[string]string{"b": strings.Repeat("v", maxTagValueLen+1), "a": strings.Repeat("v", maxTagValueLen+1)}
			})},
		{name: "no material", typ: typCreate, code: invalid, msg: "key material is required",
			payload: mutate(func(p *fsmpb.CreateKey) { p.Material = nil })},
		{name: "empty material", typ: typCreate, code: invalid, msg: "key material is empty",
			payload: mutate(func(p *fsmpb.CreateKey) { p.Material.Blob = nil })},
		{name: "material too big", typ: typCreate, code: invalid, msg: "key material is",
			payload: mutate(func(p *fsmpb.CreateKey) { p.Material.Blob = make([]byte, maxBlobLen+1) })},
		{name: "asymmetric without public key", typ: typCreate, code: invalid, msg: "KEY_SPEC_EC_P256 is asymmetric: the version's public key",
			payload: mutate(func(p *fsmpb.CreateKey) { p.Spec = fsmpb.KeySpec_KEY_SPEC_EC_P256 })},
		{name: "symmetric with public key", typ: typCreate, code: invalid, msg: "KEY_SPEC_AES_256 is symmetric and has no public key",
			payload: mutate(func(p *fsmpb.CreateKey) { p.PublicKeyDer = []byte("pub") })},
		{name: "public key too big", typ: typCreate, code: invalid, msg: "public key is 16385 bytes",
			payload: mutate(func(p *fsmpb.CreateKey) {
				p.Spec = fsmpb.KeySpec_KEY_SPEC_ED25519
				p.PublicKeyDer = make([]byte, maxPublicKeyLen+1)
			})},
		{
			name: "rotation period", typ: typCreate, code: codeOK,
			payload: mutate(func(p *fsmpb.CreateKey) { p.Spec = fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512; p.RotationPeriodSeconds = 86400 }),
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				rec := s.keys[id]
				if rec.GetRotationPeriodSeconds() != 86400 || rec.GetNextRotationUnixNano() != t0+int64(24*time.Hour) {
					t.Fatalf("rotation = %d / %d", rec.GetRotationPeriodSeconds(), rec.GetNextRotationUnixNano())
				}
			},
		},
		{name: "negative rotation period", typ: typCreate, code: invalid, msg: "rotation period is -1 seconds",
			payload: mutate(func(p *fsmpb.CreateKey) { p.RotationPeriodSeconds = -1 })},
		{name: "rotation period too long", typ: typCreate, code: invalid, msg: "the limit is 3153600000",
			payload: mutate(func(p *fsmpb.CreateKey) { p.RotationPeriodSeconds = maxPeriodSeconds + 1 })},
		{name: "rotation period on asymmetric key", typ: typCreate, code: invalid, msg: "KEY_SPEC_RSA_2048 is asymmetric and cannot rotate automatically",
			payload: mutate(func(p *fsmpb.CreateKey) {
				p.Spec, p.Usage, p.PublicKeyDer, p.RotationPeriodSeconds = fsmpb.KeySpec_KEY_SPEC_RSA_2048, sign, []byte("pub"), 3600
			})},
		{name: "unknown KEK version", typ: typCreate, code: invalid, msg: "KEK version 2, which does not exist",
			payload: mutate(func(p *fsmpb.CreateKey) { p.Material.KekVersion = 2 })},
		{
			name: "retired KEK version", typ: typCreate, payload: createKeyPayload(id),
			code: fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION, msg: "KEK version 1, which is KEK_STATE_RETIRED",
			setup: func(a *applier) {
				a.mustOK(typInit, initPayload())
				c := proto.CloneOf(a.s.cluster)
				c.KekVersions[0].State = fsmpb.KEKState_KEK_STATE_RETIRED
				c.KekVersions = append(c.KekVersions, &fsmpb.KEKVersion{Version: 2, State: fsmpb.KEKState_KEK_STATE_ACTIVE})
				c.CurrentKekVersion = 2
				a.s.cluster = c
			},
		},
	}
	runCases(t, cases)
}

func TestJoinTokens(t *testing.T) {
	invalid := fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT
	denied := fsmpb.ResultCode_RESULT_CODE_PERMISSION_DENIED
	exists := fsmpb.ResultCode_RESULT_CODE_ALREADY_EXISTS
	expires := t0 + int64(time.Hour)
	withToken := func(a *applier) {
		a.mustOK(typInit, initPayload())
		a.mustOK(typToken, joinTokenPayload("tok", expires))
	}
	withUsedToken := func(a *applier) {
		withToken(a)
		a.mustOK(typAdmit, admitPayload("tok", "n2"))
	}
	admit := func(fn func(*fsmpb.AdmitNode)) *fsmpb.AdmitNode { return with(admitPayload("tok", "n2"), fn) }
	tokenUnchanged := func(t *testing.T, s *State, _ *fsmpb.Result) {
		if tok := s.tokens["tok"]; tok.GetUsedByNode() != "" {
			t.Fatalf("a failed admission used the token: %v", tok)
		}
	}
	runCases(t, []applyCase{
		{
			name: "create token", typ: typToken, payload: joinTokenPayload("tok", expires), env: env{principal: "ops"}, code: codeOK,
			check: func(t *testing.T, s *State, _ *fsmpb.Result) {
				want := &fsmpb.JoinToken{TokenId: "tok", SecretHash: secretHash[:], ExpiresUnixNano: expires,
					CreatedUnixNano: t0, CreatedBy: "ops"}
				if !proto.Equal(s.tokens["tok"], want) {
					t.Fatalf("token = %v, want %v", s.tokens["tok"], want)
				}
			},
		},
		{name: "create token before init", setup: uninitialised, typ: typToken, payload: joinTokenPayload("tok", expires),
			code: fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION, msg: "not initialised"},
		{name: "create token without id", typ: typToken, payload: joinTokenPayload("", expires), code: invalid, msg: "join token id"},
		{name: "create duplicate token", setup: withToken, typ: typToken, payload: joinTokenPayload("tok", expires),
			code: exists, msg: "join token tok already exists"},
		{name: "create token with short hash", typ: typToken, code: invalid, msg: "must be 32 bytes (SHA-256), got 31",
			payload: with(joinTokenPayload("tok", expires), func(p *fsmpb.CreateJoinToken) { p.SecretHash = p.SecretHash[:31] })},
		{name: "create token expiring now", typ: typToken, payload: joinTokenPayload("tok", t0), code: invalid, msg: "expiry"},

		{
			name: "admit", setup: withToken, typ: typAdmit, payload: admitPayload("tok", "n2"), code: codeOK,
			check: func(t *testing.T, s *State, res *fsmpb.Result) {
				n := s.nodes["n2"]
				if n == nil || !n.GetVoter() || n.GetJoinedUnixNano() != t0 || res.GetNode() != n {
					t.Fatalf("node = %v, result %v", n, res)
				}
				if s.tokens["tok"].GetUsedByNode() != "n2" {
					t.Fatalf("token not marked used: %v", s.tokens["tok"])
				}
			},
		},
		{name: "admit before init", setup: uninitialised, typ: typAdmit, payload: admitPayload("tok", "n2"),
			code: fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION, msg: "not initialised"},
		{name: "admit with unknown token", setup: withToken, typ: typAdmit, code: denied, msg: msgBadJoinToken,
			payload: admit(func(p *fsmpb.AdmitNode) { p.TokenId = "other" })},
		{name: "admit with used token", setup: withUsedToken, typ: typAdmit, code: denied, msg: msgBadJoinToken,
			payload: admitPayload("tok", "n3")},
		{name: "admit with expired token", setup: withToken, typ: typAdmit, payload: admitPayload("tok", "n2"),
			env: env{at: expires}, code: denied, msg: msgBadJoinToken, check: tokenUnchanged},
		{name: "admit with wrong secret", setup: withToken, typ: typAdmit, code: denied, msg: msgBadJoinToken,
			payload: admit(func(p *fsmpb.AdmitNode) { p.SecretHash = bytes.Repeat([]byte{7}, 32) }), check: tokenUnchanged},
		{name: "admit with short secret", setup: withToken, typ: typAdmit, code: denied, msg: msgBadJoinToken,
			payload: admit(func(p *fsmpb.AdmitNode) { p.SecretHash = p.SecretHash[:16] })},
		{name: "admit without node", setup: withToken, typ: typAdmit, code: invalid, msg: "node is required",
			payload: admit(func(p *fsmpb.AdmitNode) { p.Node = nil }), check: tokenUnchanged},
		{name: "admit without node id", setup: withToken, typ: typAdmit, code: invalid, msg: "node id must be",
			payload: admit(func(p *fsmpb.AdmitNode) { p.Node.NodeId = "" })},
		{name: "admit without identity key", setup: withToken, typ: typAdmit, code: invalid, msg: "no identity public key",
			payload: admit(func(p *fsmpb.AdmitNode) { p.Node.IdentityPublicKeyDer = nil })},
		{name: "admit an existing node id", setup: withToken, typ: typAdmit, code: exists, msg: "node \"n1\" is already a member",
			payload: admitPayload("tok", "n1"), check: tokenUnchanged},
		{name: "admit with a used raft address", setup: withToken, typ: typAdmit, code: exists,
			msg:     "raft address \"n1.raft:7000\" is already used by node \"n1\"",
			payload: admit(func(p *fsmpb.AdmitNode) { p.Node.RaftAddr = "n1.raft:7000" }), check: tokenUnchanged},
		{name: "admit with a used API address", setup: withToken, typ: typAdmit, code: exists,
			msg:     "API address \"n1.api:8443\" is already used by node \"n1\"",
			payload: admit(func(p *fsmpb.AdmitNode) { p.Node.ApiAddr = "n1.api:8443" })},
	})
}

func TestRemoveNodeAndNoop(t *testing.T) {
	runCases(t, []applyCase{
		{
			name: "remove", typ: typRemove, payload: &fsmpb.RemoveNode{NodeId: "n1"}, code: codeOK,
			check: func(t *testing.T, s *State, res *fsmpb.Result) {
				if _, ok := s.nodes["n1"]; ok || res.GetNode().GetNodeId() != "n1" {
					t.Fatalf("node still present or result %v", res)
				}
			},
		},
		{name: "remove without id", typ: typRemove, payload: &fsmpb.RemoveNode{},
			code: fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT, msg: "node id is required"},
		{name: "remove unknown node", typ: typRemove, payload: &fsmpb.RemoveNode{NodeId: "n9"},
			code: fsmpb.ResultCode_RESULT_CODE_NOT_FOUND, msg: "node \"n9\" is not a member"},
		{name: "noop", typ: typNoop, payload: &fsmpb.Noop{Padding: []byte("x")}, code: codeOK},
		{name: "noop without payload", setup: uninitialised, typ: typNoop, code: codeOK},
	})
}

// A removed node can come back with a new token.
func TestRejoinAfterRemove(t *testing.T) {
	a := initialised(t)
	a.mustOK(typToken, joinTokenPayload("tok1", t0+int64(time.Hour)))
	a.mustOK(typAdmit, admitPayload("tok1", "n2"))
	a.mustOK(typRemove, &fsmpb.RemoveNode{NodeId: "n2"})
	a.mustOK(typToken, joinTokenPayload("tok2", t0+int64(time.Hour)))
	a.mustOK(typAdmit, admitPayload("tok2", "n2"))
}

func TestEnvelope(t *testing.T) {
	invalid := fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT
	cases := []struct {
		name string
		cmd  func(a *applier) *fsmpb.Command
		code fsmpb.ResultCode
		msg  string
		halt bool
	}{
		{name: "nil command", cmd: func(*applier) *fsmpb.Command { return nil }, code: invalid, msg: "empty command"},
		{name: "format 0", code: invalid, msg: "no format", cmd: func(a *applier) *fsmpb.Command {
			c := a.command(typNoop, nil, env{})
			c.Format = 0
			return c
		}},
		{name: "format 2", halt: true, code: fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION, msg: "envelope format 2",
			cmd: func(a *applier) *fsmpb.Command { return a.command(typNoop, nil, env{format: 2}) }},
		{name: "no leader time", code: invalid, msg: "no leader time", cmd: func(a *applier) *fsmpb.Command {
			c := a.command(typNoop, nil, env{})
			c.LeaderTimeUnixNano = 0
			return c
		}},
		{name: "request id too long", code: invalid, msg: "request id is 257 bytes",
			cmd: func(a *applier) *fsmpb.Command {
				return a.command(typNoop, nil, env{requestID: strings.Repeat("r", 257)})
			}},
		{name: "principal not UTF-8", code: invalid, msg: "UTF-8",
			cmd: func(a *applier) *fsmpb.Command { return a.command(typNoop, nil, env{principal: "\xff"}) }},
		{name: "malformed payload", code: invalid, msg: "malformed CREATE_KEY payload", cmd: func(a *applier) *fsmpb.Command {
			c := a.command(typCreate, nil, env{})
			c.Payload = []byte{0xff, 0xff}
			return c
		}},
		{name: "unknown ignorable type", code: codeOK, msg: "ignored unknown command type 99",
			cmd: func(a *applier) *fsmpb.Command { return a.command(99, nil, env{ignorable: true}) }},
		{name: "unknown type", halt: true, code: fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION,
			msg: "command type 99 at index 2 is unknown to this node and not ignorable",
			cmd: func(a *applier) *fsmpb.Command { return a.command(99, nil, env{requestID: "r"}) }},
		{name: "unspecified type", halt: true, code: fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION, msg: "command type 0",
			cmd: func(a *applier) *fsmpb.Command {
				return a.command(fsmpb.CommandType_COMMAND_TYPE_UNSPECIFIED, nil, env{})
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := initialised(t)
			before := a.s.ToProto()
			res := a.applyCmd(tc.cmd(a))
			checkResult(t, res, tc.code, tc.msg)
			if tc.halt {
				if !errors.Is(a.s.Halted(), ErrUnsupportedCommand) {
					t.Fatalf("Halted() = %v, want ErrUnsupportedCommand", a.s.Halted())
				}
				if a.s.AppliedIndex() != 1 {
					t.Fatalf("applied index = %d, want 1 (the refused entry is not applied)", a.s.AppliedIndex())
				}
				if !proto.Equal(before, a.s.ToProto()) {
					t.Fatalf("halting changed the state")
				}
				// Everything after is refused, loudly, and changes nothing.
				res := a.apply(typCreate, createKeyPayload(keyID(1)), env{})
				checkResult(t, res, fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION, "index 3 refused")
				if len(a.s.keys) != 0 || a.s.AppliedIndex() != 1 {
					t.Fatalf("a halted state applied a command")
				}
				return
			}
			if a.s.Halted() != nil {
				t.Fatalf("halted: %v", a.s.Halted())
			}
			if a.s.AppliedIndex() != 2 {
				t.Fatalf("applied index = %d, want 2", a.s.AppliedIndex())
			}
		})
	}
}

// Every command type in fsm.proto has a row in the dispatch table.
func TestEveryCommandTypeHasHandler(t *testing.T) {
	for n, name := range fsmpb.CommandType_name {
		typ := fsmpb.CommandType(n)
		if _, ok := handlers[typ]; !ok && typ != fsmpb.CommandType_COMMAND_TYPE_UNSPECIFIED {
			t.Errorf("%s has no handler", name)
		}
	}
}

// A request record keeps its outcome marshalled (about a third of the
// memory of the message tree for a created key), and a retry gets exactly
// the first outcome back, even after the key changed (a replayed rotation
// must report the version it created, not the current one) and after a
// snapshot; a record from an older snapshot (whole Result) still replays.
func TestRequestRecordKeepsOutcomeCompactly(t *testing.T) {
	a := initialised(t)
	first := a.apply(typCreate, createKeyPayload(keyID(1)), env{requestID: "req-1"})
	checkResult(t, first, codeOK, "")
	rec, ok := a.s.request("req-1")
	if !ok || rec.GetResult() != nil || len(rec.GetResultBytes()) == 0 {
		t.Fatalf("request record = %v, want the outcome marshalled", rec)
	}
	rot := a.apply(fsmpb.CommandType_COMMAND_TYPE_ROTATE_KEY, &fsmpb.RotateKey{KeyId: keyID(1), Version: 2,
		Material: &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte("v2")}}, env{requestID: "rot-1"})
	checkResult(t, rot, codeOK, "")
	a.mustOK(fsmpb.CommandType_COMMAND_TYPE_ROTATE_KEY, &fsmpb.RotateKey{KeyId: keyID(1), Version: 3,
		Material: &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte("v3")}})
	if again := a.apply(typCreate, createKeyPayload(keyID(2)), env{requestID: "req-1"}); !proto.Equal(again, first) {
		t.Fatalf("replayed create = %v, want the first outcome %v", again, first)
	}
	again := a.apply(fsmpb.CommandType_COMMAND_TYPE_ROTATE_KEY, &fsmpb.RotateKey{KeyId: keyID(1), Version: 4,
		Material: &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte("v4")}}, env{requestID: "rot-1"})
	if !proto.Equal(again, rot) || again.GetKey().GetPrimaryVersion() != 2 {
		t.Fatalf("replayed rotation = %v, want the first outcome (version 2)", again)
	}
	st, err := StateFromProto(a.s.ToProto())
	if err != nil {
		t.Fatal(err)
	}
	if r, ok := st.request("rot-1"); !ok || !proto.Equal(replayResult(r), rot) {
		t.Fatalf("after a snapshot round trip: %v", r)
	}
	old := &fsmpb.RequestRecord{RequestId: "old", TimeUnixNano: t0, Result: rot}
	if !proto.Equal(replayResult(old), rot) {
		t.Fatal("a record with a whole Result does not replay it")
	}
	if r := replayResult(&fsmpb.RequestRecord{RequestId: "empty"}); r.GetCode() != codeOK {
		t.Fatalf("a record with an empty outcome replays %v", r)
	}
}

func TestIdempotency(t *testing.T) {
	t.Run("same request id twice returns the first result", func(t *testing.T) {
		a := initialised(t)
		first := a.apply(typCreate, createKeyPayload(keyID(1)), env{requestID: "req-1"})
		checkResult(t, first, codeOK, "")
		before := a.s.ToProto()
		// A retry, even one whose payload differs (a new random key id), must
		// not create a second key.
		again := a.apply(typCreate, createKeyPayload(keyID(2)), env{requestID: "req-1"})
		if !proto.Equal(first, again) {
			t.Fatalf("retry result = %v, want %v", again, first)
		}
		if len(a.s.keys) != 1 {
			t.Fatalf("%d keys, want 1", len(a.s.keys))
		}
		if !proto.Equal(before, a.s.ToProto()) {
			t.Fatalf("retry changed the state")
		}
	})
	t.Run("failures are remembered too", func(t *testing.T) {
		a := initialised(t)
		bad := a.apply(typCreate, with(createKeyPayload(keyID(1)), func(p *fsmpb.CreateKey) { p.Material = nil }), env{requestID: "r"})
		checkResult(t, bad, fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "material")
		again := a.apply(typCreate, createKeyPayload(keyID(1)), env{requestID: "r"})
		if !proto.Equal(bad, again) || len(a.s.keys) != 0 {
			t.Fatalf("retry = %v, keys %d", again, len(a.s.keys))
		}
	})
	t.Run("without request id a retry is a new command", func(t *testing.T) {
		a := initialised(t)
		a.mustOK(typCreate, createKeyPayload(keyID(1)))
		checkResult(t, a.apply(typCreate, createKeyPayload(keyID(1)), env{}), fsmpb.ResultCode_RESULT_CODE_ALREADY_EXISTS, "")
		if len(a.s.ToProto().GetRequests()) != 0 {
			t.Fatalf("stored a result for a command without request id")
		}
	})
	t.Run("records expire after 24h of leader time", func(t *testing.T) {
		a := initialised(t)
		a.apply(typCreate, createKeyPayload(keyID(1)), env{requestID: "r"})
		a.apply(typNoop, nil, env{at: t0 + int64(RequestRecordTTL)})
		if _, ok := a.s.request("r"); !ok {
			t.Fatalf("record pruned at exactly 24h")
		}
		a.apply(typNoop, nil, env{at: t0 + int64(RequestRecordTTL) + 1})
		if _, ok := a.s.request("r"); ok {
			t.Fatalf("record kept after 24h")
		}
		// The retry is now a new command, and the key exists.
		res := a.apply(typCreate, createKeyPayload(keyID(1)), env{requestID: "r", at: t0 + int64(RequestRecordTTL) + 2})
		checkResult(t, res, fsmpb.ResultCode_RESULT_CODE_ALREADY_EXISTS, "already exists")
	})
}

func TestJoinTokenPruning(t *testing.T) {
	a := initialised(t)
	expires := t0 + int64(time.Hour)
	a.mustOK(typToken, joinTokenPayload("tok", expires))
	a.apply(typNoop, nil, env{at: expires + int64(JoinTokenGrace)})
	if _, ok := a.s.tokens["tok"]; !ok {
		t.Fatalf("token pruned at expiry + grace")
	}
	a.apply(typNoop, nil, env{at: expires + int64(JoinTokenGrace) + 1})
	if _, ok := a.s.tokens["tok"]; ok {
		t.Fatalf("token kept after expiry + grace")
	}
}

func TestListKeysOrderAndPaging(t *testing.T) {
	a := initialised(t)
	for _, n := range []int{5, 3, 9, 1, 7} {
		a.mustOK(typCreate, createKeyPayload(keyID(n)))
	}
	ids := func(recs []*fsmpb.KeyRecord) string {
		var out []string
		for _, r := range recs {
			out = append(out, strings.TrimLeft(strings.TrimPrefix(r.GetKeyId(), "k-"), "0"))
		}
		return strings.Join(out, ",")
	}
	for _, tc := range []struct {
		after string
		limit int
		want  string
	}{
		{"", 0, "1,3,5,7,9"},
		{"", 2, "1,3"},
		{keyID(3), 2, "5,7"},
		{keyID(4), 0, "5,7,9"},
		{keyID(9), 10, ""},
	} {
		if got := ids(a.s.listKeys(tc.after, tc.limit)); got != tc.want {
			t.Errorf("listKeys(%q, %d) = %s, want %s", tc.after, tc.limit, got, tc.want)
		}
	}
}
