package hsm_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"testing"

	"github.com/cabinet-kms/cabinet/hsm"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestAESCMACRFC4493 checks the Go AES-CMAC, which the memory provider uses for check values,
// against the RFC 4493 section 4 test vectors (AES-128) and NIST SP 800-38B examples (AES-256,
// the KEK size).
func TestAESCMACRFC4493(t *testing.T) {
	msg64 := "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e5130c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
	k128 := "2b7e151628aed2a6abf7158809cf4f3c"
	k256 := "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"
	for _, tc := range []struct {
		name, key, msg, mac string
	}{
		{"rfc4493 example 1: empty", k128, "", "bb1d6929e95937287fa37d129b756746"},
		{"rfc4493 example 2: one block", k128, msg64[:32], "070a16b46b4d4144f79bdd9dd04a287c"},
		{"rfc4493 example 3: 40 bytes", k128, msg64[:80], "dfa66747de9ae63030ca32611497c827"},
		{"rfc4493 example 4: 64 bytes", k128, msg64, "51f0bebf7e3b9d92fc49741779363cfe"},
		{"sp800-38b aes-256 empty", k256, "", "028962f61b7bf89efc6b551f4667d983"},
		{"sp800-38b aes-256 one block", k256, msg64[:32], "28a7023f452e8f82bd4bf28d8c37c35c"},
		{"sp800-38b aes-256 64 bytes", k256, msg64, "e1992190549f6ed5696a2c056c315410"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := hsm.AESCMAC(unhex(t, tc.key), unhex(t, tc.msg))
			if err != nil {
				t.Fatal(err)
			}
			if want := unhex(t, tc.mac); !bytes.Equal(got, want) {
				t.Fatalf("CMAC = %x, want %x", got, want)
			}
		})
	}
}

func TestMemory(t *testing.T) {
	ctx := context.Background()
	m := hsm.NewMemory()
	t.Cleanup(func() { _ = m.Close() })
	kcv := mustKEK(t, m, 1)
	if _, err := m.GenerateKEK(ctx, 1); !errors.Is(err, hsm.ErrKEKExists) {
		t.Fatalf("second GenerateKEK(1): %v, want ErrKEKExists", err)
	}
	got, err := m.KEKCheckValue(ctx, 1)
	if err != nil || !bytes.Equal(got, kcv) {
		t.Fatalf("KEKCheckValue = %x, %v; want %x", got, err, kcv)
	}
	t.Run("seal/open", func(t *testing.T) { testSealOpen(t, m, 1) })

	if _, err := m.UnwrapKEK(ctx, 2, make([]byte, 384)); err == nil {
		t.Fatal("UnwrapKEK without identity succeeded")
	}
	r, err := m.GenerateRandom(ctx, 32)
	if err != nil || len(r) != 32 {
		t.Fatalf("GenerateRandom = %d bytes, %v", len(r), err)
	}
	if err := m.Health(ctx); err != nil {
		t.Fatal(err)
	}
	_ = m.Close()
	if err := m.Health(ctx); !errors.Is(err, hsm.ErrUnavailable) {
		t.Fatalf("Health after Close: %v, want ErrUnavailable", err)
	}
	if _, err := m.Seal(ctx, 1, nil, nil); !errors.Is(err, hsm.ErrUnavailable) {
		t.Fatalf("Seal after Close: %v, want ErrUnavailable", err)
	}
}

// FuzzOpen feeds untrusted bytes to the memory provider's Open: it must never panic, and it
// must accept nothing that Seal did not produce.
func FuzzOpen(f *testing.F) {
	ctx := context.Background()
	m := hsm.NewMemory()
	if _, err := m.GenerateKEK(ctx, 1); err != nil {
		f.Fatal(err)
	}
	genuine, err := m.Seal(ctx, 1, []byte("secret"), []byte("aad"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(genuine, []byte("aad"))
	f.Add(genuine[:27], []byte("aad"))
	f.Add([]byte{}, []byte{})
	f.Add(make([]byte, 28), []byte(nil))
	f.Fuzz(func(t *testing.T, sealed, aad []byte) {
		pt, err := m.Open(ctx, 1, sealed, aad)
		if err != nil {
			if !errors.Is(err, hsm.ErrAuthFailed) {
				t.Fatalf("Open error %v is not ErrAuthFailed", err)
			}
			return
		}
		if !bytes.Equal(sealed, genuine) || string(aad) != "aad" || string(pt) != "secret" {
			t.Fatalf("Open accepted a forged blob (%d bytes)", len(sealed))
		}
	})
}
