package transport

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"slices"
	"strings"
	"testing"

	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
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
				if got.GetError() != nil || r.GetKeyId() != want.GetKeyId() || r.GetKeyVersion() != want.GetKeyVersion() {
					t.Fatalf("item %d: batch %v, Encrypt %v", i, got, want)
				}
				if it.GetKeyId() == rsaID {
					// RSA-OAEP (checked by its own tests): the same output
					// as Encrypt's, in length.
					if len(r.GetCiphertext()) != len(want.GetCiphertext()) {
						t.Fatalf("item %d: RSA ciphertext of %d bytes, Encrypt's %d", i, len(r.GetCiphertext()), len(want.GetCiphertext()))
					}
					continue
				}
				// AES_256: format 2 (Encrypt's format 1 plus the 4-byte
				// index), the index being the item's position.
				ct := r.GetCiphertext()
				if ct[0] != 2 || want.GetCiphertext()[0] != 1 || len(ct) != len(want.GetCiphertext())+4 {
					t.Fatalf("item %d: batch ciphertext format %d (%d bytes), Encrypt's format %d (%d bytes)", i, ct[0], len(ct), want.GetCiphertext()[0], len(want.GetCiphertext()))
				}
				if ix := binary.BigEndian.Uint32(ct[38+int(ct[1]):]); ix != uint32(i) {
					t.Fatalf("item %d: index %d in its ciphertext", i, ix)
				}
				d, err := kc.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: ct, EncryptionContext: it.GetEncryptionContext()})
				if err != nil || !bytes.Equal(d.GetPlaintext(), it.GetPlaintext()) {
					t.Fatalf("item %d: decrypt = %v", i, err)
				}
				if who.name == "client" {
					continue // bob has no re-encrypt grant
				}
				re, err := kc.ReEncrypt(ctx, &cabinetpb.ReEncryptRequest{Ciphertext: ct, SourceEncryptionContext: it.GetEncryptionContext(), DestinationKeyId: other})
				if err != nil || re.GetCiphertext()[0] != 1 || re.GetSourceKeyId() != r.GetKeyId() || re.GetSourceKeyVersion() != r.GetKeyVersion() {
					t.Fatalf("item %d: ReEncrypt = %v", i, err)
				}
				d, err = kc.Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: re.GetCiphertext()})
				if err != nil || !bytes.Equal(d.GetPlaintext(), it.GetPlaintext()) {
					t.Fatalf("item %d: decrypt of the re-encrypted = %v", i, err)
				}
			}
			if successes < 3 {
				t.Fatalf("only %d items succeeded", successes)
			}
			// BatchDecrypt opens every AES ciphertext of the batch.
			var dreq cabinetpb.BatchDecryptRequest
			var want [][]byte
			for i, res := range batch.GetResults() {
				if res.GetResponse() != nil && items[i].GetKeyId() != rsaID {
					dreq.Items = append(dreq.Items, &cabinetpb.DecryptRequest{Ciphertext: res.GetResponse().GetCiphertext(), EncryptionContext: items[i].GetEncryptionContext()})
					want = append(want, items[i].GetPlaintext())
				}
			}
			dres, err := who.kc.BatchDecrypt(ctx, &dreq)
			if err != nil || len(dres.GetResults()) != len(want) {
				t.Fatalf("BatchDecrypt: %v", err)
			}
			for j, res := range dres.GetResults() {
				if res.GetError() != nil || !bytes.Equal(res.GetResponse().GetPlaintext(), want[j]) {
					t.Fatalf("BatchDecrypt item %d: %v", j, res.GetError())
				}
			}
		})
	}
}

// The format 2 vectors of keyops (docs/CIPHERTEXT.md), as the server makes
// them: the request's items 0, 1, 2 and 4 are the vector's, item 3 fails
// (unknown key) before encryption.
type v2Vector struct {
	Salt string `json:"salt_hex"`
	Keys []struct {
		KeyID    string `json:"key_id"`
		Version  uint32 `json:"version"`
		Material string `json:"material_hex"`
	} `json:"keys"`
	Items []struct {
		Key        int               `json:"key"`
		Index      uint32            `json:"index"`
		Context    map[string]string `json:"encryption_context"`
		Plaintext  string            `json:"plaintext_hex"`
		Ciphertext string            `json:"ciphertext_hex"`
	} `json:"items"`
}

// scriptedRand reads from next once it is set, from crypto/rand before.
type scriptedRand struct{ next io.Reader }

func (r *scriptedRand) Read(p []byte) (int, error) {
	if r.next != nil {
		return r.next.Read(p)
	}
	return rand.Read(p)
}

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// refOpenV2 opens a format 2 ciphertext from the written specification with
// the standard library only.
func refOpenV2(t *testing.T, material, ct []byte, encCtx map[string]string) ([]byte, error) {
	t.Helper()
	if ct[0] != 2 {
		t.Fatalf("format %d, want 2", ct[0])
	}
	idLen := int(ct[1])
	prefix, header := ct[:38+idLen], ct[:42+idLen]
	okm, err := hkdf.Key(sha256.New, material, prefix[len(prefix)-32:], "cabinet/v2/aes-256-gcm-batch"+string(prefix), 44)
	if err != nil {
		t.Fatal(err)
	}
	nonce := bytes.Clone(okm[32:])
	for i := range 4 {
		nonce[8+i] ^= header[38+idLen+i]
	}
	keys := make([]string, 0, len(encCtx))
	for k := range encCtx {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	aad := binary.BigEndian.AppendUint32(bytes.Clone(header), uint32(len(keys)))
	for _, k := range keys {
		aad = binary.BigEndian.AppendUint32(aad, uint32(len(k)))
		aad = append(aad, k...)
		aad = binary.BigEndian.AppendUint32(aad, uint32(len(encCtx[k])))
		aad = append(aad, encCtx[k]...)
	}
	block, _ := aes.NewCipher(okm[:32])
	gcm, _ := cipher.NewGCM(block)
	return gcm.Open(nil, nonce, ct[42+idLen:], aad)
}

// keyWithMaterial creates key id in env's state with the given material at
// version (lower versions get other material), as CreateKey and RotateKey
// would record it.
func (e *benchEnv) keyWithMaterial(t *testing.T, id string, version uint32, material []byte) {
	t.Helper()
	ctx := context.Background()
	for v := uint32(1); v <= version; v++ {
		m := bytes.Repeat([]byte{byte(v)}, 32)
		if v == version {
			m = material
		}
		blob, err := e.hsm.Seal(ctx, 1, m, keyops.MaterialAAD(id, v, fsmpb.KeySpec_KEY_SPEC_AES_256))
		if err != nil {
			t.Fatal(err)
		}
		wb := &fsmpb.WrappedBlob{KekVersion: 1, Blob: blob}
		var cmd *fsmpb.Command
		if v == 1 {
			cmd, err = fsm.NewCommand(fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, &fsmpb.CreateKey{KeyId: id, Spec: fsmpb.KeySpec_KEY_SPEC_AES_256,
				Usage: fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, Material: wb}, "create-"+id, "admin:alice")
		} else {
			cmd, err = fsm.NewCommand(fsmpb.CommandType_COMMAND_TYPE_ROTATE_KEY, &fsmpb.RotateKey{KeyId: id, Version: v, Material: wb},
				"rotate-"+id+"-"+string(rune('0'+v)), "admin:alice")
		}
		if err != nil {
			t.Fatal(err)
		}
		if res, err := e.fc.Propose(ctx, cmd); err != nil || res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
			t.Fatalf("key %s version %d: %v %v", id, v, res, err)
		}
	}
}

func TestBatchEncryptFormat2Vectors(t *testing.T) {
	raw, err := os.ReadFile("../keyops/testdata/vectors_v2.json")
	if err != nil {
		t.Fatal(err)
	}
	var vs []v2Vector
	if err := json.Unmarshal(raw, &vs); err != nil || len(vs) == 0 {
		t.Fatalf("vectors: %v", err)
	}
	v := vs[0]
	// The engine reads the fixed salt for the batch, crypto/rand otherwise
	// (setup, ReEncrypt, later batches).
	rnd := &scriptedRand{}
	e := newBenchEnvRand(t, rnd)
	for _, k := range v.Keys {
		e.keyWithMaterial(t, k.KeyID, k.Version, unhex(t, k.Material))
	}
	rnd.next = io.MultiReader(bytes.NewReader(unhex(t, v.Salt)), rand.Reader)
	last := v.Items[len(v.Items)-1].Index
	req := &cabinetpb.BatchEncryptRequest{Items: make([]*cabinetpb.EncryptRequest, last+1)}
	for i := range req.Items {
		req.Items[i] = &cabinetpb.EncryptRequest{KeyId: "k-nope", Plaintext: []byte("gap")}
	}
	for _, it := range v.Items {
		req.Items[it.Index] = &cabinetpb.EncryptRequest{KeyId: v.Keys[it.Key].KeyID, Plaintext: unhex(t, it.Plaintext), EncryptionContext: it.Context}
	}
	ctx := withNote(e.admin)
	res, err := e.srv.BatchEncrypt(ctx, req)
	if err != nil || len(res.GetResults()) != len(req.Items) {
		t.Fatalf("BatchEncrypt: %v", err)
	}
	var dreq cabinetpb.BatchDecryptRequest
	for _, it := range v.Items {
		k := v.Keys[it.Key]
		got := res.GetResults()[it.Index]
		want := unhex(t, it.Ciphertext)
		if r := got.GetResponse(); got.GetError() != nil || !bytes.Equal(r.GetCiphertext(), want) || r.GetKeyId() != k.KeyID || r.GetKeyVersion() != k.Version {
			t.Fatalf("item %d: %v; want %x", it.Index, got, want)
		}
		pt := unhex(t, it.Plaintext)
		if got, err := refOpenV2(t, unhex(t, k.Material), want, it.Context); err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("item %d: reference open = %x, %v", it.Index, got, err)
		}
		d, err := e.srv.Decrypt(withNote(e.admin), &cabinetpb.DecryptRequest{Ciphertext: want, EncryptionContext: it.Context})
		if err != nil || !bytes.Equal(d.GetPlaintext(), pt) || d.GetKeyId() != k.KeyID || d.GetKeyVersion() != k.Version {
			t.Fatalf("item %d: Decrypt = %v", it.Index, err)
		}
		re, err := e.srv.ReEncrypt(withNote(e.admin), &cabinetpb.ReEncryptRequest{Ciphertext: want, SourceEncryptionContext: it.Context, DestinationEncryptionContext: map[string]string{"moved": "yes"}})
		if err != nil || re.GetCiphertext()[0] != 1 || re.GetSourceKeyVersion() != k.Version {
			t.Fatalf("item %d: ReEncrypt = %v", it.Index, err)
		}
		if d, err := e.srv.Decrypt(withNote(e.admin), &cabinetpb.DecryptRequest{Ciphertext: re.GetCiphertext(), EncryptionContext: map[string]string{"moved": "yes"}}); err != nil || !bytes.Equal(d.GetPlaintext(), pt) {
			t.Fatalf("item %d: Decrypt(ReEncrypt) = %v", it.Index, err)
		}
		// A wrong context fails as format 1 does.
		if _, err := e.srv.Decrypt(withNote(e.admin), &cabinetpb.DecryptRequest{Ciphertext: want, EncryptionContext: map[string]string{"tenant": "evil"}}); status.Code(err).String() != "InvalidArgument" {
			t.Fatalf("item %d: Decrypt with a wrong context = %v", it.Index, err)
		}
		dreq.Items = append(dreq.Items, &cabinetpb.DecryptRequest{Ciphertext: want, EncryptionContext: it.Context})
	}
	for i, r := range res.GetResults() {
		if req.Items[i].GetKeyId() == "k-nope" && (r.GetResponse() != nil || r.GetError().GetCode() != "NotFound") {
			t.Fatalf("gap item %d: %v", i, r)
		}
	}
	dres, err := e.srv.BatchDecrypt(withNote(e.admin), &dreq)
	if err != nil {
		t.Fatal(err)
	}
	for j, r := range dres.GetResults() {
		if r.GetError() != nil || !bytes.Equal(r.GetResponse().GetPlaintext(), unhex(t, v.Items[j].Plaintext)) {
			t.Fatalf("BatchDecrypt item %d: %v", j, r.GetError())
		}
	}
	// A later batch gets a fresh salt and still opens with the reference.
	res2, err := e.srv.BatchEncrypt(withNote(e.admin), req)
	if err != nil {
		t.Fatal(err)
	}
	for _, it := range v.Items {
		ct := res2.GetResults()[it.Index].GetResponse().GetCiphertext()
		idLen := int(ct[1])
		if bytes.Equal(ct[6+idLen:38+idLen], unhex(t, v.Salt)) {
			t.Fatal("a second batch reused the salt")
		}
		if got, err := refOpenV2(t, unhex(t, v.Keys[it.Key].Material), ct, it.Context); err != nil || !bytes.Equal(got, unhex(t, it.Plaintext)) {
			t.Fatalf("item %d of a second batch: reference open = %v", it.Index, err)
		}
	}
}
