package transport

import (
	"context"
	"crypto/sha256"
	"fmt"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/cabinet-kms/cabinet/keyops"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

func TestEverySpecOverTLS(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	kc := cabinetpb.NewKeyServiceClient(e.admin)
	msg := []byte("the message")
	digest := sha256.Sum256(msg)
	signers := []struct {
		spec cabinetpb.KeySpec
		alg  string
	}{
		{cabinetpb.KeySpec_RSA_2048, "RSASSA_PSS_SHA_256"},
		{cabinetpb.KeySpec_RSA_2048, "RSASSA_PKCS1_V1_5_SHA_256"},
		{cabinetpb.KeySpec_EC_P256, "ECDSA_SHA_256"},
		{cabinetpb.KeySpec_EC_P384, "ECDSA_SHA_384"},
		{cabinetpb.KeySpec_ED25519, "ED25519"},
	}
	for _, s := range signers {
		k, err := kc.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: s.spec, Usage: cabinetpb.KeyUsage_SIGN_VERIFY})
		if err != nil {
			t.Fatalf("%v: %v", s.spec, err)
		}
		id := k.GetKey().GetKeyId()
		sig, err := kc.Sign(ctx, &cabinetpb.SignRequest{KeyId: id, Message: msg, SigningAlgorithm: s.alg})
		if err != nil {
			t.Fatalf("%v sign: %v", s.spec, err)
		}
		v, err := kc.Verify(ctx, &cabinetpb.VerifyRequest{KeyId: id, Message: msg, SigningAlgorithm: s.alg, Signature: sig.GetSignature()})
		if err != nil || !v.GetValid() {
			t.Fatalf("%v verify: %v %v", s.spec, v, err)
		}
		bad, err := kc.Verify(ctx, &cabinetpb.VerifyRequest{KeyId: id, Message: []byte("other"), SigningAlgorithm: s.alg, Signature: sig.GetSignature()})
		if err != nil || bad.GetValid() {
			t.Fatalf("%v verify of another message: %v %v", s.spec, bad, err)
		}
		if s.spec != cabinetpb.KeySpec_ED25519 && (s.spec != cabinetpb.KeySpec_EC_P384) {
			ds, err := kc.Sign(ctx, &cabinetpb.SignRequest{KeyId: id, Message: digest[:], MessageType: cabinetpb.MessageType_DIGEST, SigningAlgorithm: s.alg})
			if err != nil {
				t.Fatalf("%v sign digest: %v", s.spec, err)
			}
			if v, err := kc.Verify(ctx, &cabinetpb.VerifyRequest{KeyId: id, Message: msg, SigningAlgorithm: s.alg, Signature: ds.GetSignature()}); err != nil || !v.GetValid() {
				t.Fatalf("%v digest signature does not verify over the message: %v", s.spec, err)
			}
		}
		pk, err := kc.GetPublicKey(ctx, &cabinetpb.GetPublicKeyRequest{KeyId: id})
		if err != nil || len(pk.GetPublicKeyDer()) == 0 || len(pk.GetSigningAlgorithms()) == 0 {
			t.Fatalf("%v public key: %v", s.spec, err)
		}
		if _, err := kc.Encrypt(ctx, &cabinetpb.EncryptRequest{KeyId: id, Plaintext: msg}); code(err) != codes.InvalidArgument {
			t.Fatalf("%v encrypt with a signing key: %v", s.spec, err)
		}
	}

	// RSA encryption keys: raw OAEP, decrypt names the key.
	rk, err := kc.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_RSA_2048, Usage: cabinetpb.KeyUsage_ENCRYPT_DECRYPT})
	if err != nil {
		t.Fatal(err)
	}
	rct, err := kc.Encrypt(ctx, &cabinetpb.EncryptRequest{KeyId: rk.GetKey().GetKeyId(), Plaintext: msg})
	if err != nil {
		t.Fatal(err)
	}
	rpt, err := kc.Decrypt(ctx, &cabinetpb.DecryptRequest{KeyId: rk.GetKey().GetKeyId(), Ciphertext: rct.GetCiphertext()})
	if err != nil || string(rpt.GetPlaintext()) != string(msg) {
		t.Fatalf("RSA decrypt: %v", err)
	}

	// HMAC.
	for _, spec := range []cabinetpb.KeySpec{cabinetpb.KeySpec_HMAC_SHA256, cabinetpb.KeySpec_HMAC_SHA512} {
		hk, err := kc.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: spec})
		if err != nil {
			t.Fatal(err)
		}
		mac, err := kc.GenerateMac(ctx, &cabinetpb.GenerateMacRequest{KeyId: hk.GetKey().GetKeyId(), Message: msg})
		if err != nil {
			t.Fatal(err)
		}
		ok, err := kc.VerifyMac(ctx, &cabinetpb.VerifyMacRequest{KeyId: hk.GetKey().GetKeyId(), Message: msg, Mac: mac.GetMac()})
		if err != nil || !ok.GetValid() {
			t.Fatalf("%v verify mac: %v", spec, err)
		}
		mac.Mac[0] ^= 1
		if ok, err := kc.VerifyMac(ctx, &cabinetpb.VerifyMacRequest{KeyId: hk.GetKey().GetKeyId(), Message: msg, Mac: mac.GetMac()}); err != nil || ok.GetValid() {
			t.Fatalf("%v tampered mac accepted: %v", spec, err)
		}
	}
	if r, err := kc.GenerateRandom(ctx, &cabinetpb.GenerateRandomRequest{NumberOfBytes: 48}); err != nil || len(r.GetRandom()) != 48 {
		t.Fatalf("random: %v", err)
	}
}

func TestRotationReEncryptBatchAndStates(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	kc := cabinetpb.NewKeyServiceClient(e.admin)
	k, err := kc.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, Alias: "app"})
	if err != nil {
		t.Fatal(err)
	}
	id := k.GetKey().GetKeyId()
	old, err := kc.Encrypt(ctx, &cabinetpb.EncryptRequest{KeyId: "app", Plaintext: []byte("v1 data")})
	if err != nil {
		t.Fatal(err)
	}
	rot, err := kc.RotateKey(ctx, &cabinetpb.KeyRefRequest{KeyId: "app", RequestId: "r"})
	if err != nil || rot.GetKey().GetPrimaryVersion() != 2 {
		t.Fatalf("rotate: %v %v", rot, err)
	}
	if again, err := kc.RotateKey(ctx, &cabinetpb.KeyRefRequest{KeyId: "app", RequestId: "r"}); err != nil || again.GetKey().GetPrimaryVersion() != 2 {
		t.Fatalf("retried rotate had a second effect: %v %v", again, err)
	}
	re, err := kc.ReEncrypt(ctx, &cabinetpb.ReEncryptRequest{Ciphertext: old.GetCiphertext()})
	if err != nil || re.GetSourceKeyVersion() != 1 || re.GetKeyVersion() != 2 {
		t.Fatalf("re-encrypt to primary: %v %v", re, err)
	}
	if d, err := kc.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: re.GetCiphertext()}); err != nil || string(d.GetPlaintext()) != "v1 data" {
		t.Fatalf("decrypt re-encrypted: %v", err)
	}
	if _, err := kc.SetMinDecryptionVersion(ctx, &cabinetpb.SetMinDecryptionVersionRequest{KeyId: id, Version: 2}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: old.GetCiphertext()}); code(err) != codes.FailedPrecondition {
		t.Fatalf("decrypt below the minimum version: %v", err)
	}

	// Batch: per-item results, one bad item does not fail the rest.
	batch, err := kc.BatchEncrypt(ctx, &cabinetpb.BatchEncryptRequest{Items: []*cabinetpb.EncryptRequest{
		{KeyId: id, Plaintext: []byte("a")}, {KeyId: "nope", Plaintext: []byte("b")}, {KeyId: id, Plaintext: []byte("c")},
	}})
	if err != nil || len(batch.GetResults()) != 3 || batch.GetResults()[1].GetError().GetCode() != "NotFound" || batch.GetResults()[2].GetResponse() == nil {
		t.Fatalf("batch encrypt: %v %v", batch, err)
	}
	if _, err := kc.BatchEncrypt(ctx, &cabinetpb.BatchEncryptRequest{Items: make([]*cabinetpb.EncryptRequest, MaxBatchItems+1)}); code(err) != codes.InvalidArgument {
		t.Fatalf("oversized batch: %v", err)
	}
	dec, err := kc.BatchDecrypt(ctx, &cabinetpb.BatchDecryptRequest{Items: []*cabinetpb.DecryptRequest{
		{Ciphertext: batch.GetResults()[0].GetResponse().GetCiphertext()}, {Ciphertext: []byte("junk")},
	}})
	if err != nil || string(dec.GetResults()[0].GetResponse().GetPlaintext()) != "a" || dec.GetResults()[1].GetError().GetCode() != "InvalidArgument" {
		t.Fatalf("batch decrypt: %v %v", dec, err)
	}

	// Disable / enable; revoke as compromised; admin-only override.
	fresh, _ := kc.Encrypt(ctx, &cabinetpb.EncryptRequest{KeyId: id, Plaintext: []byte("p")})
	if _, err := kc.DisableKey(ctx, &cabinetpb.KeyRefRequest{KeyId: id}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.Encrypt(ctx, &cabinetpb.EncryptRequest{KeyId: id, Plaintext: []byte("p")}); code(err) != codes.FailedPrecondition {
		t.Fatalf("encrypt with a disabled key: %v", err)
	}
	if _, err := kc.EnableKey(ctx, &cabinetpb.KeyRefRequest{KeyId: id}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.RevokeKey(ctx, &cabinetpb.RevokeKeyRequest{KeyId: id, Reason: cabinetpb.RevocationReason_KEY_COMPROMISE}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: fresh.GetCiphertext()}); code(err) != codes.FailedPrecondition {
		t.Fatalf("decrypt with a compromised key: %v", err)
	}
	if d, err := kc.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: fresh.GetCiphertext(), AllowCompromised: true}); err != nil || string(d.GetPlaintext()) != "p" {
		t.Fatalf("admin recovery decrypt: %v", err)
	}
	nodeKC := cabinetpb.NewKeyServiceClient(e.node)
	if _, err := nodeKC.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: fresh.GetCiphertext(), AllowCompromised: true}); code(err) != codes.PermissionDenied {
		t.Fatalf("non-admin override: %v", err)
	}
	// Destruction needs at least the server minimum window.
	if _, err := kc.ScheduleKeyDestruction(ctx, &cabinetpb.ScheduleKeyDestructionRequest{KeyId: id, PendingWindowSeconds: 60}); code(err) != codes.InvalidArgument {
		t.Fatalf("window below the minimum: %v", err)
	}
	sd, err := kc.ScheduleKeyDestruction(ctx, &cabinetpb.ScheduleKeyDestructionRequest{KeyId: id})
	if err != nil || sd.GetKey().GetState() != cabinetpb.KeyState_PENDING_DESTRUCTION || sd.GetKey().GetDestroyAfter() == nil {
		t.Fatalf("schedule: %v %v", sd, err)
	}
	if c, err := kc.CancelKeyDestruction(ctx, &cabinetpb.KeyRefRequest{KeyId: id}); err != nil || c.GetKey().GetState() != cabinetpb.KeyState_COMPROMISED {
		t.Fatalf("cancel: %v %v", c, err)
	}
	// Aliases move.
	k2, _ := kc.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256})
	if _, err := kc.SetAlias(ctx, &cabinetpb.SetAliasRequest{Alias: "app", KeyId: k2.GetKey().GetKeyId()}); err != nil {
		t.Fatal(err)
	}
	if d, err := kc.DescribeKey(ctx, &cabinetpb.DescribeKeyRequest{KeyId: "app"}); err != nil || d.GetKey().GetKeyId() != k2.GetKey().GetKeyId() {
		t.Fatalf("alias did not move: %v", err)
	}
}

func TestImportKeyOverTLS(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	kc := cabinetpb.NewKeyServiceClient(e.admin)
	params, err := kc.GetImportParameters(ctx, &cabinetpb.GetImportParametersRequest{Spec: cabinetpb.KeySpec_AES_256})
	if err != nil {
		t.Fatal(err)
	}
	material := make([]byte, 32)
	for i := range material {
		material[i] = byte(i)
	}
	wrapped, err := keyops.WrapForImport(params.GetPublicKeyDer(), material)
	if err != nil {
		t.Fatal(err)
	}
	k, err := kc.ImportKey(ctx, &cabinetpb.ImportKeyRequest{ImportToken: params.GetImportToken(), WrappedMaterial: wrapped, Alias: "byok"})
	if err != nil || k.GetKey().GetOrigin() != "IMPORTED" {
		t.Fatalf("import: %v %v", k, err)
	}
	ct, err := kc.Encrypt(ctx, &cabinetpb.EncryptRequest{KeyId: "byok", Plaintext: []byte("x")})
	if err != nil {
		t.Fatal(err)
	}
	if d, err := kc.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: ct.GetCiphertext()}); err != nil || string(d.GetPlaintext()) != "x" {
		t.Fatalf("decrypt with imported key: %v", err)
	}
	// The token is single use.
	if _, err := kc.ImportKey(ctx, &cabinetpb.ImportKeyRequest{ImportToken: params.GetImportToken(), WrappedMaterial: wrapped}); code(err) != codes.PermissionDenied {
		t.Fatalf("reused import token: %v", err)
	}
	if _, err := kc.RotateKey(ctx, &cabinetpb.KeyRefRequest{KeyId: "byok"}); code(err) != codes.FailedPrecondition {
		t.Fatalf("rotate imported key: %v", err)
	}
}

// Concurrent rotations through the API never fail with a version conflict:
// each one adds exactly one version.
func TestConcurrentRotationsAllSucceed(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	kc := cabinetpb.NewKeyServiceClient(e.admin)
	k, err := kc.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256})
	if err != nil {
		t.Fatal(err)
	}
	const n = 8
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func(i int) {
			_, err := kc.RotateKey(ctx, &cabinetpb.KeyRefRequest{KeyId: k.GetKey().GetKeyId(), RequestId: fmt.Sprintf("rot-%d", i)})
			errs <- err
		}(i)
	}
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil {
			t.Errorf("rotation: %v", err)
		}
	}
	d, err := kc.DescribeKey(ctx, &cabinetpb.DescribeKeyRequest{KeyId: k.GetKey().GetKeyId()})
	if err != nil || d.GetKey().GetPrimaryVersion() != n+1 {
		t.Fatalf("after %d rotations primary is %d: %v", n, d.GetKey().GetPrimaryVersion(), err)
	}
	// Retrying one of them adds nothing.
	if _, err := kc.RotateKey(ctx, &cabinetpb.KeyRefRequest{KeyId: k.GetKey().GetKeyId(), RequestId: "rot-3"}); err != nil {
		t.Fatal(err)
	}
	if d, _ := kc.DescribeKey(ctx, &cabinetpb.DescribeKeyRequest{KeyId: k.GetKey().GetKeyId()}); d.GetKey().GetPrimaryVersion() != n+1 {
		t.Fatalf("a retried rotation added a version: %d", d.GetKey().GetPrimaryVersion())
	}
}
