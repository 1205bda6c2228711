package hsm_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/hsm/softhsmtest"
)

// openToken opens a provider on cfg and closes it when the test ends.
func openToken(t testing.TB, cfg hsm.PKCS11Config) *hsm.PKCS11 {
	t.Helper()
	p, err := hsm.OpenPKCS11(context.Background(), cfg)
	if err != nil {
		t.Fatalf("OpenPKCS11(%s): %v", cfg.TokenLabel, err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

// newToken creates a fresh SoftHSM token and opens a provider on it.
func newToken(t testing.TB, label string) (*hsm.PKCS11, hsm.PKCS11Config) {
	t.Helper()
	cfg := softhsmtest.NewToken(t, label)
	return openToken(t, cfg), cfg
}

// waitFor polls cond until it returns nil or the deadline passes, and returns cond's last error.
func waitFor(t testing.TB, timeout time.Duration, cond func() error) error {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func mustKEK(t testing.TB, p hsm.Provider, version uint32) []byte {
	t.Helper()
	kcv, err := p.GenerateKEK(context.Background(), version)
	if err != nil {
		t.Fatalf("GenerateKEK(%d): %v", version, err)
	}
	if len(kcv) != hsm.CheckValueSize {
		t.Fatalf("check value is %d bytes, want %d", len(kcv), hsm.CheckValueSize)
	}
	return kcv
}

func mustSeal(t testing.TB, p hsm.Provider, version uint32, pt, aad []byte) []byte {
	t.Helper()
	sealed, err := p.Seal(context.Background(), version, pt, aad)
	if err != nil {
		t.Fatalf("Seal: %v", err)
	}
	return sealed
}

func mustOpen(t testing.TB, p hsm.Provider, version uint32, sealed, aad, want []byte) {
	t.Helper()
	got, err := p.Open(context.Background(), version, sealed, aad)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("Open returned %d bytes that differ from the %d sealed", len(got), len(want))
	}
}

// testSealOpen checks Seal/Open of provider p under an existing KEK version, table-driven.
func testSealOpen(t *testing.T, p hsm.Provider, version uint32) {
	ctx := context.Background()
	t.Run("round trip", func(t *testing.T) {
		for _, tc := range []struct {
			name    string
			pt, aad []byte
		}{
			{"empty", nil, nil},
			{"empty with aad", []byte{}, []byte("key-1/v1")},
			{"one byte", []byte{7}, nil},
			{"32-byte key", bytes.Repeat([]byte{0xab}, 32), []byte("key-1/v2")},
			{"4 KiB", bytes.Repeat([]byte("cabinet!"), 512), bytes.Repeat([]byte{1}, 100)},
		} {
			t.Run(tc.name, func(t *testing.T) {
				sealed := mustSeal(t, p, version, tc.pt, tc.aad)
				if want := 12 + len(tc.pt) + 16; len(sealed) != want {
					t.Fatalf("sealed length %d, want %d", len(sealed), want)
				}
				mustOpen(t, p, version, sealed, tc.aad, tc.pt)
				again := mustSeal(t, p, version, tc.pt, tc.aad)
				if bytes.Equal(again[:12], sealed[:12]) {
					t.Fatal("two seals used the same IV")
				}
			})
		}
	})

	pt, aad := []byte("thirty-two bytes of key material"), []byte("key-7/v3")
	sealed := mustSeal(t, p, version, pt, aad)
	flip := func(i int) []byte {
		b := bytes.Clone(sealed)
		b[i] ^= 0x01
		return b
	}
	for _, tc := range []struct {
		name   string
		sealed []byte
		aad    []byte
	}{
		{"wrong aad", sealed, []byte("key-7/v4")},
		{"missing aad", sealed, nil},
		{"tampered iv", flip(0), aad},
		{"tampered ciphertext", flip(12), aad},
		{"tampered tag", flip(len(sealed) - 1), aad},
		{"truncated tag", sealed[:len(sealed)-1], aad},
		{"iv and tag only", sealed[:28], aad},
		{"shorter than iv and tag", sealed[:27], aad},
		{"iv only", sealed[:12], aad},
		{"one byte", sealed[:1], aad},
		{"empty", []byte{}, aad},
		{"nil", nil, aad},
		{"appended byte", append(bytes.Clone(sealed), 0), aad},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := p.Open(ctx, version, tc.sealed, tc.aad)
			if !errors.Is(err, hsm.ErrAuthFailed) {
				t.Fatalf("Open = %d bytes, %v; want ErrAuthFailed", len(got), err)
			}
		})
	}
	t.Run("unknown kek", func(t *testing.T) {
		if _, err := p.Seal(ctx, version+1000, pt, aad); !errors.Is(err, hsm.ErrKEKNotFound) {
			t.Fatalf("Seal under missing kek: %v, want ErrKEKNotFound", err)
		}
		if _, err := p.Open(ctx, version+1000, sealed, aad); !errors.Is(err, hsm.ErrKEKNotFound) {
			t.Fatalf("Open under missing kek: %v, want ErrKEKNotFound", err)
		}
		if _, err := p.KEKCheckValue(ctx, version+1000); !errors.Is(err, hsm.ErrKEKNotFound) {
			t.Fatalf("KEKCheckValue of missing kek: %v, want ErrKEKNotFound", err)
		}
	})
}

func label(t testing.TB, suffix string) string {
	// Token labels are at most 32 bytes.
	s := fmt.Sprintf("%.20s-%s", t.Name(), suffix)
	if len(s) > 32 {
		s = s[:32]
	}
	return s
}
