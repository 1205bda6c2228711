package keyops

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"regexp"
	"strings"
	"testing"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

func TestNewKeyID(t *testing.T) {
	re := regexp.MustCompile(`^k-[a-z0-9]{26}$`)
	seen := map[string]bool{}
	for range 1000 {
		id, err := NewKeyID()
		if err != nil {
			t.Fatal(err)
		}
		if !re.MatchString(id) {
			t.Fatalf("NewKeyID() = %q, does not match %s", id, re)
		}
		if seen[id] {
			t.Fatalf("NewKeyID() repeated %q", id)
		}
		seen[id] = true
	}
}

func TestNewConfig(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Error("New without a Sealer succeeded")
	}
	if _, err := New(Config{Sealer: newTestSealer(), CacheSize: -1}); err == nil {
		t.Error("New with a negative CacheSize succeeded")
	}
	e, err := New(Config{Sealer: newTestSealer()})
	if err != nil {
		t.Fatal(err)
	}
	if got := e.CacheStats().Capacity; got != DefaultCacheSize {
		t.Errorf("default capacity = %d, want %d", got, DefaultCacheSize)
	}
}

func TestRoundTrip(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	lookup := lookupOf(key)
	many := map[string]string{}
	for i := range MaxContextPairs {
		many[strings.Repeat("k", i+1)] = strings.Repeat("v", i)
	}
	tests := []struct {
		name      string
		plaintext []byte
		encCtx    map[string]string
		decCtx    map[string]string
	}{
		{"empty plaintext, no context", nil, nil, nil},
		{"one byte, no context", []byte{0}, nil, nil},
		{"1 KiB, nil vs empty context", bytes.Repeat([]byte("a"), 1024), nil, map[string]string{}},
		{"empty vs nil context", []byte("x"), map[string]string{}, nil},
		{"with context", []byte("attack at dawn"), map[string]string{"tenant": "acme", "purpose": "test"}, map[string]string{"purpose": "test", "tenant": "acme"}},
		{"empty context value", []byte("y"), map[string]string{"k": ""}, map[string]string{"k": ""}},
		{"64 pairs", []byte("z"), many, many},
		{"max plaintext", bytes.Repeat([]byte{0xAB}, MaxPlaintextLen), map[string]string{"a": "b"}, map[string]string{"a": "b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ct, v, err := e.Encrypt(context.Background(), key, tt.plaintext, tt.encCtx)
			if err != nil {
				t.Fatalf("Encrypt: %v", err)
			}
			if v != 1 {
				t.Errorf("version = %d, want 1", v)
			}
			if want := fixedHeaderLen + len(key.KeyId) + len(tt.plaintext) + tagLen; len(ct) != want {
				t.Errorf("len(ciphertext) = %d, want %d", len(ct), want)
			}
			h, err := ParseCiphertext(ct)
			if err != nil || h != (Header{Format: FormatV1, KeyID: key.KeyId, Version: 1}) {
				t.Errorf("ParseCiphertext = %+v, %v", h, err)
			}
			pt, id, v, err := e.Decrypt(context.Background(), lookup, ct, tt.decCtx, false)
			if err != nil {
				t.Fatalf("Decrypt: %v", err)
			}
			if !bytes.Equal(pt, tt.plaintext) || id != key.KeyId || v != 1 {
				t.Errorf("Decrypt = (%d bytes, %q, %d), want (%d bytes, %q, 1)", len(pt), id, v, len(tt.plaintext), key.KeyId)
			}
		})
	}
}

func TestEncryptSaltsDiffer(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	a, _, _ := e.Encrypt(context.Background(), key, []byte("same"), nil)
	b, _, _ := e.Encrypt(context.Background(), key, []byte("same"), nil)
	if bytes.Equal(a, b) {
		t.Fatal("two encryptions of the same plaintext are equal")
	}
}

func TestEncryptInvalidArguments(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	tooMany := map[string]string{}
	for i := range MaxContextPairs + 1 {
		tooMany[strings.Repeat("k", i+1)] = ""
	}
	tooBig := map[string]string{}
	for i := range 9 {
		tooBig[string(rune('a'+i))] = strings.Repeat("v", 1000)
	}
	tests := []struct {
		name      string
		key       *fsmpb.KeyRecord
		plaintext []byte
		encCtx    map[string]string
		want      error
	}{
		{"plaintext over 64 KiB", key, make([]byte, MaxPlaintextLen+1), nil, ErrInvalidArgument},
		{"65 context pairs", key, nil, tooMany, ErrInvalidArgument},
		{"empty context key", key, nil, map[string]string{"": "v"}, ErrInvalidArgument},
		{"context key 257 bytes", key, nil, map[string]string{strings.Repeat("k", 257): "v"}, ErrInvalidArgument},
		{"context key 256 bytes", key, nil, map[string]string{strings.Repeat("k", 256): "v"}, nil},
		{"context value 1025 bytes", key, nil, map[string]string{"k": strings.Repeat("v", 1025)}, ErrInvalidArgument},
		{"context value 1024 bytes", key, nil, map[string]string{"k": strings.Repeat("v", 1024)}, nil},
		{"context over 8 KiB", key, nil, tooBig, ErrInvalidArgument},
		{"nil key", nil, nil, nil, ErrKeyNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := e.Encrypt(context.Background(), tt.key, tt.plaintext, tt.encCtx)
			wantErr(t, err, tt.want)
			if tt.want != nil && tt.encCtx != nil {
				// Decrypt checks the context the same way.
				_, _, _, err := e.Decrypt(context.Background(), lookupOf(key), validCiphertext(t, e, key), tt.encCtx, false)
				wantErr(t, err, tt.want)
			}
		})
	}
}

func validCiphertext(t *testing.T, e *Engine, key *fsmpb.KeyRecord) []byte {
	t.Helper()
	ct, _, err := e.Encrypt(context.Background(), key, []byte("hello"), nil)
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

// Every authentication failure must look the same.
func checkAuthFailure(t *testing.T, err error) {
	t.Helper()
	if !errors.Is(err, ErrInvalidCiphertext) || err.Error() != errAuthFailed.Error() {
		t.Fatalf("error = %v, want the authentication failure", err)
	}
}

func TestDecryptTamperedFields(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 2) // versions 1 and 2, primary 2
	other := newTestKey(t, e, 2)
	lookup := lookupOf(key, other)
	encCtx := map[string]string{"tenant": "acme"}
	ct, _, err := e.Encrypt(context.Background(), key, []byte("SECRET-PLAINTEXT"), encCtx)
	if err != nil {
		t.Fatal(err)
	}
	idLen := len(key.KeyId)
	verAt := 2 + idLen
	saltAt := verAt + 4
	bodyAt := saltAt + saltLen
	tagAt := len(ct) - tagLen
	mutate := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(ct)) }
	setVersion := func(v uint32) []byte {
		return mutate(func(b []byte) []byte { binary.BigEndian.PutUint32(b[verAt:], v); return b })
	}
	tests := []struct {
		name string
		ct   []byte
		want error // nil: the authentication failure
	}{
		{"format byte", mutate(func(b []byte) []byte { b[0] = 0x03; return b }), ErrInvalidCiphertext},
		{"format byte 2 (batch)", mutate(func(b []byte) []byte { b[0] = FormatV2; return b }), nil},
		{"format byte zero", mutate(func(b []byte) []byte { b[0] = 0; return b }), ErrInvalidCiphertext},
		{"key id length zero", mutate(func(b []byte) []byte { b[1] = 0; return b }), ErrInvalidCiphertext},
		{"key id length shorter", mutate(func(b []byte) []byte { b[1]--; return b }), ErrKeyNotFound}, // a shorter, unknown id
		{"key id length longer", mutate(func(b []byte) []byte { b[1]++; return b }), ErrInvalidCiphertext},
		{"key id length 255", mutate(func(b []byte) []byte { b[1] = 255; return b }), ErrInvalidCiphertext},
		{"key id char invalid", mutate(func(b []byte) []byte { b[3] = '/'; return b }), ErrInvalidCiphertext},
		{"key id unknown", mutate(func(b []byte) []byte { b[4] = map[bool]byte{true: 'b', false: 'a'}[b[4] == 'a']; return b }), ErrKeyNotFound},
		{"key id of another key", mutate(func(b []byte) []byte { copy(b[2:], other.KeyId); return b }), nil},
		{"version zero", setVersion(0), ErrInvalidCiphertext},
		{"version other existing", setVersion(1), nil},
		{"version missing", setVersion(3), ErrVersionNotFound},
		{"salt first byte", mutate(func(b []byte) []byte { b[saltAt] ^= 1; return b }), nil},
		{"salt last byte", mutate(func(b []byte) []byte { b[bodyAt-1] ^= 0x80; return b }), nil},
		{"body", mutate(func(b []byte) []byte { b[bodyAt] ^= 1; return b }), nil},
		{"tag", mutate(func(b []byte) []byte { b[tagAt] ^= 1; return b }), nil},
		{"tag last byte", mutate(func(b []byte) []byte { b[len(b)-1] ^= 1; return b }), nil},
		{"appended byte", append(bytes.Clone(ct), 0), nil},
		{"body removed", append(bytes.Clone(ct[:bodyAt]), ct[tagAt:]...), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pt, _, _, err := e.Decrypt(context.Background(), lookup, tt.ct, encCtx, false)
			if pt != nil {
				t.Fatal("tampered ciphertext returned plaintext")
			}
			if tt.want == nil {
				checkAuthFailure(t, err)
			} else {
				wantErr(t, err, tt.want)
			}
			checkNoLeak(t, err, []byte("SECRET-PLAINTEXT"), tt.ct[min(len(tt.ct), saltAt):], materialOf(t, e.sealer.(*testSealer), key, 2))
		})
	}
}

// Flipping any single bit anywhere must make Decrypt fail.
func TestDecryptEveryBitFlip(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	lookup := lookupOf(key)
	ct, _, _ := e.Encrypt(context.Background(), key, []byte("0123456789abcdef0123"), map[string]string{"a": "b"})
	for i := range ct {
		for bit := range 8 {
			b := bytes.Clone(ct)
			b[i] ^= 1 << bit
			if pt, _, _, err := e.Decrypt(context.Background(), lookup, b, map[string]string{"a": "b"}, false); err == nil || pt != nil {
				t.Fatalf("byte %d bit %d flipped: Decrypt succeeded", i, bit)
			}
		}
	}
}

func TestDecryptWrongContext(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	lookup := lookupOf(key)
	encCtx := map[string]string{"tenant": "acme", "purpose": "backup"}
	ct, _, _ := e.Encrypt(context.Background(), key, []byte("SECRET-PLAINTEXT"), encCtx)
	ctNoCtx, _, _ := e.Encrypt(context.Background(), key, []byte("SECRET-PLAINTEXT"), nil)
	tests := []struct {
		name   string
		ct     []byte
		decCtx map[string]string
	}{
		{"missing context", ct, nil},
		{"empty context", ct, map[string]string{}},
		{"other value", ct, map[string]string{"tenant": "acme", "purpose": "restore"}},
		{"missing pair", ct, map[string]string{"tenant": "acme"}},
		{"extra pair", ct, map[string]string{"tenant": "acme", "purpose": "backup", "x": "y"}},
		{"key and value swapped", ct, map[string]string{"acme": "tenant", "purpose": "backup"}},
		{"boundary moved", ct, map[string]string{"tenant": "acmepurpose", "": "backup"}}, // invalid key: caught earlier
		{"boundary moved 2", ct, map[string]string{"tenan": "tacme", "purpose": "backup"}},
		{"context added", ctNoCtx, map[string]string{"tenant": "acme"}},
		{"empty value added", ctNoCtx, map[string]string{"tenant": ""}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, _, err := e.Decrypt(context.Background(), lookup, tt.ct, tt.decCtx, false)
			if _, ok := tt.decCtx[""]; ok {
				wantErr(t, err, ErrInvalidArgument)
				return
			}
			checkAuthFailure(t, err)
		})
	}
}

func TestDecryptTruncated(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	lookup := lookupOf(key)
	ct, _, _ := e.Encrypt(context.Background(), key, []byte("some plaintext"), nil)
	for n := range len(ct) {
		pt, _, _, err := e.Decrypt(context.Background(), lookup, ct[:n], nil, false)
		if pt != nil || !errors.Is(err, ErrInvalidCiphertext) {
			t.Fatalf("Decrypt(ct[:%d]) = %v, want ErrInvalidCiphertext", n, err)
		}
	}
	if _, _, _, err := e.Decrypt(context.Background(), lookup, make([]byte, MaxCiphertextLen+1), nil, false); !errors.Is(err, ErrInvalidCiphertext) {
		t.Fatalf("oversized ciphertext: %v", err)
	}
}

func TestDecryptUnknownKey(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	ct := validCiphertext(t, e, key)
	_, _, _, err := e.Decrypt(context.Background(), lookupOf(), ct, nil, false)
	wantErr(t, err, ErrKeyNotFound)
	if !strings.Contains(err.Error(), key.KeyId) {
		t.Errorf("message %q does not name key %s", err, key.KeyId)
	}
	// A lookup that says ok but returns nil is treated as not found.
	_, _, _, err = e.Decrypt(context.Background(), func(string) (*fsmpb.KeyRecord, bool) { return nil, true }, ct, nil, false)
	wantErr(t, err, ErrKeyNotFound)
}

func TestVersions(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	lookup := lookupOf(key)
	ct1, v, _ := e.Encrypt(context.Background(), key, []byte("one"), nil)
	if v != 1 {
		t.Fatalf("version = %d", v)
	}
	addTestVersion(t, e, key)
	ct2, v, _ := e.Encrypt(context.Background(), key, []byte("two"), nil)
	if v != 2 {
		t.Fatalf("after rotation version = %d, want 2", v)
	}
	for _, tc := range []struct {
		ct   []byte
		want string
		v    uint32
	}{{ct1, "one", 1}, {ct2, "two", 2}} {
		pt, _, v, err := e.Decrypt(context.Background(), lookup, tc.ct, nil, false)
		if err != nil || string(pt) != tc.want || v != tc.v {
			t.Fatalf("Decrypt = %q, %d, %v; want %q, %d", pt, v, err, tc.want, tc.v)
		}
	}
	// Version 1 and 2 hold different material: swapping the version in a
	// header fails authentication.
	swapped := bytes.Clone(ct1)
	binary.BigEndian.PutUint32(swapped[2+len(key.KeyId):], 2)
	_, _, _, err := e.Decrypt(context.Background(), lookup, swapped, nil, false)
	checkAuthFailure(t, err)

	key.Versions[0].State = fsmpb.KeyVersionState_KEY_VERSION_STATE_DISABLED
	_, _, _, err = e.Decrypt(context.Background(), lookup, ct1, nil, false)
	wantErr(t, err, ErrKeyState)
	key.Versions[0].State = fsmpb.KeyVersionState_KEY_VERSION_STATE_DESTROYED
	key.Versions[0].Material = nil
	_, _, _, err = e.Decrypt(context.Background(), lookup, ct1, nil, false)
	wantErr(t, err, ErrKeyState)
	if _, _, _, err := e.Decrypt(context.Background(), lookup, ct2, nil, false); err != nil {
		t.Fatalf("version 2 after version 1 destroyed: %v", err)
	}
}

func TestGenerateDataKey(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	lookup := lookupOf(key)
	encCtx := map[string]string{"bucket": "b1"}
	tests := []struct {
		n, wantLen int
		want       error
	}{
		{0, 32, nil}, {1, 1, nil}, {16, 16, nil}, {1024, 1024, nil},
		{-1, 0, ErrInvalidArgument}, {1025, 0, ErrInvalidArgument},
	}
	for _, tt := range tests {
		pt, ct, v, err := e.GenerateDataKey(context.Background(), key, tt.n, encCtx)
		wantErr(t, err, tt.want)
		if tt.want != nil {
			continue
		}
		if len(pt) != tt.wantLen || v != 1 {
			t.Fatalf("n=%d: got %d bytes, version %d", tt.n, len(pt), v)
		}
		got, _, _, err := e.Decrypt(context.Background(), lookup, ct, encCtx, false)
		if err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("n=%d: data key does not decrypt back: %v", tt.n, err)
		}
		_, _, _, err = e.Decrypt(context.Background(), lookup, ct, nil, false)
		checkAuthFailure(t, err)
	}
	a, _, _, _ := e.GenerateDataKey(context.Background(), key, 32, nil)
	b, _, _, _ := e.GenerateDataKey(context.Background(), key, 32, nil)
	if bytes.Equal(a, b) {
		t.Fatal("two data keys are equal")
	}
	key.State = fsmpb.KeyState_KEY_STATE_DISABLED
	_, _, _, err := e.GenerateDataKey(context.Background(), key, 32, nil)
	wantErr(t, err, ErrKeyState)
}

func TestWrapNewMaterial(t *testing.T) {
	e, s := newTestEngine(t, 0)
	ctx := context.Background()
	blob, pub, err := e.WrapNewMaterial(ctx, "k-abc", 1, fsmpb.KeySpec_KEY_SPEC_AES_256, 3)
	if err != nil {
		t.Fatal(err)
	}
	if blob.KekVersion != 3 || pub != nil || s.randoms.Load() != 1 || s.seals.Load() != 1 {
		t.Fatalf("kek=%d randoms=%d seals=%d", blob.KekVersion, s.randoms.Load(), s.seals.Load())
	}
	m, err := s.Open(ctx, 3, blob.Blob, MaterialAAD("k-abc", 1, fsmpb.KeySpec_KEY_SPEC_AES_256))
	if err != nil || len(m) != 32 {
		t.Fatalf("material: %d bytes, %v", len(m), err)
	}
	blob2, _, _ := e.WrapNewMaterial(ctx, "k-abc", 1, fsmpb.KeySpec_KEY_SPEC_AES_256, 3)
	m2, _ := s.Open(ctx, 3, blob2.Blob, MaterialAAD("k-abc", 1, fsmpb.KeySpec_KEY_SPEC_AES_256))
	if bytes.Equal(m, m2) {
		t.Fatal("two generations produced the same material")
	}

	for _, tt := range []struct {
		name    string
		keyID   string
		version uint32
		spec    fsmpb.KeySpec
		want    error
	}{
		{"unspecified spec", "k-abc", 1, fsmpb.KeySpec_KEY_SPEC_UNSPECIFIED, ErrUnsupported},
		{"unknown spec", "k-abc", 1, fsmpb.KeySpec(99), ErrUnsupported},
		{"version zero", "k-abc", 0, fsmpb.KeySpec_KEY_SPEC_AES_256, ErrInvalidArgument},
		{"empty key id", "", 1, fsmpb.KeySpec_KEY_SPEC_AES_256, ErrInvalidArgument},
		{"bad key id", "k-a/b", 1, fsmpb.KeySpec_KEY_SPEC_AES_256, ErrInvalidArgument},
		{"long key id", strings.Repeat("a", 256), 1, fsmpb.KeySpec_KEY_SPEC_AES_256, ErrInvalidArgument},
		{"unknown KEK", "k-abc", 1, fsmpb.KeySpec_KEY_SPEC_AES_256, ErrUnwrap},
	} {
		t.Run(tt.name, func(t *testing.T) {
			kek := uint32(1)
			if tt.name == "unknown KEK" {
				kek = 999
			}
			_, _, err := e.WrapNewMaterial(ctx, tt.keyID, tt.version, tt.spec, kek)
			wantErr(t, err, tt.want)
		})
	}
}

// A wrapped blob only opens for the key, version and spec it was made for.
func TestMaterialMovedFailsToUnwrap(t *testing.T) {
	e, s := newTestEngine(t, 0)
	src := newTestKey(t, e, 2)
	tests := []struct {
		name string
		dst  func() *fsmpb.KeyRecord
	}{
		{"to another key id", func() *fsmpb.KeyRecord {
			k := newTestKey(t, e, 1)
			k.Versions[0].Material = src.Versions[0].Material
			return k
		}},
		{"to another version", func() *fsmpb.KeyRecord {
			k := newTestKey(t, e, 0)
			k.KeyId = src.KeyId
			k.Versions = []*fsmpb.KeyVersion{{Version: 2, Material: src.Versions[0].Material, State: fsmpb.KeyVersionState_KEY_VERSION_STATE_ENABLED}}
			k.PrimaryVersion = 2
			return k
		}},
		{"to another KEK version", func() *fsmpb.KeyRecord {
			k := newTestKey(t, e, 0)
			k.KeyId = src.KeyId
			k.Versions = []*fsmpb.KeyVersion{{Version: 1, Material: &fsmpb.WrappedBlob{KekVersion: 2, Blob: src.Versions[0].Material.Blob}, State: fsmpb.KeyVersionState_KEY_VERSION_STATE_ENABLED}}
			k.PrimaryVersion = 1
			return k
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opens := s.opens.Load()
			_, _, err := e.Encrypt(context.Background(), tt.dst(), []byte("x"), nil)
			wantErr(t, err, ErrUnwrap)
			if s.opens.Load() != opens+1 {
				t.Fatal("the Sealer was not asked")
			}
		})
	}
	// And the original still works.
	if _, _, err := e.Encrypt(context.Background(), src, []byte("x"), nil); err != nil {
		t.Fatal(err)
	}
}

func TestSealerErrorsAreWrapped(t *testing.T) {
	e, s := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	down := errTestHSMDown
	s.openErr.Store(&down)
	_, _, err := e.Encrypt(context.Background(), key, []byte("x"), nil)
	if !errors.Is(err, ErrUnwrap) || !errors.Is(err, errTestHSMDown) {
		t.Fatalf("error = %v, want ErrUnwrap wrapping the Sealer's error", err)
	}
	if st := e.CacheStats(); st.Size != 0 {
		t.Fatalf("failed unwrap was cached: %+v", st)
	}
	s.openErr.Store(nil)
	if _, _, err := e.Encrypt(context.Background(), key, []byte("x"), nil); err != nil {
		t.Fatalf("after the HSM came back: %v", err)
	}
}

// Symmetric operations refuse RSA ENCRYPT_DECRYPT keys (they have
// EncryptAsymmetric/DecryptAsymmetric); a Cabinet ciphertext naming one is
// invalid.
func TestSymmetricOpsRefuseRSAKeys(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	ct := validCiphertext(t, e, key)
	key.Spec = fsmpb.KeySpec_KEY_SPEC_RSA_2048
	_, _, err := e.Encrypt(context.Background(), key, []byte("x"), nil)
	wantErr(t, err, ErrInvalidArgument)
	_, _, _, err = e.GenerateDataKey(context.Background(), key, 0, nil)
	wantErr(t, err, ErrInvalidArgument)
	_, _, _, err = e.Decrypt(context.Background(), lookupOf(key), ct, nil, false)
	wantErr(t, err, ErrInvalidCiphertext)
	key.Spec = fsmpb.KeySpec(99)
	_, _, err = e.Encrypt(context.Background(), key, []byte("x"), nil)
	wantErr(t, err, ErrInvalidArgument)
}

// checkNoLeak fails if err's message contains 8 consecutive bytes of any
// secret, raw or hex-encoded.
func checkNoLeak(t *testing.T, err error, secrets ...[]byte) {
	t.Helper()
	if err == nil {
		return
	}
	msg := strings.ToLower(err.Error())
	for _, s := range secrets {
		for _, form := range []string{strings.ToLower(string(s)), hex.EncodeToString(s)} {
			for i := 0; i+8 <= len(form); i++ {
				if strings.Contains(msg, form[i:i+8]) {
					t.Fatalf("error message %q leaks secret bytes", err)
				}
			}
		}
	}
}
