package hsm_test

import (
	"context"
	"testing"

	"github.com/cabinet-kms/cabinet/hsm"
)

// The KEK cannot be read out of the HSM: CKA_VALUE of the token object and
// of the working session copy are refused (sensitive), generated or
// unwrapped.
func TestKEKValueCannotBeRead(t *testing.T) {
	ctx := context.Background()
	a, _ := newToken(t, "extract-a")
	if _, err := a.GenerateKEK(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := a.KEKCheckValue(ctx, 1); err != nil {
		t.Fatal(err)
	}
	tokErr, copyErr := hsm.ReadKEKValue(a, 1)
	if tokErr == nil || copyErr == nil {
		t.Fatalf("KEK value readable: token object err=%v, session copy err=%v", tokErr, copyErr)
	}
	t.Logf("generated KEK: token object %v; session copy %v", tokErr, copyErr)

	// A KEK that arrived by unwrap (a joiner's) is just as sealed.
	b, _ := newToken(t, "extract-b")
	pub, err := b.EnsureIdentity(ctx)
	if err != nil {
		t.Fatal(err)
	}
	wrapped, err := a.WrapKEK(ctx, 1, pub)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.UnwrapKEK(ctx, 1, wrapped); err != nil {
		t.Fatal(err)
	}
	if _, err := b.KEKCheckValue(ctx, 1); err != nil {
		t.Fatal(err)
	}
	tokErr, copyErr = hsm.ReadKEKValue(b, 1)
	if tokErr == nil || copyErr == nil {
		t.Fatalf("unwrapped KEK value readable: token object err=%v, session copy err=%v", tokErr, copyErr)
	}
}
