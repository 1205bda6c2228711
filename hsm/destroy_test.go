package hsm_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/hsm/softhsmtest"
)

// wantNotFound checks that every KEK operation on version fails with ErrKEKNotFound (and not
// with ErrUnavailable or a raw PKCS#11 error).
func wantNotFound(t *testing.T, p hsm.Provider, version uint32, sealed []byte, recipient *rsa.PublicKey) {
	t.Helper()
	ctx := context.Background()
	check := func(what string, err error) {
		t.Helper()
		if !errors.Is(err, hsm.ErrKEKNotFound) || errors.Is(err, hsm.ErrUnavailable) {
			t.Errorf("%s of destroyed kek v%d: %v; want ErrKEKNotFound", what, version, err)
		}
	}
	_, err := p.Seal(ctx, version, []byte("x"), nil)
	check("Seal", err)
	_, err = p.Open(ctx, version, sealed, []byte("aad"))
	check("Open", err)
	_, err = p.KEKCheckValue(ctx, version)
	check("KEKCheckValue", err)
	_, err = p.WrapKEK(ctx, version, recipient)
	check("WrapKEK", err)
}

// testDestroyKEK is the provider-independent DestroyKEK contract. src is another provider
// that can make KEKs to send to p (wrapped under p's identity).
func testDestroyKEK(t *testing.T, p, src hsm.Provider) {
	ctx := context.Background()
	pub, err := p.EnsureIdentity(ctx)
	if err != nil {
		t.Fatal(err)
	}
	kcv1 := mustKEK(t, p, 1)
	kcv2 := mustKEK(t, p, 2)
	pt, aad := []byte("sealed before the destroy"), []byte("aad")
	sealed1 := mustSeal(t, p, 1, pt, aad)
	sealed2 := mustSeal(t, p, 2, pt, aad) // v2's handles are now cached
	mustOpen(t, p, 2, sealed2, aad, pt)
	if _, err := p.WrapKEK(ctx, 2, pub); err != nil {
		t.Fatalf("WrapKEK(2) before destroy: %v", err)
	}

	if err := p.DestroyKEK(ctx, 2); err != nil {
		t.Fatalf("DestroyKEK(2): %v", err)
	}
	t.Run("every operation says not found", func(t *testing.T) {
		wantNotFound(t, p, 2, sealed2, pub)
	})
	t.Run("idempotent", func(t *testing.T) {
		if err := p.DestroyKEK(ctx, 2); err != nil {
			t.Fatalf("second DestroyKEK(2): %v", err)
		}
		if err := p.DestroyKEK(ctx, 4242); err != nil {
			t.Fatalf("DestroyKEK of a version never there: %v", err)
		}
		wantNotFound(t, p, 2, sealed2, pub)
	})
	t.Run("other versions unaffected", func(t *testing.T) {
		mustOpen(t, p, 1, sealed1, aad, pt)
		mustOpen(t, p, 1, mustSeal(t, p, 1, pt, aad), aad, pt)
		if got, err := p.KEKCheckValue(ctx, 1); err != nil || !bytes.Equal(got, kcv1) {
			t.Fatalf("KEKCheckValue(1) = %x, %v; want %x", got, err, kcv1)
		}
	})
	t.Run("generate same version again", func(t *testing.T) {
		kcv, err := p.GenerateKEK(ctx, 2)
		if err != nil {
			t.Fatalf("GenerateKEK(2) after destroy: %v", err)
		}
		if bytes.Equal(kcv, kcv2) {
			t.Fatal("regenerated v2 has the destroyed key's check value")
		}
		if got, err := p.KEKCheckValue(ctx, 2); err != nil || !bytes.Equal(got, kcv) {
			t.Fatalf("KEKCheckValue(2) = %x, %v; want %x", got, err, kcv)
		}
		if _, err := p.Open(ctx, 2, sealed2, aad); !errors.Is(err, hsm.ErrAuthFailed) {
			t.Fatalf("Open of a blob sealed under the destroyed v2: %v; want ErrAuthFailed", err)
		}
		mustOpen(t, p, 2, mustSeal(t, p, 2, pt, aad), aad, pt)
	})
	t.Run("unwrap same version again", func(t *testing.T) {
		srcKCV, err := src.GenerateKEK(ctx, 2)
		if err != nil {
			t.Fatal(err)
		}
		wrapped, err := src.WrapKEK(ctx, 2, pub)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.UnwrapKEK(ctx, 2, wrapped); !errors.Is(err, hsm.ErrKEKMismatch) {
			t.Fatalf("UnwrapKEK over the regenerated v2: %v; want ErrKEKMismatch", err)
		}
		for round := range 2 {
			if err := p.DestroyKEK(ctx, 2); err != nil {
				t.Fatalf("round %d: DestroyKEK(2): %v", round, err)
			}
			got, err := p.UnwrapKEK(ctx, 2, wrapped)
			if err != nil || !bytes.Equal(got, srcKCV) {
				t.Fatalf("round %d: UnwrapKEK(2) after destroy = %x, %v; want %x", round, got, err, srcKCV)
			}
			if got, err := p.KEKCheckValue(ctx, 2); err != nil || !bytes.Equal(got, srcKCV) {
				t.Fatalf("round %d: KEKCheckValue(2) = %x, %v; want %x", round, got, err, srcKCV)
			}
			mustOpen(t, p, 2, mustSeal(t, src, 2, pt, aad), aad, pt)
		}
	})
}

func TestDestroyKEKMemory(t *testing.T) {
	m, src := hsm.NewMemory(), hsm.NewMemory()
	t.Cleanup(func() { _ = m.Close(); _ = src.Close() })
	testDestroyKEK(t, m, src)
	_ = m.Close()
	if err := m.DestroyKEK(context.Background(), 1); !errors.Is(err, hsm.ErrUnavailable) {
		t.Fatalf("DestroyKEK after Close: %v; want ErrUnavailable", err)
	}
}

// logBuffer collects a provider's log output for inspection.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestDestroyKEKSoftHSM(t *testing.T) {
	cfg := softhsmtest.NewToken(t, "destroy")
	var logs logBuffer
	cfg.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	p := openToken(t, cfg)
	src := hsm.NewMemory()
	t.Cleanup(func() { _ = src.Close() })

	testDestroyKEK(t, p, src)

	// Nothing labelled with a destroyed version is left, neither on the token nor as a session copy.
	mustSeal(t, p, 2, []byte("x"), nil) // v2 (unwrapped) has a session copy
	if tok, ses, err := hsm.CountKEKObjects(p, 2); err != nil || tok != 1 || ses != 1 {
		t.Fatalf("before destroy: %d token, %d session objects, %v; want 1, 1", tok, ses, err)
	}
	if err := p.DestroyKEK(context.Background(), 2); err != nil {
		t.Fatal(err)
	}
	if tok, ses, err := hsm.CountKEKObjects(p, 2); err != nil || tok != 0 || ses != 0 {
		t.Fatalf("after destroy: %d token, %d session objects, %v; want 0, 0", tok, ses, err)
	}
	if err := p.Health(context.Background()); err != nil {
		t.Fatalf("Health: %v", err)
	}
	out := logs.String()
	if strings.Contains(out, "token unavailable") {
		t.Errorf("DestroyKEK made the provider reconnect:\n%s", out)
	}
	if !strings.Contains(out, "destroyed kek") {
		t.Errorf("no log line for the destroy:\n%s", out)
	}
	if strings.Contains(out, softhsmtest.PIN) || strings.Contains(out, softhsmtest.SOPIN) {
		t.Error("a PIN is in the logs")
	}
}

// TestDestroyKEKGoneAfterRestart: the token object is gone, not just this login's handles.
func TestDestroyKEKGoneAfterRestart(t *testing.T) {
	ctx := context.Background()
	p, cfg := newToken(t, "destroy-restart")
	kcv1 := mustKEK(t, p, 1)
	mustKEK(t, p, 2)
	pt, aad := []byte("survives"), []byte("aad")
	sealed1 := mustSeal(t, p, 1, pt, aad)
	mustSeal(t, p, 2, pt, aad)
	if err := p.DestroyKEK(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}

	p = openToken(t, cfg)
	if _, err := p.KEKCheckValue(ctx, 2); !errors.Is(err, hsm.ErrKEKNotFound) {
		t.Fatalf("KEKCheckValue(2) after restart: %v; want ErrKEKNotFound", err)
	}
	if tok, ses, err := hsm.CountKEKObjects(p, 2); err != nil || tok != 0 || ses != 0 {
		t.Fatalf("after restart: %d token, %d session objects, %v; want 0, 0", tok, ses, err)
	}
	if got, err := p.KEKCheckValue(ctx, 1); err != nil || !bytes.Equal(got, kcv1) {
		t.Fatalf("KEKCheckValue(1) after restart = %x, %v; want %x", got, err, kcv1)
	}
	mustOpen(t, p, 1, sealed1, aad, pt)
	mustKEK(t, p, 2) // no ErrKEKExists
}

// testDestroyConcurrent: Seal/Open on version 1 from several goroutines never fail while
// version 2 is destroyed and re-created over and over; operations on version 2 meanwhile
// either work or say ErrKEKNotFound (never a stale-handle error).
func testDestroyConcurrent(t *testing.T, p hsm.Provider) {
	ctx := context.Background()
	recipient, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	mustKEK(t, p, 1)
	mustKEK(t, p, 2)
	pt, aad := []byte("version one"), []byte("aad")
	sealed1 := mustSeal(t, p, 1, pt, aad)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var v1Errs []error
	v1Ops, v2Counts := 0, map[string]int{}
	for g := range 6 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				got, err := p.Open(ctx, 1, sealed1, aad)
				if err == nil && !bytes.Equal(got, pt) {
					err = errors.New("wrong plaintext")
				}
				if err == nil && g%2 == 0 {
					var s []byte
					if s, err = p.Seal(ctx, 1, pt, aad); err == nil {
						_, err = p.Open(ctx, 1, s, aad)
					}
				}
				mu.Lock()
				v1Ops++
				if err != nil {
					v1Errs = append(v1Errs, fmt.Errorf("goroutine %d: %w", g, err))
				}
				mu.Unlock()
			}
		})
	}
	// v2 load runs only while v2 is destroyed, not while it is re-created: SoftHSM 2.6.1 fails
	// C_GenerateKey of a token object with CKR_GENERAL_ERROR while other sessions search the
	// token's objects (as a lookup of a missing version does), with or without DestroyKEK.
	v2Load := func() (stop func()) {
		stopV2 := make(chan struct{})
		var wg2 sync.WaitGroup
		for range 2 {
			wg2.Go(func() {
				for {
					select {
					case <-stopV2:
						return
					default:
					}
					s, err := p.Seal(ctx, 2, pt, aad)
					if err == nil {
						_, err = p.Open(ctx, 2, s, aad)
					}
					if err == nil {
						_, err = p.WrapKEK(ctx, 2, &recipient.PublicKey)
					}
					key := "ok"
					switch {
					case err == nil:
					case errors.Is(err, hsm.ErrKEKNotFound):
						key = "not found"
					default:
						key = err.Error()
					}
					mu.Lock()
					v2Counts[key]++
					mu.Unlock()
				}
			})
		}
		return func() { close(stopV2); wg2.Wait() }
	}
	// grew waits (up to 5s) until count() exceeds from; the load goroutines
	// keep running meanwhile.
	grew := func(what string, count func() int, from int) {
		t.Helper()
		if err := waitFor(t, 5*time.Second, func() error {
			if n := count(); n <= from {
				return fmt.Errorf("still %d", n)
			}
			return nil
		}); err != nil {
			t.Errorf("no new %s within 5s: %v", what, err)
		}
	}
	locked := func(f func() int) func() int {
		return func() int { mu.Lock(); defer mu.Unlock(); return f() }
	}
	v1Count := locked(func() int { return v1Ops })
	v2Count := func(key string) func() int { return locked(func() int { return v2Counts[key] }) }

	grew("v1 operation", v1Count, 0)
	for round := range 10 {
		// Destroy while v2 operations work, and keep them going until they
		// see the destroyed version.
		okBefore := v2Count("ok")()
		stopV2 := v2Load()
		grew(fmt.Sprintf("successful v2 operation in round %d", round), v2Count("ok"), okBefore)
		if err := p.DestroyKEK(ctx, 2); err != nil {
			t.Errorf("round %d: DestroyKEK(2): %v", round, err)
		}
		notFoundBefore := v2Count("not found")()
		grew(fmt.Sprintf("v2 operation failing with not found in round %d", round), v2Count("not found"), notFoundBefore)
		stopV2()
		if _, err := p.GenerateKEK(ctx, 2); err != nil {
			t.Errorf("round %d: GenerateKEK(2): %v", round, err)
		}
	}
	if err := p.DestroyKEK(ctx, 2); err != nil {
		t.Errorf("DestroyKEK(2): %v", err)
	}
	grew("v1 operation after the last DestroyKEK", v1Count, v1Count())
	close(stop)
	wg.Wait()
	for _, err := range v1Errs {
		t.Error(err)
	}
	for k, n := range v2Counts {
		if k != "ok" && k != "not found" {
			t.Errorf("%d operations on v2 failed with: %s", n, k)
		}
	}
	if v1Ops == 0 || v2Counts["ok"] == 0 || v2Counts["not found"] == 0 {
		t.Errorf("load did not cover the cases: v1 operations %d, v2 %v", v1Ops, v2Counts)
	}
	t.Logf("v1 operations: %d, v2: %v", v1Ops, v2Counts)
	wantNotFound(t, p, 2, sealed1, &recipient.PublicKey)
}

func TestDestroyKEKConcurrent(t *testing.T) {
	t.Run("softhsm", func(t *testing.T) {
		p, _ := newToken(t, "destroy-concurrent")
		testDestroyConcurrent(t, p)
		if err := p.Health(context.Background()); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("memory", func(t *testing.T) {
		m := hsm.NewMemory()
		t.Cleanup(func() { _ = m.Close() })
		testDestroyConcurrent(t, m)
	})
}

// TestDestroyKEKOutage: a DestroyKEK while the token is away fails with ErrUnavailable (even as
// the first call that meets the outage, when SoftHSM just stops listing token objects) and
// destroys nothing; after the token is back it works.
func TestDestroyKEKOutage(t *testing.T) {
	ctx := context.Background()
	p, cfg := newToken(t, "destroy-outage")
	kcv := mustKEK(t, p, 1)
	pt, aad := []byte("x"), []byte("y")
	sealed := mustSeal(t, p, 1, pt, aad)

	dir := softhsmtest.TokenDir(cfg)
	if err := os.Rename(dir, dir+".away"); err != nil {
		t.Fatal(err)
	}
	restored := false
	defer func() {
		if !restored {
			_ = os.Rename(dir+".away", dir)
		}
	}()
	for range 2 {
		err := p.DestroyKEK(ctx, 1)
		if !errors.Is(err, hsm.ErrUnavailable) {
			t.Fatalf("DestroyKEK during outage: %v; want ErrUnavailable", err)
		}
		if strings.Contains(err.Error(), softhsmtest.PIN) {
			t.Fatal("PIN in error")
		}
		time.Sleep(120 * time.Millisecond)
	}
	if err := os.Rename(dir+".away", dir); err != nil {
		t.Fatal(err)
	}
	restored = true
	if err := waitFor(t, 10*time.Second, func() error { return p.Health(ctx) }); err != nil {
		t.Fatalf("no recovery: %v", err)
	}
	if got, err := p.KEKCheckValue(ctx, 1); err != nil || !bytes.Equal(got, kcv) {
		t.Fatalf("KEKCheckValue(1) after the outage = %x, %v; want %x (nothing destroyed)", got, err, kcv)
	}
	mustOpen(t, p, 1, sealed, aad, pt)
	if err := p.DestroyKEK(ctx, 1); err != nil {
		t.Fatalf("DestroyKEK after recovery: %v", err)
	}
	if _, err := p.KEKCheckValue(ctx, 1); !errors.Is(err, hsm.ErrKEKNotFound) {
		t.Fatalf("KEKCheckValue(1) after destroy: %v; want ErrKEKNotFound", err)
	}
}
