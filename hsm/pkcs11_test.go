package hsm_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/hsm/softhsmtest"
)

// TestSoftHSM runs the tests that need node identities on two shared tokens, A and B, because
// an RSA-3072 key pair takes SoftHSM 0.5-1.4 s to generate.
func TestSoftHSM(t *testing.T) {
	ctx := context.Background()
	cfgA := softhsmtest.NewToken(t, "node-a")
	cfgB := softhsmtest.NewToken(t, "node-b")
	a, b := openToken(t, cfgA), openToken(t, cfgB)

	// Generate both identities at once (two library instances, two cores).
	var pubA, pubB *rsa.PublicKey
	var errA, errB error
	var wg sync.WaitGroup
	wg.Go(func() { pubA, errA = a.EnsureIdentity(ctx) })
	wg.Go(func() { pubB, errB = b.EnsureIdentity(ctx) })
	wg.Wait()
	if errA != nil || errB != nil {
		t.Fatalf("EnsureIdentity: %v, %v", errA, errB)
	}
	if pubA.N.BitLen() != 3072 || pubA.E != 65537 {
		t.Fatalf("identity is %d bits, e=%d; want 3072, 65537", pubA.N.BitLen(), pubA.E)
	}

	parent := t
	t.Run("identity is idempotent across reopen", func(t *testing.T) {
		again, err := a.EnsureIdentity(ctx)
		if err != nil || !again.Equal(pubA) {
			t.Fatalf("second EnsureIdentity: %v (same key: %v)", err, err == nil && again.Equal(pubA))
		}
		// Close finalizes the library (last provider on it); a new provider finds the key by label.
		if err := a.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := a.EnsureIdentity(ctx); !errors.Is(err, hsm.ErrUnavailable) {
			t.Fatalf("EnsureIdentity after Close: %v, want ErrUnavailable", err)
		}
		a = openToken(parent, cfgA) // lives as long as the shared tokens
		again, err = a.EnsureIdentity(ctx)
		if err != nil || !again.Equal(pubA) {
			t.Fatalf("EnsureIdentity after reopen: %v (same key: %v)", err, err == nil && again.Equal(pubA))
		}
	})

	t.Run("kek transfer", func(t *testing.T) {
		kcv := mustKEK(t, a, 10)
		wrapped, err := a.WrapKEK(ctx, 10, pubB)
		if err != nil {
			t.Fatal(err)
		}
		got, err := b.UnwrapKEK(ctx, 10, wrapped)
		if err != nil || !bytes.Equal(got, kcv) {
			t.Fatalf("UnwrapKEK = %x, %v; want %x", got, err, kcv)
		}
		// Repeating the transfer is a no-op.
		if got, err = b.UnwrapKEK(ctx, 10, wrapped); err != nil || !bytes.Equal(got, kcv) {
			t.Fatalf("second UnwrapKEK = %x, %v; want %x", got, err, kcv)
		}
		if got, err = b.KEKCheckValue(ctx, 10); err != nil || !bytes.Equal(got, kcv) {
			t.Fatalf("B's KEKCheckValue = %x, %v; want %x", got, err, kcv)
		}
		pt, aad := []byte("managed key material, 32 bytes!!"), []byte("key-1/v1")
		mustOpen(t, b, 10, mustSeal(t, a, 10, pt, aad), aad, pt)
		mustOpen(t, a, 10, mustSeal(t, b, 10, pt, aad), aad, pt)
		// B received it persistently.
		b2 := openToken(t, cfgB)
		if got, err = b2.KEKCheckValue(ctx, 10); err != nil || !bytes.Equal(got, kcv) {
			t.Fatalf("second provider on B: KEKCheckValue = %x, %v; want %x", got, err, kcv)
		}
	})

	t.Run("kek mismatch", func(t *testing.T) {
		kcvB := mustKEK(t, b, 11)
		kcvA := mustKEK(t, a, 11)
		if bytes.Equal(kcvA, kcvB) {
			t.Fatal("two generated KEKs have the same check value")
		}
		wrapped, err := a.WrapKEK(ctx, 11, pubB)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := b.UnwrapKEK(ctx, 11, wrapped); !errors.Is(err, hsm.ErrKEKMismatch) {
			t.Fatalf("UnwrapKEK over a different v11: %v, want ErrKEKMismatch", err)
		}
		if got, err := b.KEKCheckValue(ctx, 11); err != nil || !bytes.Equal(got, kcvB) {
			t.Fatalf("B's v11 changed: %x, %v; want %x", got, err, kcvB)
		}
	})

	t.Run("bad wrapped blobs", func(t *testing.T) {
		mustKEK(t, a, 12)
		good, err := a.WrapKEK(ctx, 12, pubB)
		if err != nil {
			t.Fatal(err)
		}
		wrongRecipient, err := a.WrapKEK(ctx, 12, pubA)
		if err != nil {
			t.Fatal(err)
		}
		tampered := bytes.Clone(good)
		tampered[100] ^= 1
		for _, tc := range []struct {
			name    string
			wrapped []byte
		}{
			{"nil", nil},
			{"empty", []byte{}},
			{"one byte", []byte{1}},
			{"truncated", good[:len(good)-1]},
			{"too long", append(bytes.Clone(good), 0)},
			{"tampered", tampered},
			{"for another node", wrongRecipient},
			{"random", bytes.Repeat([]byte{0x5a}, len(good))},
		} {
			t.Run(tc.name, func(t *testing.T) {
				if _, err := b.UnwrapKEK(ctx, 12, tc.wrapped); err == nil {
					t.Fatal("UnwrapKEK accepted a bad blob")
				}
			})
		}
		if _, err := b.KEKCheckValue(ctx, 12); !errors.Is(err, hsm.ErrKEKNotFound) {
			t.Fatalf("failed unwraps stored something: %v", err)
		}
		if _, err := a.WrapKEK(ctx, 99, pubB); !errors.Is(err, hsm.ErrKEKNotFound) {
			t.Fatalf("WrapKEK of missing version: %v, want ErrKEKNotFound", err)
		}
		if _, err := a.WrapKEK(ctx, 12, nil); err == nil {
			t.Fatal("WrapKEK for a nil recipient succeeded")
		}
	})

	t.Run("memory interop", func(t *testing.T) {
		m := hsm.NewMemory()
		t.Cleanup(func() { _ = m.Close() })
		pubM, err := m.EnsureIdentity(ctx)
		if err != nil {
			t.Fatal(err)
		}
		pt, aad := []byte("plaintext"), []byte("aad")

		// memory -> SoftHSM: equal check values prove the Go CMAC equals CKM_AES_CMAC.
		kcvM := mustKEK(t, m, 20)
		wrapped, err := m.WrapKEK(ctx, 20, pubA)
		if err != nil {
			t.Fatal(err)
		}
		got, err := a.UnwrapKEK(ctx, 20, wrapped)
		if err != nil || !bytes.Equal(got, kcvM) {
			t.Fatalf("SoftHSM unwrap of memory-wrapped KEK = %x, %v; want %x", got, err, kcvM)
		}
		mustOpen(t, a, 20, mustSeal(t, m, 20, pt, aad), aad, pt)
		mustOpen(t, m, 20, mustSeal(t, a, 20, pt, aad), aad, pt)

		// SoftHSM -> memory.
		kcvA := mustKEK(t, a, 21)
		wrapped, err = a.WrapKEK(ctx, 21, pubM)
		if err != nil {
			t.Fatal(err)
		}
		got, err = m.UnwrapKEK(ctx, 21, wrapped)
		if err != nil || !bytes.Equal(got, kcvA) {
			t.Fatalf("memory unwrap of SoftHSM-wrapped KEK = %x, %v; want %x", got, err, kcvA)
		}
		mustOpen(t, m, 21, mustSeal(t, a, 21, pt, aad), aad, pt)
		mustOpen(t, a, 21, mustSeal(t, m, 21, pt, aad), aad, pt)

		// Mismatch detection is the same in memory.
		mustKEK(t, a, 22)
		mustKEK(t, m, 22)
		wrapped, err = a.WrapKEK(ctx, 22, pubM)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := m.UnwrapKEK(ctx, 22, wrapped); !errors.Is(err, hsm.ErrKEKMismatch) {
			t.Fatalf("memory UnwrapKEK over a different v22: %v, want ErrKEKMismatch", err)
		}
	})
}

func TestKEKAcrossReopen(t *testing.T) {
	ctx := context.Background()
	p, cfg := newToken(t, "kek-reopen")
	kcv := mustKEK(t, p, 1)
	if _, err := p.GenerateKEK(ctx, 1); !errors.Is(err, hsm.ErrKEKExists) {
		t.Fatalf("second GenerateKEK(1): %v, want ErrKEKExists", err)
	}
	kcv2 := mustKEK(t, p, 2)
	if bytes.Equal(kcv, kcv2) {
		t.Fatal("two KEKs with one check value")
	}
	t.Run("seal/open", func(t *testing.T) { testSealOpen(t, p, 1) })
	pt, aad := []byte("survives reopen"), []byte("aad")
	sealed := mustSeal(t, p, 1, pt, aad)
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}

	p = openToken(t, cfg)
	for v, want := range map[uint32][]byte{1: kcv, 2: kcv2} {
		got, err := p.KEKCheckValue(ctx, v)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("after reopen KEKCheckValue(%d) = %x, %v; want %x", v, got, err, want)
		}
	}
	mustOpen(t, p, 1, sealed, aad, pt)
	if _, err := p.GenerateKEK(ctx, 2); !errors.Is(err, hsm.ErrKEKExists) {
		t.Fatalf("GenerateKEK(2) after reopen: %v, want ErrKEKExists", err)
	}
	r, err := p.GenerateRandom(ctx, 48)
	if err != nil || len(r) != 48 {
		t.Fatalf("GenerateRandom = %d bytes, %v", len(r), err)
	}
	if _, err := p.GenerateRandom(ctx, -1); err == nil {
		t.Fatal("GenerateRandom(-1) succeeded")
	}
}

func TestConcurrentSealOpen(t *testing.T) {
	p, _ := newToken(t, "concurrent")
	mustKEK(t, p, 1)
	mustKEK(t, p, 2)
	const goroutines, iterations = 16, 200
	var wg sync.WaitGroup
	errs := make(chan error, goroutines)
	for g := range goroutines {
		wg.Go(func() {
			ctx := context.Background()
			version := uint32(1 + g%2)
			for i := range iterations {
				pt := fmt.Appendf(nil, "goroutine %d message %d", g, i)
				aad := fmt.Appendf(nil, "g%d", g)
				sealed, err := p.Seal(ctx, version, pt, aad)
				if err != nil {
					errs <- err
					return
				}
				got, err := p.Open(ctx, version, sealed, aad)
				if err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, pt) {
					errs <- fmt.Errorf("goroutine %d message %d: wrong plaintext", g, i)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestOutageRecovery takes the token away from a running provider by moving its directory,
// as a lost HSM would, and brings it back.
func TestOutageRecovery(t *testing.T) {
	ctx := context.Background()
	p, cfg := newToken(t, "outage")
	kcv := mustKEK(t, p, 1)
	pt, aad := []byte("before the outage"), []byte("aad")
	sealed := mustSeal(t, p, 1, pt, aad)
	if err := p.Health(ctx); err != nil {
		t.Fatalf("Health before outage: %v", err)
	}

	// Background load across the whole outage: every call either works or says ErrUnavailable.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	counts := map[string]int{}
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				s, err := p.Seal(ctx, 1, pt, aad)
				if err == nil {
					_, err = p.Open(ctx, 1, s, aad)
				}
				mu.Lock()
				switch {
				case err == nil:
					counts["ok"]++
				case errors.Is(err, hsm.ErrUnavailable):
					counts["unavailable"]++
				default:
					counts[err.Error()]++
				}
				mu.Unlock()
			}
		})
	}
	defer func() {
		close(stop)
		wg.Wait()
		for k, n := range counts {
			if k != "ok" && k != "unavailable" {
				t.Errorf("%d calls failed with an unexpected error: %s", n, k)
			}
		}
		t.Logf("background calls during the test: %v", counts)
	}()
	time.Sleep(20 * time.Millisecond)

	dir := softhsmtest.TokenDir(cfg)
	if err := os.Rename(dir, dir+".away"); err != nil {
		t.Fatal(err)
	}
	err := p.Health(ctx)
	if !errors.Is(err, hsm.ErrUnavailable) {
		t.Fatalf("Health during outage: %v, want ErrUnavailable", err)
	}
	t.Logf("Health during outage: %v", err)
	// Every operation now fails fast with ErrUnavailable, and keeps failing while the token is away.
	for range 3 {
		if _, err := p.Seal(ctx, 1, pt, aad); !errors.Is(err, hsm.ErrUnavailable) {
			t.Fatalf("Seal during outage: %v, want ErrUnavailable", err)
		}
		if _, err := p.KEKCheckValue(ctx, 1); !errors.Is(err, hsm.ErrUnavailable) {
			t.Fatalf("KEKCheckValue during outage: %v, want ErrUnavailable", err)
		}
		time.Sleep(120 * time.Millisecond) // past the recovery back-off, so recovery is retried
	}
	err = p.Health(ctx)
	if !errors.Is(err, hsm.ErrUnavailable) || !strings.Contains(err.Error(), "token directory") {
		t.Fatalf("Health while token directory is missing: %v; want ErrUnavailable naming the directory", err)
	}

	if err := os.Rename(dir+".away", dir); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	if err := waitFor(t, 10*time.Second, func() error { return p.Health(ctx) }); err != nil {
		t.Fatalf("provider did not recover: %v", err)
	}
	t.Logf("healthy again %v after the token directory came back", time.Since(back).Round(time.Millisecond))
	mustOpen(t, p, 1, sealed, aad, pt)
	if got, err := p.KEKCheckValue(ctx, 1); err != nil || !bytes.Equal(got, kcv) {
		t.Fatalf("KEKCheckValue after recovery = %x, %v; want %x", got, err, kcv)
	}
	mustKEK(t, p, 2) // token objects can be created again
}

// TestDeadSessionsReplaced closes every session behind the provider's back (login and session
// objects go with them); the next operations must recover transparently.
func TestDeadSessionsReplaced(t *testing.T) {
	ctx := context.Background()
	p, _ := newToken(t, "dead-sessions")
	mustKEK(t, p, 1)
	pt, aad := []byte("x"), []byte("y")
	sealed := mustSeal(t, p, 1, pt, aad)
	for round := range 3 {
		if err := hsm.KillSessions(p); err != nil {
			t.Fatal(err)
		}
		got, err := p.Open(ctx, 1, sealed, aad)
		if err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("round %d: Open after sessions died: %v", round, err)
		}
		if err := p.Health(ctx); err != nil {
			t.Fatalf("round %d: Health: %v", round, err)
		}
	}
	// Health notices a lost login first, then the provider recovers on the next call.
	if err := hsm.KillSessions(p); err != nil {
		t.Fatal(err)
	}
	if err := p.Health(ctx); !errors.Is(err, hsm.ErrUnavailable) {
		t.Fatalf("Health after sessions died: %v, want ErrUnavailable", err)
	}
	if err := waitFor(t, 5*time.Second, func() error { return p.Health(ctx) }); err != nil {
		t.Fatalf("no recovery: %v", err)
	}
	mustOpen(t, p, 1, sealed, aad, pt)
}

// TestTrustedWrap is the strict mode: KEKs carry CKA_WRAP_WITH_TRUSTED, so only a key the SO
// marked trusted can wrap them.
func TestTrustedWrap(t *testing.T) {
	ctx := context.Background()
	cfg := softhsmtest.NewToken(t, "trusted")
	cfg.TrustedWrap = true
	p := openToken(t, cfg)
	kcv := mustKEK(t, p, 1)
	pt, aad := []byte("strict"), []byte("mode")
	sealed := mustSeal(t, p, 1, pt, aad)

	// A recipient whose private key we hold in Go, so we can check the unwrapped KEK's check value.
	m := hsm.NewMemory()
	t.Cleanup(func() { _ = m.Close() })
	recipient, err := m.EnsureIdentity(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for round := range 2 { // repeatable, and the provider keeps working afterwards
		wrapped, err := p.WrapKEK(ctx, 1, recipient)
		if err != nil {
			t.Fatalf("round %d: trusted WrapKEK: %v", round, err)
		}
		got, err := m.UnwrapKEK(ctx, 1, wrapped)
		if err != nil || !bytes.Equal(got, kcv) {
			t.Fatalf("round %d: unwrap = %x, %v; want %x", round, got, err, kcv)
		}
		mustOpen(t, p, 1, sealed, aad, pt)
		if err := p.Health(ctx); err != nil {
			t.Fatalf("round %d: Health after trusted wrap: %v", round, err)
		}
	}
	if _, err := p.WrapKEK(ctx, 2, recipient); !errors.Is(err, hsm.ErrKEKNotFound) {
		t.Fatalf("trusted WrapKEK of missing version: %v, want ErrKEKNotFound", err)
	}

	// The token enforces it: without the SO step (a provider in default mode on the same
	// token) wrapping this KEK fails.
	loose := cfg
	loose.TrustedWrap = false
	lp := openToken(t, loose)
	if _, err := lp.WrapKEK(ctx, 1, recipient); err == nil {
		t.Fatal("a KEK with CKA_WRAP_WITH_TRUSTED was wrapped under an untrusted key")
	} else {
		t.Logf("untrusted wrap refused: %v", err)
	}

	// A wrong SO PIN fails the wrap but leaves the provider logged in and working.
	bad := cfg
	bad.SOPIN = "wrong-so-pin"
	bp := openToken(t, bad)
	if _, err := bp.WrapKEK(ctx, 1, recipient); err == nil {
		t.Fatal("trusted wrap with a wrong SO PIN succeeded")
	} else if strings.Contains(err.Error(), bad.SOPIN) {
		t.Fatalf("error reveals the PIN: %v", err)
	}
	mustOpen(t, bp, 1, sealed, aad, pt)
	mustOpen(t, p, 1, sealed, aad, pt)
}

func TestOpenErrors(t *testing.T) {
	ctx := context.Background()
	good := softhsmtest.NewToken(t, "errors")

	missingDir := softhsmtest.NewToken(t, "no-dir")
	if err := os.RemoveAll(softhsmtest.TokenDir(missingDir)); err != nil {
		t.Fatal(err)
	}
	wrongPIN := good
	wrongPIN.PIN = "not-the-pin"

	for _, tc := range []struct {
		name     string
		cfg      hsm.PKCS11Config
		wantText string
	}{
		{"missing library", hsm.PKCS11Config{Library: filepath.Join(t.TempDir(), "nope.so"), TokenLabel: "x", PIN: "1"}, "nope.so"},
		{"not a library", hsm.PKCS11Config{Library: good.ConfigPath, TokenLabel: "x", PIN: "1"}, "cannot load"},
		{"missing token dir", missingDir, "token directory"},
		{"unknown label", func() hsm.PKCS11Config { c := good; c.TokenLabel = "nobody"; return c }(), "no token labelled"},
		{"wrong pin", wrongPIN, "CKR_PIN_INCORRECT"},
		{"no pin", func() hsm.PKCS11Config { c := good; c.PIN = ""; return c }(), "PIN required"},
		{"trusted wrap without SO PIN", func() hsm.PKCS11Config { c := good; c.TrustedWrap, c.SOPIN = true, ""; return c }(), "SO PIN"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := hsm.OpenPKCS11(ctx, tc.cfg)
			if err == nil {
				_ = p.Close()
				t.Fatal("OpenPKCS11 succeeded")
			}
			if !strings.Contains(err.Error(), tc.wantText) {
				t.Fatalf("error %q does not mention %q", err, tc.wantText)
			}
			if len(tc.cfg.PIN) > 3 && strings.Contains(err.Error(), tc.cfg.PIN) {
				t.Fatalf("error reveals the PIN: %v", err)
			}
		})
	}
	// After all those failures the good config still opens.
	p := openToken(t, good)
	if err := p.Health(ctx); err != nil {
		t.Fatal(err)
	}
	// The same library path cannot serve a second token config.
	other := softhsmtest.NewToken(t, "other")
	other.Library = good.Library
	if _, err := hsm.OpenPKCS11(ctx, other); err == nil || !strings.Contains(err.Error(), "own copy of the library") {
		t.Fatalf("second config on one library path: %v", err)
	}
}

// TestOAEPSHA256 records what the token does with OAEPHash = SHA-256: SoftHSM 2.6.1 refuses
// (CKR_ARGUMENTS_BAD); an HSM that can must produce a blob Go unwraps with SHA-256.
func TestOAEPSHA256(t *testing.T) {
	ctx := context.Background()
	cfg := softhsmtest.NewToken(t, "oaep-sha256")
	cfg.OAEPHash = crypto.SHA256
	p := openToken(t, cfg)
	kcv := mustKEK(t, p, 1)
	recipient, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	wrapped, err := p.WrapKEK(ctx, 1, &recipient.PublicKey)
	if err != nil {
		t.Logf("token refuses RSA-OAEP with SHA-256: %v", err)
		if !strings.Contains(err.Error(), "CKR_") {
			t.Fatalf("unexpected error: %v", err)
		}
		return
	}
	key, err := rsa.DecryptOAEP(sha256.New(), nil, recipient, wrapped, nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := hsm.AESCMAC(key, hsm.CheckValueBlock[:])
	if err != nil || !bytes.Equal(got, kcv) {
		t.Fatalf("unwrapped key's CMAC = %x, %v; want %x", got, err, kcv)
	}
}
