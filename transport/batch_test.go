package transport

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/keyops"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

// Every item of a BatchEncrypt gets what a separate Encrypt of it gets: the
// same code and message on failure, a ciphertext that decrypts on success.
func TestBatchEncryptMatchesEncrypt(t *testing.T) {
	e := newAPIEnv(t)
	ctx := context.Background()
	kc := cabinetpb.NewKeyServiceClient(e.admin)
	mk := func(req *cabinetpb.CreateKeyRequest) string {
		k, err := kc.CreateKey(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return k.GetKey().GetKeyId()
	}
	aesID := mk(&cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, Alias: "batch"})
	other := mk(&cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256})
	rsaID := mk(&cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_RSA_2048, Usage: cabinetpb.KeyUsage_ENCRYPT_DECRYPT})
	disabled := mk(&cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256})
	if _, err := kc.DisableKey(ctx, &cabinetpb.KeyRefRequest{KeyId: disabled}); err != nil {
		t.Fatal(err)
	}
	if _, err := kc.CreateGrant(ctx, &cabinetpb.CreateGrantRequest{KeyId: aesID, Principal: "bob", Operations: []string{"encrypt", "decrypt"},
		EncryptionContextEquals: map[string]string{"tenant": "acme"}}); err != nil {
		t.Fatal(err)
	}
	acme := map[string]string{"tenant": "acme"}
	items := []*cabinetpb.EncryptRequest{
		{KeyId: aesID, Plaintext: []byte("one"), EncryptionContext: acme},
		{KeyId: "nope", Plaintext: []byte("x")},
		{KeyId: "", Plaintext: []byte("x")},
		{KeyId: "batch", Plaintext: []byte("by alias"), EncryptionContext: acme},
		{KeyId: aesID, Plaintext: []byte("other tenant"), EncryptionContext: map[string]string{"tenant": "evil"}},
		{KeyId: aesID, Plaintext: make([]byte, keyops.MaxPlaintextLen+1), EncryptionContext: acme},
		{KeyId: aesID, Plaintext: []byte("x"), EncryptionContext: map[string]string{"tenant": "acme", "big": strings.Repeat("v", 2000)}},
		{KeyId: rsaID, Plaintext: []byte("rsa")},
		{KeyId: rsaID, Plaintext: []byte("rsa"), EncryptionContext: acme},
		{KeyId: disabled, Plaintext: []byte("x")},
		{KeyId: other, Plaintext: []byte("second key")},
		{KeyId: aesID, Plaintext: nil, EncryptionContext: acme},
		{KeyId: "nope", Plaintext: []byte("again")},
		{KeyId: aesID, Plaintext: []byte("strong"), EncryptionContext: acme, Consistency: cabinetpb.Consistency_STRONG},
	}
	bob := dialTLS(t, e.addr, tlsutil.ClientConfig(issueClient(t, e.ca, "bob", tlsutil.RoleClient), e.ca.Pool()))
	for _, who := range []struct {
		name string
		kc   cabinetpb.KeyServiceClient
	}{{"admin", kc}, {"client", cabinetpb.NewKeyServiceClient(bob)}} {
		t.Run(who.name, func(t *testing.T) {
			batch, err := who.kc.BatchEncrypt(ctx, &cabinetpb.BatchEncryptRequest{Items: items})
			if err != nil || len(batch.GetResults()) != len(items) {
				t.Fatalf("batch: %v", err)
			}
			successes := 0
			for i, it := range items {
				got := batch.GetResults()[i]
				want, err := who.kc.Encrypt(ctx, it)
				if err != nil {
					st := status.Convert(err)
					if got.GetResponse() != nil || got.GetError().GetCode() != st.Code().String() || got.GetError().GetMessage() != st.Message() {
						t.Fatalf("item %d: batch %v, Encrypt %v", i, got, err)
					}
					continue
				}
				successes++
				r := got.GetResponse()
				if got.GetError() != nil || r.GetKeyId() != want.GetKeyId() || r.GetKeyVersion() != want.GetKeyVersion() || len(r.GetCiphertext()) != len(want.GetCiphertext()) {
					t.Fatalf("item %d: batch %v, Encrypt %v", i, got, want)
				}
				if it.GetKeyId() == rsaID {
					continue // RSA-OAEP: checked by its own tests
				}
				d, err := kc.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: r.GetCiphertext(), EncryptionContext: it.GetEncryptionContext()})
				if err != nil || !bytes.Equal(d.GetPlaintext(), it.GetPlaintext()) {
					t.Fatalf("item %d: decrypt = %v", i, err)
				}
			}
			if successes < 3 {
				t.Fatalf("only %d items succeeded", successes)
			}
		})
	}
}
