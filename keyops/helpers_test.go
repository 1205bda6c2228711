package keyops

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// testSealer is an in-memory Sealer: AES-256-GCM under a per-KEK-version key
// derived from the version number, 12-byte random IV || ciphertext || tag,
// as the real HSM provider does. It counts calls and can be made to fail or
// to block in Open.
type testSealer struct {
	mu   sync.Mutex
	keks map[uint32]cipher.AEAD

	seals, opens, randoms atomic.Int64

	// openErr, when set, is returned by Open.
	openErr atomic.Pointer[error]
	// gate, when set, makes Open wait for it to be closed (or ctx done).
	gate atomic.Pointer[chan struct{}]
}

var errTestHSMDown = errors.New("test hsm: unavailable")

func newTestSealer() *testSealer {
	return &testSealer{keks: make(map[uint32]cipher.AEAD)}
}

func (s *testSealer) kek(v uint32) (cipher.AEAD, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if a, ok := s.keks[v]; ok {
		return a, nil
	}
	if v == 0 || v > 100 {
		return nil, fmt.Errorf("test hsm: no KEK version %d", v)
	}
	k := sha256.Sum256(fmt.Appendf(nil, "test-kek-%d", v))
	b, _ := aes.NewCipher(k[:])
	a, _ := cipher.NewGCM(b)
	s.keks[v] = a
	return a, nil
}

func (s *testSealer) Seal(_ context.Context, kekVersion uint32, plaintext, aad []byte) ([]byte, error) {
	s.seals.Add(1)
	a, err := s.kek(kekVersion)
	if err != nil {
		return nil, err
	}
	iv := make([]byte, 12)
	rand.Read(iv)
	return a.Seal(iv, iv, plaintext, aad), nil
}

func (s *testSealer) Open(ctx context.Context, kekVersion uint32, sealed, aad []byte) ([]byte, error) {
	s.opens.Add(1)
	if g := s.gate.Load(); g != nil {
		select {
		case <-*g:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if e := s.openErr.Load(); e != nil {
		return nil, *e
	}
	a, err := s.kek(kekVersion)
	if err != nil {
		return nil, err
	}
	if len(sealed) < 12+16 {
		return nil, errors.New("test hsm: blob too short")
	}
	return a.Open(nil, sealed[:12], sealed[12:], aad)
}

func (s *testSealer) GenerateRandom(_ context.Context, n int) ([]byte, error) {
	s.randoms.Add(1)
	b := make([]byte, n)
	rand.Read(b)
	return b, nil
}

func newTestEngine(tb testing.TB, cacheSize int) (*Engine, *testSealer) {
	tb.Helper()
	s := newTestSealer()
	e, err := New(Config{Sealer: s, CacheSize: cacheSize})
	if err != nil {
		tb.Fatalf("New: %v", err)
	}
	return e, s
}

// newTestKey creates an ACTIVE AES-256 ENCRYPT_DECRYPT key with `versions`
// enabled versions, the last one primary, wrapped under KEK version 1.
func newTestKey(tb testing.TB, e *Engine, versions int) *fsmpb.KeyRecord {
	tb.Helper()
	id, err := NewKeyID()
	if err != nil {
		tb.Fatal(err)
	}
	k := &fsmpb.KeyRecord{
		KeyId: id,
		Spec:  fsmpb.KeySpec_KEY_SPEC_AES_256,
		Usage: fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT,
		State: fsmpb.KeyState_KEY_STATE_ACTIVE,
	}
	for range versions {
		addTestVersion(tb, e, k)
	}
	return k
}

// addTestVersion rotates k: a new enabled version becomes primary.
func addTestVersion(tb testing.TB, e *Engine, k *fsmpb.KeyRecord) uint32 {
	tb.Helper()
	v := uint32(len(k.Versions) + 1)
	blob, _, err := e.WrapNewMaterial(context.Background(), k.KeyId, v, k.Spec, 1)
	if err != nil {
		tb.Fatalf("WrapNewMaterial: %v", err)
	}
	k.Versions = append(k.Versions, &fsmpb.KeyVersion{Version: v, Material: blob, State: fsmpb.KeyVersionState_KEY_VERSION_STATE_ENABLED})
	k.PrimaryVersion = v
	return v
}

// keyWithMaterial builds an ACTIVE key whose version `version` holds the
// given material, sealed under KEK version 1 of s.
func keyWithMaterial(tb testing.TB, s *testSealer, keyID string, version uint32, material []byte) *fsmpb.KeyRecord {
	tb.Helper()
	blob, err := s.Seal(context.Background(), 1, material, MaterialAAD(keyID, version, fsmpb.KeySpec_KEY_SPEC_AES_256))
	if err != nil {
		tb.Fatal(err)
	}
	return &fsmpb.KeyRecord{
		KeyId: keyID, Spec: fsmpb.KeySpec_KEY_SPEC_AES_256, Usage: fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT,
		State: fsmpb.KeyState_KEY_STATE_ACTIVE, PrimaryVersion: version,
		Versions: []*fsmpb.KeyVersion{{Version: version, Material: &fsmpb.WrappedBlob{KekVersion: 1, Blob: blob}, State: fsmpb.KeyVersionState_KEY_VERSION_STATE_ENABLED}},
	}
}

// materialOf unwraps a version's material in the test (to check that it never
// leaks into messages or outputs).
func materialOf(tb testing.TB, s *testSealer, k *fsmpb.KeyRecord, version uint32) []byte {
	tb.Helper()
	v := findVersion(k, version)
	m, err := s.Open(context.Background(), v.Material.KekVersion, v.Material.Blob, MaterialAAD(k.KeyId, version, k.Spec))
	if err != nil {
		tb.Fatal(err)
	}
	return m
}

func lookupOf(keys ...*fsmpb.KeyRecord) func(string) (*fsmpb.KeyRecord, bool) {
	m := make(map[string]*fsmpb.KeyRecord, len(keys))
	for _, k := range keys {
		m[k.KeyId] = k
	}
	return func(id string) (*fsmpb.KeyRecord, bool) {
		k, ok := m[id]
		return k, ok
	}
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// wantErr checks that err matches sentinel (nil means no error).
func wantErr(tb testing.TB, err, sentinel error) {
	tb.Helper()
	switch {
	case sentinel == nil && err != nil:
		tb.Fatalf("unexpected error: %v", err)
	case sentinel != nil && !errors.Is(err, sentinel):
		tb.Fatalf("error = %v, want %v", err, sentinel)
	}
}
