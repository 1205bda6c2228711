package keyops

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

var (
	allOps = []Operation{OpEncrypt, OpDecrypt, OpGenerateDataKey, OpReEncryptFrom, OpReEncryptTo,
		OpSign, OpVerify, OpGenerateMac, OpVerifyMac, OpGetPublicKey}
	producingOps = []Operation{OpEncrypt, OpGenerateDataKey, OpReEncryptTo, OpSign, OpGenerateMac}
	consumingOps = []Operation{OpDecrypt, OpReEncryptFrom, OpVerify, OpVerifyMac}
	allStates    = []fsmpb.KeyState{
		fsmpb.KeyState_KEY_STATE_UNSPECIFIED, fsmpb.KeyState_KEY_STATE_ACTIVE, fsmpb.KeyState_KEY_STATE_DISABLED,
		fsmpb.KeyState_KEY_STATE_DEACTIVATED, fsmpb.KeyState_KEY_STATE_COMPROMISED,
		fsmpb.KeyState_KEY_STATE_PENDING_DESTRUCTION, fsmpb.KeyState_KEY_STATE_DESTROYED, fsmpb.KeyState(99),
	}
	sentinels = []error{ErrInvalidArgument, ErrInvalidCiphertext, ErrKeyNotFound, ErrVersionNotFound, ErrKeyState, ErrUnsupported, ErrUnwrap}
)

// classOf names the sentinel err belongs to ("ok" for nil).
func classOf(err error) string {
	if err == nil {
		return "ok"
	}
	for _, s := range sentinels {
		if errors.Is(err, s) {
			return s.Error()
		}
	}
	return "unclassified: " + err.Error()
}

// expectCheck is the test's own statement of the rules of issue 3, written
// independently of rules.go: it returns the sentinel CheckOperation must
// return (nil = allowed).
func expectCheck(k *fsmpb.KeyRecord, version uint32, op Operation, override bool) error {
	spec, usage := k.GetSpec(), k.GetUsage()
	isRSA := spec == fsmpb.KeySpec_KEY_SPEC_RSA_2048 || spec == fsmpb.KeySpec_KEY_SPEC_RSA_3072 || spec == fsmpb.KeySpec_KEY_SPEC_RSA_4096
	isEC := spec == fsmpb.KeySpec_KEY_SPEC_EC_P256 || spec == fsmpb.KeySpec_KEY_SPEC_EC_P384
	isHMAC := spec == fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256 || spec == fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512
	asym := isRSA || isEC || spec == fsmpb.KeySpec_KEY_SPEC_ED25519
	enc, sign, mac := fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC

	// 1. Usage gate.
	switch op {
	case OpEncrypt, OpDecrypt, OpGenerateDataKey, OpReEncryptFrom, OpReEncryptTo:
		if usage != enc {
			return ErrInvalidArgument
		}
	case OpSign, OpVerify:
		if usage != sign {
			return ErrInvalidArgument
		}
	case OpGenerateMac, OpVerifyMac:
		if usage != mac {
			return ErrInvalidArgument
		}
	case OpGetPublicKey:
		if !asym {
			return ErrInvalidArgument
		}
	}
	fits := (spec == fsmpb.KeySpec_KEY_SPEC_AES_256 && usage == enc) || (isHMAC && usage == mac) ||
		(isRSA && (usage == enc || usage == sign)) || ((isEC || spec == fsmpb.KeySpec_KEY_SPEC_ED25519) && usage == sign)
	if !fits {
		return ErrInvalidArgument
	}
	producing, consuming := slices.Contains(producingOps, op), slices.Contains(consumingOps, op)

	// 2. Key state.
	switch k.GetState() {
	case fsmpb.KeyState_KEY_STATE_ACTIVE:
	case fsmpb.KeyState_KEY_STATE_DEACTIVATED:
		if !consuming && op != OpGetPublicKey {
			return ErrKeyState
		}
	case fsmpb.KeyState_KEY_STATE_COMPROMISED:
		if !consuming || !override {
			return ErrKeyState
		}
	default:
		return ErrKeyState
	}

	// 3. Version.
	var v *fsmpb.KeyVersion
	for _, x := range k.GetVersions() {
		if x.GetVersion() == version {
			v = x
		}
	}
	if version == 0 || v == nil {
		return ErrVersionNotFound
	}
	if producing && version != k.GetPrimaryVersion() {
		return ErrKeyState
	}
	if consuming && version < k.GetMinDecryptionVersion() {
		return ErrKeyState
	}
	if op == OpGetPublicKey {
		if v.GetState() == enabledV || v.GetState() == disabledV {
			return nil
		}
		return ErrKeyState
	}
	if v.GetState() != enabledV {
		return ErrKeyState
	}
	return nil
}

// matrixKey is a key with every kind of version: 1 enabled but below
// min_decryption_version 2, 2 enabled, 3 disabled, 4 destroyed, 5 primary,
// 6 in an unknown state.
func matrixKey(spec fsmpb.KeySpec, usage fsmpb.KeyUsage, state fsmpb.KeyState) *fsmpb.KeyRecord {
	return &fsmpb.KeyRecord{
		KeyId: "k-matrix", Spec: spec, Usage: usage, State: state, PrimaryVersion: 5, MinDecryptionVersion: 2,
		Versions: []*fsmpb.KeyVersion{
			{Version: 1, State: enabledV}, {Version: 2, State: enabledV}, {Version: 3, State: disabledV},
			{Version: 4, State: destroyedV}, {Version: 5, State: enabledV},
			{Version: 6, State: fsmpb.KeyVersionState_KEY_VERSION_STATE_UNSPECIFIED},
		},
	}
}

// TestCheckOperationMatrix checks CheckOperation against expectCheck for
// every spec x usage (valid and invalid) x key state x operation x version
// x override.
func TestCheckOperationMatrix(t *testing.T) {
	combos := slices.Clone(validCombos)
	combos = append(combos, // invalid combinations: the usage gate refuses them
		specUsage{fsmpb.KeySpec_KEY_SPEC_AES_256, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY},
		specUsage{fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT},
		specUsage{fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC},
		specUsage{fsmpb.KeySpec_KEY_SPEC_EC_P256, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT},
		specUsage{fsmpb.KeySpec_KEY_SPEC_ED25519, fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC},
		specUsage{fsmpb.KeySpec_KEY_SPEC_AES_256, fsmpb.KeyUsage_KEY_USAGE_UNSPECIFIED},
		specUsage{fsmpb.KeySpec_KEY_SPEC_UNSPECIFIED, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT},
		specUsage{fsmpb.KeySpec(99), fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY},
	)
	counts := map[string]int{}
	n := 0
	for _, c := range combos {
		for _, state := range allStates {
			k := matrixKey(c.spec, c.usage, state)
			for _, op := range allOps {
				for _, version := range []uint32{0, 1, 2, 3, 4, 5, 6, 9} {
					for _, override := range []bool{false, true} {
						n++
						got := CheckOperation(k, version, op, override)
						want := expectCheck(k, version, op, override)
						if classOf(got) != classOf(want) {
							t.Errorf("%s %s %s v%d override=%v: got %q (%v), want %q",
								c, state, op, version, override, classOf(got), got, classOf(want))
							continue
						}
						counts[classOf(got)]++
						if got != nil && !strings.Contains(got.Error(), "k-matrix") && !errors.Is(got, ErrKeyNotFound) {
							t.Errorf("%s %s %s v%d: message %q does not name the key", c, state, op, version, got)
						}
					}
				}
			}
		}
	}
	t.Logf("%d cases: %v", n, counts)
	for _, class := range []string{"ok", ErrInvalidArgument.Error(), ErrKeyState.Error(), ErrVersionNotFound.Error()} {
		if counts[class] == 0 {
			t.Errorf("no case gave %q: the matrix test is degenerate", class)
		}
	}
	// Unknown operations and a nil key.
	k := matrixKey(fsmpb.KeySpec_KEY_SPEC_AES_256, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, fsmpb.KeyState_KEY_STATE_ACTIVE)
	for _, op := range []Operation{OpUnspecified, opCount, Operation(-1), Operation(99)} {
		wantErr(t, CheckOperation(k, 5, op, true), ErrInvalidArgument)
	}
	wantErr(t, CheckOperation(nil, 5, OpDecrypt, false), ErrKeyNotFound)
}

// Specific outcomes and their messages, written out.
func TestCheckOperationExamples(t *testing.T) {
	aes := fsmpb.KeySpec_KEY_SPEC_AES_256
	rsa := fsmpb.KeySpec_KEY_SPEC_RSA_2048
	hm := fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256
	ec := fsmpb.KeySpec_KEY_SPEC_EC_P256
	enc, sign, mac := fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC
	active, disabled := fsmpb.KeyState_KEY_STATE_ACTIVE, fsmpb.KeyState_KEY_STATE_DISABLED
	deact, comp := fsmpb.KeyState_KEY_STATE_DEACTIVATED, fsmpb.KeyState_KEY_STATE_COMPROMISED
	pending, destroyed := fsmpb.KeyState_KEY_STATE_PENDING_DESTRUCTION, fsmpb.KeyState_KEY_STATE_DESTROYED
	tests := []struct {
		spec     fsmpb.KeySpec
		usage    fsmpb.KeyUsage
		state    fsmpb.KeyState
		op       Operation
		version  uint32
		override bool
		want     error
		msg      string
	}{
		{aes, enc, active, OpEncrypt, 5, false, nil, ""},
		{aes, enc, active, OpEncrypt, 2, false, ErrKeyState, "is not its primary version (5)"},
		{aes, enc, active, OpDecrypt, 2, false, nil, ""},
		{aes, enc, active, OpDecrypt, 1, false, ErrKeyState, "version 1 is below the key's minimum decryption version 2"},
		{aes, enc, active, OpReEncryptFrom, 1, true, ErrKeyState, "below the key's minimum decryption version 2"},
		{aes, enc, active, OpDecrypt, 3, false, ErrKeyState, "version 3 of key k-matrix is DISABLED; enable the version"},
		{aes, enc, active, OpDecrypt, 4, false, ErrKeyState, "version 4 of key k-matrix is DESTROYED"},
		{aes, enc, active, OpDecrypt, 6, false, ErrKeyState, "KEY_VERSION_STATE_UNSPECIFIED"},
		{aes, enc, active, OpDecrypt, 9, false, ErrVersionNotFound, "has no version 9"},
		{aes, enc, active, OpDecrypt, 0, false, ErrVersionNotFound, "no primary version"},
		{aes, enc, disabled, OpDecrypt, 5, false, ErrKeyState, "is DISABLED; enable it"},
		{aes, enc, pending, OpDecrypt, 5, true, ErrKeyState, "cancel the scheduled destruction"},
		{aes, enc, destroyed, OpDecrypt, 5, true, ErrKeyState, "destroyed keys cannot be used"},
		{aes, enc, deact, OpDecrypt, 5, false, nil, ""},
		{aes, enc, deact, OpReEncryptFrom, 2, false, nil, ""},
		{aes, enc, deact, OpEncrypt, 5, false, ErrKeyState, "DEACTIVATED (revoked); it can still decrypt and verify, but Encrypt"},
		{aes, enc, deact, OpReEncryptTo, 5, false, ErrKeyState, "but ReEncryptTo needs an active key"},
		{aes, enc, comp, OpDecrypt, 5, false, ErrKeyState, "COMPROMISED (revoked); Decrypt with it needs an administrator's explicit override"},
		{aes, enc, comp, OpDecrypt, 5, true, nil, ""},
		{aes, enc, comp, OpReEncryptFrom, 2, true, nil, ""},
		{aes, enc, comp, OpEncrypt, 5, true, ErrKeyState, "it cannot be used for Encrypt"},
		{aes, enc, comp, OpDecrypt, 3, true, ErrKeyState, "DISABLED"},
		{aes, enc, fsmpb.KeyState_KEY_STATE_UNSPECIFIED, OpDecrypt, 5, true, ErrKeyState, "KEY_STATE_UNSPECIFIED"},
		{aes, enc, active, OpGetPublicKey, 5, false, ErrInvalidArgument, "needs an asymmetric key"},
		{aes, enc, active, OpSign, 5, false, ErrInvalidArgument, "has usage ENCRYPT_DECRYPT; Sign needs a key with usage SIGN_VERIFY"},
		{aes, sign, active, OpSign, 5, false, ErrInvalidArgument, "spec AES_256 and usage SIGN_VERIFY, which do not go together"},
		{aes, enc, disabled, OpSign, 5, false, ErrInvalidArgument, "usage"}, // usage gate before state
		{hm, mac, active, OpGenerateMac, 5, false, nil, ""},
		{hm, mac, active, OpGenerateMac, 2, false, ErrKeyState, "primary"},
		{hm, mac, active, OpVerifyMac, 2, false, nil, ""},
		{hm, mac, deact, OpVerifyMac, 2, false, nil, ""},
		{hm, mac, deact, OpGenerateMac, 5, false, ErrKeyState, "DEACTIVATED"},
		{hm, mac, active, OpEncrypt, 5, false, ErrInvalidArgument, "needs a key with usage ENCRYPT_DECRYPT"},
		{rsa, enc, active, OpSign, 5, false, ErrInvalidArgument, "SIGN_VERIFY"},
		{rsa, enc, active, OpGetPublicKey, 5, false, nil, ""},
		{rsa, sign, active, OpSign, 5, false, nil, ""},
		{rsa, sign, active, OpVerify, 1, false, ErrKeyState, "below the key's minimum decryption version"},
		{rsa, sign, comp, OpVerify, 2, true, nil, ""},
		{rsa, sign, comp, OpSign, 5, true, ErrKeyState, "COMPROMISED"},
		{ec, sign, active, OpGetPublicKey, 1, false, nil, ""}, // min_decryption_version does not apply
		{ec, sign, active, OpGetPublicKey, 3, false, nil, ""}, // a disabled version's public key is served
		{ec, sign, active, OpGetPublicKey, 4, false, ErrKeyState, "DESTROYED"},
		{ec, sign, active, OpGetPublicKey, 6, false, ErrKeyState, "UNSPECIFIED"},
		{ec, sign, deact, OpGetPublicKey, 5, false, nil, ""},
		{ec, sign, comp, OpGetPublicKey, 5, true, ErrKeyState, "GetPublicKey"},
		{ec, sign, disabled, OpGetPublicKey, 5, false, ErrKeyState, "enable it"},
		{ec, sign, pending, OpVerify, 5, false, ErrKeyState, "cancel the scheduled destruction"},
		{ec, mac, active, OpVerifyMac, 5, false, ErrInvalidArgument, "do not go together"},
	}
	for _, tt := range tests {
		name := fmt.Sprintf("%s/%s/%s/%s/v%d/override=%v", specName(tt.spec), usageName(tt.usage), stateName(tt.state), tt.op, tt.version, tt.override)
		t.Run(name, func(t *testing.T) {
			err := CheckOperation(matrixKey(tt.spec, tt.usage, tt.state), tt.version, tt.op, tt.override)
			wantErr(t, err, tt.want)
			if tt.want != nil && !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("message %q does not say %q", err, tt.msg)
			}
		})
	}
}

func TestMatrixShape(t *testing.T) {
	m := Matrix()
	if !slices.Equal(m.Ops, allOps) {
		t.Fatalf("columns %v, want %v", m.Ops, allOps)
	}
	want := map[fsmpb.KeyState]string{
		// One letter per column: y allowed, - denied, o admin override.
		fsmpb.KeyState_KEY_STATE_ACTIVE:              "yyyyyyyyyy",
		fsmpb.KeyState_KEY_STATE_DISABLED:            "----------",
		fsmpb.KeyState_KEY_STATE_DEACTIVATED:         "-y-y--y-yy",
		fsmpb.KeyState_KEY_STATE_COMPROMISED:         "-o-o--o-o-",
		fsmpb.KeyState_KEY_STATE_PENDING_DESTRUCTION: "----------",
		fsmpb.KeyState_KEY_STATE_DESTROYED:           "----------",
	}
	if len(m.Rows) != len(want) {
		t.Fatalf("%d rows, want %d", len(m.Rows), len(want))
	}
	for _, r := range m.Rows {
		var b strings.Builder
		for _, c := range r.Cells {
			b.WriteByte(map[Permission]byte{Allowed: 'y', Denied: '-', WithOverride: 'o'}[c])
		}
		if b.String() != want[r.State] {
			t.Errorf("%s: %s, want %s", r.State, b.String(), want[r.State])
		}
	}
	// Matrix returns a copy.
	m.Rows[0].Cells[0] = Denied
	if Matrix().Rows[0].Cells[0] != Allowed {
		t.Fatal("Matrix() exposes the table")
	}
	for _, op := range producingOps {
		if op.VersionRule() != PrimaryOnly {
			t.Errorf("%s: %s", op, op.VersionRule())
		}
	}
	for _, op := range consumingOps {
		if op.VersionRule() != EnabledAboveMin {
			t.Errorf("%s: %s", op, op.VersionRule())
		}
	}
	if OpGetPublicKey.VersionRule() != NotDestroyed || Operation(99).VersionRule() != 0 || Operation(99).String() != "Unspecified" {
		t.Error("GetPublicKey / unknown op rules")
	}
}

const (
	statesDoc      = "../docs/KEY-STATES.md"
	statesDocBegin = "<!-- matrix:begin (generated by keyops TestKeyStatesDoc -update; do not edit) -->"
	statesDocEnd   = "<!-- matrix:end -->"
)

// renderMatrix renders Matrix() and the per-operation rules as markdown.
func renderMatrix() string {
	m := Matrix()
	var b strings.Builder
	b.WriteString("| key state |")
	for _, op := range m.Ops {
		fmt.Fprintf(&b, " %s |", op)
	}
	b.WriteString("\n| --- |")
	for range m.Ops {
		b.WriteString(" :---: |")
	}
	b.WriteString("\n")
	cell := map[Permission]string{Allowed: "yes", Denied: "—", WithOverride: "admin override"}
	for _, r := range m.Rows {
		fmt.Fprintf(&b, "| %s |", stateName(r.State))
		for _, c := range r.Cells {
			fmt.Fprintf(&b, " %s |", cell[c])
		}
		b.WriteString("\n")
	}
	b.WriteString("\n| operation | key usage | versions it may use |\n| --- | --- | --- |\n")
	for _, op := range m.Ops {
		usage := usageName(op.Usage())
		if op.Usage() == fsmpb.KeyUsage_KEY_USAGE_UNSPECIFIED {
			usage = "any, asymmetric spec (RSA, EC, Ed25519)"
		}
		fmt.Fprintf(&b, "| %s | %s | %s |\n", op, usage, op.VersionRule())
	}
	return b.String()
}

// TestKeyStatesDoc keeps docs/KEY-STATES.md in step with Matrix(); run
// `go test ./keyops -run TestKeyStatesDoc -update` after changing it.
// TestKeyStatesDoc keeps the generated matrix in docs/KEY-STATES.md and in
// the README identical to Matrix().
func TestKeyStatesDoc(t *testing.T) {
	for _, path := range []string{statesDoc, "../README.md"} {
		checkMatrixBlock(t, path)
	}
}

func checkMatrixBlock(t *testing.T, path string) {
	t.Helper()
	doc, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b, a := bytes.Index(doc, []byte(statesDocBegin)), bytes.Index(doc, []byte(statesDocEnd))
	if b < 0 || a < b {
		t.Fatalf("%s lacks the matrix markers", path)
	}
	want := statesDocBegin + "\n\n" + renderMatrix() + "\n" + statesDocEnd
	got := string(doc[b : a+len(statesDocEnd)])
	if got == want {
		return
	}
	if *update {
		out := append(append(bytes.Clone(doc[:b]), want...), doc[a+len(statesDocEnd):]...)
		if err := os.WriteFile(path, out, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatalf("%s is out of date with Matrix(); run go test ./keyops -run TestKeyStatesDoc -update\n got:\n%s\nwant:\n%s", path, got, want)
}

// engineCall is one Engine method applied to a key version.
type engineCall struct {
	name    string
	op      Operation
	version uint32 // 0: the method uses the primary
	// needs says which specs the method takes once the rules allow it
	// (others: refused with wantOther).
	needs     func(fsmpb.KeySpec) bool
	wantOther error
	run       func(k *fsmpb.KeyRecord, override bool) error
}

var errWrongResult = errors.New("operation succeeded with a wrong result")

// TestEngineMatrix drives every Engine method through every valid spec x
// usage x key state x version x override and checks each outcome against
// expectCheck (plus the method's own spec requirement), that allowed calls
// give correct results, and that refused calls never reach the Sealer.
func TestEngineMatrix(t *testing.T) {
	ctx := context.Background()
	e, s := newTestEngine(t, 0)
	isAES := func(sp fsmpb.KeySpec) bool { return sp == fsmpb.KeySpec_KEY_SPEC_AES_256 }
	isRSA := func(sp fsmpb.KeySpec) bool { return specs[sp].rsaBits > 0 }
	anySpec := func(fsmpb.KeySpec) bool { return true }
	msg := []byte("matrix message")
	versions := []uint32{1, 2, 3, 4, 5, 9}

	// A separate ACTIVE AES key: destination of ReEncryptFrom, source of
	// ReEncryptTo.
	other := newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_AES_256, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, 1)
	otherCT, _, err := e.Encrypt(ctx, other, msg, nil)
	if err != nil {
		t.Fatal(err)
	}
	total := 0
	for _, c := range validCombos {
		full := newSpecKey(t, e, c.spec, c.usage, 5)
		id := full.KeyId
		// Artifacts made by each version while it was usable.
		ct, oaep, sig, mac := map[uint32][]byte{}, map[uint32][]byte{}, map[uint32][]byte{}, map[uint32][]byte{}
		for v := uint32(1); v <= 5; v++ {
			pv := withPrimary(full, v)
			ct[v] = append(appendHeader(nil, id, v, make([]byte, saltLen)), make([]byte, 32)...)
			oaep[v] = make([]byte, 512)
			sig[v], mac[v] = []byte("not a signature"), []byte("not a mac")
			var err error
			switch {
			case c.spec == fsmpb.KeySpec_KEY_SPEC_AES_256:
				ct[v], _, err = e.Encrypt(ctx, pv, msg, nil)
			case c.usage == fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT:
				oaep[v], _, err = e.EncryptAsymmetric(ctx, pv, 0, msg)
			case c.usage == fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY:
				sig[v], _, err = e.Sign(ctx, pv, msg, MessageRaw, firstAlg(c.spec))
			default:
				mac[v], _, err = e.GenerateMac(ctx, pv, msg)
			}
			if err != nil {
				t.Fatalf("%s v%d: %v", c, v, err)
			}
		}
		ct[9] = bytes.Clone(ct[5])
		ct[9][2+len(id)+3] = 9
		oaep[9], sig[9], mac[9] = oaep[5], sig[5], mac[5]
		lookupFor := func(k *fsmpb.KeyRecord) func(string) (*fsmpb.KeyRecord, bool) { return lookupOf(k, other) }

		calls := []engineCall{
			{"Encrypt", OpEncrypt, 0, isAES, ErrInvalidArgument, func(k *fsmpb.KeyRecord, _ bool) error {
				out, _, err := e.Encrypt(ctx, k, msg, nil)
				if err == nil {
					pt, _, _, err := e.Decrypt(ctx, lookupOf(withPrimary(full, 5)), out, nil, false)
					if err != nil || !bytes.Equal(pt, msg) {
						return errWrongResult
					}
				}
				return err
			}},
			{"GenerateDataKey", OpGenerateDataKey, 0, isAES, ErrInvalidArgument, func(k *fsmpb.KeyRecord, _ bool) error {
				_, _, _, err := e.GenerateDataKey(ctx, k, 0, nil)
				return err
			}},
			{"ReEncryptTo", OpReEncryptTo, 0, isAES, ErrInvalidArgument, func(k *fsmpb.KeyRecord, _ bool) error {
				out, _, _, dv, err := e.ReEncrypt(ctx, lookupFor(k), otherCT, nil, k, nil, false)
				if err == nil {
					h, _ := ParseCiphertext(out)
					if h.KeyID != id || dv != 5 || h.Version != 5 {
						return errWrongResult
					}
				}
				return err
			}},
			{"Sign", OpSign, 0, anySpec, nil, func(k *fsmpb.KeyRecord, _ bool) error {
				out, v, err := e.Sign(ctx, k, msg, MessageRaw, firstAlg(c.spec))
				if err == nil {
					if ok, err := e.Verify(ctx, withPrimary(full, 5), v, msg, MessageRaw, firstAlg(c.spec), out, false); !ok || err != nil {
						return errWrongResult
					}
				}
				return err
			}},
			{"GenerateMac", OpGenerateMac, 0, anySpec, nil, func(k *fsmpb.KeyRecord, _ bool) error {
				out, _, err := e.GenerateMac(ctx, k, msg)
				if err == nil && !bytes.Equal(out, mac[5]) {
					return errWrongResult
				}
				return err
			}},
		}
		for _, v := range []uint32{0, 2, 9} {
			calls = append(calls, engineCall{fmt.Sprintf("EncryptAsymmetric(v%d)", v), OpEncrypt, v, isRSA, ErrInvalidArgument, func(k *fsmpb.KeyRecord, _ bool) error {
				out, got, err := e.EncryptAsymmetric(ctx, k, v, msg)
				if err == nil {
					pt, err := e.DecryptAsymmetric(ctx, withPrimary(full, 5), got, out, false)
					if err != nil || !bytes.Equal(pt, msg) {
						return errWrongResult
					}
				}
				return err
			}})
		}
		for _, v := range append([]uint32{0}, versions...) {
			calls = append(calls, engineCall{fmt.Sprintf("PublicKey(v%d)", v), OpGetPublicKey, v, anySpec, nil, func(k *fsmpb.KeyRecord, _ bool) error {
				der, err := PublicKey(k, v)
				if err == nil && !bytes.Equal(der, findVersion(full, resolveVersion(full, v)).PublicKeyDer) {
					return errWrongResult
				}
				return err
			}})
		}
		for _, v := range versions {
			calls = append(calls,
				engineCall{fmt.Sprintf("Decrypt(v%d)", v), OpDecrypt, v, isAES, ErrInvalidCiphertext, func(k *fsmpb.KeyRecord, ov bool) error {
					pt, _, got, err := e.Decrypt(ctx, lookupFor(k), ct[v], nil, ov)
					if err == nil && (!bytes.Equal(pt, msg) || got != v) {
						return errWrongResult
					}
					return err
				}},
				engineCall{fmt.Sprintf("ReEncryptFrom(v%d)", v), OpReEncryptFrom, v, isAES, ErrInvalidCiphertext, func(k *fsmpb.KeyRecord, ov bool) error {
					out, sid, sv, _, err := e.ReEncrypt(ctx, lookupFor(k), ct[v], nil, other, nil, ov)
					if err == nil {
						pt, _, _, err := e.Decrypt(ctx, lookupOf(other), out, nil, false)
						if err != nil || !bytes.Equal(pt, msg) || sid != id || sv != v {
							return errWrongResult
						}
					}
					return err
				}},
				engineCall{fmt.Sprintf("DecryptAsymmetric(v%d)", v), OpDecrypt, v, isRSA, ErrInvalidArgument, func(k *fsmpb.KeyRecord, ov bool) error {
					pt, err := e.DecryptAsymmetric(ctx, k, v, oaep[v], ov)
					if err == nil && !bytes.Equal(pt, msg) {
						return errWrongResult
					}
					return err
				}},
				engineCall{fmt.Sprintf("Verify(v%d)", v), OpVerify, v, anySpec, nil, func(k *fsmpb.KeyRecord, ov bool) error {
					ok, err := e.Verify(ctx, k, v, msg, MessageRaw, firstAlg(c.spec), sig[v], ov)
					if err == nil && !ok {
						return errWrongResult
					}
					return err
				}},
				engineCall{fmt.Sprintf("VerifyMac(v%d)", v), OpVerifyMac, v, anySpec, nil, func(k *fsmpb.KeyRecord, ov bool) error {
					ok, err := e.VerifyMac(ctx, k, v, msg, mac[v], ov)
					if err == nil && !ok {
						return errWrongResult
					}
					return err
				}},
			)
		}

		for _, state := range allStates {
			k := cloneKey(full)
			k.State = state
			k.MinDecryptionVersion = 2
			k.Versions[2].State = disabledV
			k.Versions[3].State = destroyedV
			k.Versions[3].Material = nil
			for _, call := range calls {
				for _, override := range []bool{false, true} {
					total++
					want := expectCheck(k, resolveVersion(k, call.version), call.op, override)
					if want == nil && !call.needs(c.spec) {
						want = call.wantOther
					}
					opens := s.opens.Load()
					got := call.run(k, override)
					if classOf(got) != classOf(want) {
						t.Errorf("%s %s %s override=%v: got %q (%v), want %q", c, stateName(state), call.name, override, classOf(got), got, classOf(want))
					}
					if want != nil && s.opens.Load() != opens {
						t.Errorf("%s %s %s override=%v: a refused call reached the Sealer", c, stateName(state), call.name, override)
					}
				}
			}
		}
	}
	t.Logf("%d engine calls", total)
}
