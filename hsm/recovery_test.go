package hsm_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"testing"

	"github.com/cabinet-kms/cabinet/hsm"
)

func recoveryKeyPair(t *testing.T) (*rsa.PublicKey, []byte) {
	t.Helper()
	// 2048 bits keeps the test fast; the CLI makes 4096-bit recovery keys.
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return &k.PublicKey, der
}

// TestRecoveryUnwrapSoftHSM: a KEK exported from one token under a recovery public key is
// unwrapped into a brand-new token with the recovery private key, as a persistent token
// object; the recovery key does not stay in the token; sealed data crosses over.
func TestRecoveryUnwrapSoftHSM(t *testing.T) {
	ctx := context.Background()
	src, _ := newToken(t, "recovery-src")
	kcv := mustKEK(t, src, 1)
	recPub, recPriv := recoveryKeyPair(t)
	wrapped, err := src.WrapKEK(ctx, 1, recPub)
	if err != nil {
		t.Fatal(err)
	}
	sealed := mustSeal(t, src, 1, []byte("before the disaster"), []byte("aad"))

	dst, dstCfg := newToken(t, "recovery-dst")
	privBefore, err := hsm.CountPrivateKeys(dst, true)
	if err != nil {
		t.Fatal(err)
	}
	got, err := dst.UnwrapKEKWithRecoveryKey(ctx, 1, recPriv, wrapped)
	if err != nil {
		t.Fatalf("UnwrapKEKWithRecoveryKey: %v", err)
	}
	if string(got) != string(kcv) {
		t.Fatalf("check value %x, want %x", got, kcv)
	}
	for _, token := range []bool{true, false} {
		n, err := hsm.CountPrivateKeys(dst, token)
		if err != nil {
			t.Fatal(err)
		}
		want := 0
		if token {
			want = privBefore
		}
		if n != want {
			t.Errorf("private keys (token objects: %v) after the import: %d, want %d (the recovery key must not stay)", token, n, want)
		}
	}
	mustOpen(t, dst, 1, sealed, []byte("aad"), []byte("before the disaster"))

	// Again: same KEK is a no-op; a different KEK under the same version is a mismatch.
	if _, err := dst.UnwrapKEKWithRecoveryKey(ctx, 1, recPriv, wrapped); err != nil {
		t.Fatalf("repeat: %v", err)
	}
	other, _ := newToken(t, "recovery-other")
	mustKEK(t, other, 1)
	otherWrapped, err := other.WrapKEK(ctx, 1, recPub)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dst.UnwrapKEKWithRecoveryKey(ctx, 1, recPriv, otherWrapped); !errors.Is(err, hsm.ErrKEKMismatch) {
		t.Fatalf("different KEK: %v, want ErrKEKMismatch", err)
	}

	// The KEK persists as a token object: a new login still has it.
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
	re := openToken(t, dstCfg)
	if got, err := re.KEKCheckValue(ctx, 1); err != nil || string(got) != string(kcv) {
		t.Fatalf("after reopen: %x, %v", got, err)
	}
	mustOpen(t, re, 1, sealed, []byte("aad"), []byte("before the disaster"))

	// Wrong recovery key, garbage, empty: errors, nothing stored.
	_, wrongPriv := recoveryKeyPair(t)
	if _, err := re.UnwrapKEKWithRecoveryKey(ctx, 2, wrongPriv, wrapped); err == nil {
		t.Fatal("wrong recovery key accepted")
	}
	if _, err := re.KEKCheckValue(ctx, 2); !errors.Is(err, hsm.ErrKEKNotFound) {
		t.Fatalf("v2 after failed unwrap: %v", err)
	}
	for name, args := range map[string][2][]byte{
		"not pkcs8": {[]byte("nope"), wrapped},
		"empty":     {recPriv, nil},
		"short":     {recPriv, wrapped[:10]},
	} {
		if _, err := re.UnwrapKEKWithRecoveryKey(ctx, 3, args[0], args[1]); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// TestRecoveryUnwrapMemory: Memory and a SoftHSM token interoperate both ways.
func TestRecoveryUnwrapMemory(t *testing.T) {
	ctx := context.Background()
	recPub, recPriv := recoveryKeyPair(t)
	mem := hsm.NewMemory()
	kcv := mustKEK(t, mem, 1)
	wrapped, err := mem.WrapKEK(ctx, 1, recPub)
	if err != nil {
		t.Fatal(err)
	}
	tok, _ := newToken(t, "recovery-mem")
	if got, err := tok.UnwrapKEKWithRecoveryKey(ctx, 1, recPriv, wrapped); err != nil || string(got) != string(kcv) {
		t.Fatalf("memory -> softhsm: %x, %v", got, err)
	}
	mem2 := hsm.NewMemory()
	back, err := tok.WrapKEK(ctx, 1, recPub)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := mem2.UnwrapKEKWithRecoveryKey(ctx, 1, recPriv, back); err != nil || string(got) != string(kcv) {
		t.Fatalf("softhsm -> memory: %x, %v", got, err)
	}
	if mem2.OAEPHash() != tok.OAEPHash() {
		t.Fatalf("OAEP hashes differ: %v vs %v", mem2.OAEPHash(), tok.OAEPHash())
	}
}
