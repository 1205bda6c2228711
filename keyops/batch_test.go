package keyops

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// refOpen opens a format 1 ciphertext straight from docs/CIPHERTEXT.md with
// the standard library only (crypto/hkdf, crypto/aes, crypto/cipher),
// independently of the package's code: what the code before the
// allocation-free KDF and pooled buffers did.
func refOpen(t *testing.T, material, ct []byte, encCtx map[string]string) []byte {
	t.Helper()
	hdrLen := fixedHeaderLen + int(ct[1])
	header, salt := ct[:hdrLen], ct[hdrLen-saltLen:hdrLen]
	okm, err := hkdf.Key(sha256.New, material, salt, "cabinet/v1/aes-256-gcm"+string(header), 44)
	if err != nil {
		t.Fatal(err)
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
	pt, err := gcm.Open(nil, okm[32:], ct[hdrLen:], aad)
	if err != nil {
		t.Fatalf("reference open: %v", err)
	}
	return pt
}

func loadVectors(t *testing.T) []vector {
	t.Helper()
	raw, err := os.ReadFile(vectorsFile)
	if err != nil {
		t.Fatal(err)
	}
	var vs []vector
	if err := json.Unmarshal(raw, &vs); err != nil {
		t.Fatal(err)
	}
	return vs
}

// The frozen vectors (made by the code before the batch path) come out of
// one EncryptBatch byte for byte when the random source yields their salts
// in order, and decrypt with Decrypt.
func TestEncryptBatchReproducesVectors(t *testing.T) {
	vs := loadVectors(t)
	s := newTestSealer()
	var salts []byte
	var items []EncryptItem
	var keys []*fsmpb.KeyRecord
	for _, v := range vs {
		key := keyWithMaterial(t, s, v.KeyID, v.Version, mustHex(t, v.Material))
		keys = append(keys, key)
		salts = append(salts, mustHex(t, v.Salt)...)
		items = append(items, EncryptItem{Key: key, Plaintext: mustHex(t, v.Plaintext), Context: v.Context})
	}
	e, err := New(Config{Sealer: s, Rand: bytes.NewReader(salts)})
	if err != nil {
		t.Fatal(err)
	}
	e.EncryptBatch(context.Background(), items)
	for i, v := range vs {
		it := items[i]
		if it.Err != nil || it.Version != v.Version || !bytes.Equal(it.Ciphertext, mustHex(t, v.Ciphertext)) {
			t.Fatalf("%s: EncryptBatch = %x, %d, %v; want %s", v.Name, it.Ciphertext, it.Version, it.Err, v.Ciphertext)
		}
		if cap(it.Ciphertext) != len(it.Ciphertext) {
			t.Fatalf("%s: ciphertext has spare capacity %d (appending would overwrite its neighbour)", v.Name, cap(it.Ciphertext)-len(it.Ciphertext))
		}
		pt, _, _, err := e.Decrypt(context.Background(), lookupOf(keys[i]), mustHex(t, v.Ciphertext), v.Context, false)
		if err != nil || !bytes.Equal(pt, mustHex(t, v.Plaintext)) {
			t.Fatalf("%s: Decrypt(vector) = %x, %v", v.Name, pt, err)
		}
	}
}

// New ciphertexts, from Encrypt and EncryptBatch, open with the reference
// path; each batch item has its own salt.
func TestNewCiphertextsOpenWithReference(t *testing.T) {
	e, s := newTestEngine(t, 0)
	key := newTestKey(t, e, 2)
	material := materialOf(t, s, key, key.PrimaryVersion)
	encCtx := map[string]string{"tenant": "acme", "purpose": "backup", "empty": ""}
	ct, _, err := e.Encrypt(context.Background(), key, []byte("single"), encCtx)
	if err != nil {
		t.Fatal(err)
	}
	if got := refOpen(t, material, ct, encCtx); string(got) != "single" {
		t.Fatalf("reference open of Encrypt output = %q", got)
	}
	items := make([]EncryptItem, 100)
	for i := range items {
		pt := bytes.Repeat([]byte{byte(i)}, i*13)
		items[i] = EncryptItem{Key: key, Plaintext: pt, Context: encCtx}
		if i%3 == 0 {
			items[i].Context = nil
		}
	}
	e.EncryptBatch(context.Background(), items)
	salts := map[string]bool{}
	for i, it := range items {
		if it.Err != nil || it.Version != key.PrimaryVersion {
			t.Fatalf("item %d: %v, version %d", i, it.Err, it.Version)
		}
		if got := refOpen(t, material, it.Ciphertext, it.Context); !bytes.Equal(got, it.Plaintext) {
			t.Fatalf("item %d: reference open = %x", i, got)
		}
		pt, _, _, err := e.Decrypt(context.Background(), lookupOf(key), it.Ciphertext, it.Context, false)
		if err != nil || !bytes.Equal(pt, it.Plaintext) {
			t.Fatalf("item %d: Decrypt = %v", i, err)
		}
		p, _ := parseCiphertext(it.Ciphertext)
		if salts[string(p.salt)] {
			t.Fatalf("item %d reuses a salt", i)
		}
		salts[string(p.salt)] = true
	}
}

// Each item of a batch fails or succeeds exactly as a separate Encrypt
// would, with the same error, and a bad item does not affect the others.
func TestEncryptBatchPerItemErrors(t *testing.T) {
	e, s := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	disabled := cloneKey(key)
	disabled.State = fsmpb.KeyState_KEY_STATE_DISABLED
	rsa := newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, 1)
	noMaterial := cloneKey(key)
	noMaterial.KeyId = "k-nomaterial"
	noMaterial.Versions[0].Material = nil
	badID := cloneKey(key)
	badID.KeyId = "k-not valid!"
	bigCtx := map[string]string{"k": strings.Repeat("v", MaxContextValueLen+1)}
	ok := map[string]string{"a": "b"}
	items := []EncryptItem{
		{Key: key, Plaintext: []byte("one"), Context: ok},
		{Key: key, Plaintext: make([]byte, MaxPlaintextLen+1)},
		{Key: key, Plaintext: []byte("x"), Context: bigCtx},
		{Key: disabled, Plaintext: []byte("x")},
		{Key: rsa, Plaintext: []byte("x")},
		{Key: noMaterial, Plaintext: []byte("x")},
		{Key: badID, Plaintext: []byte("x")},
		{Key: key, Plaintext: nil, Context: ok},
		{Key: key, Plaintext: make([]byte, MaxPlaintextLen)},
	}
	e.EncryptBatch(context.Background(), items)
	for i, it := range items {
		ct, v, err := e.Encrypt(context.Background(), it.Key, it.Plaintext, it.Context)
		if (err == nil) != (it.Err == nil) || (err != nil && err.Error() != it.Err.Error()) {
			t.Fatalf("item %d: batch error %v, Encrypt error %v", i, it.Err, err)
		}
		for _, sentinel := range []error{ErrInvalidArgument, ErrKeyState, ErrUnwrap, ErrKeyNotFound, ErrVersionNotFound, ErrUnsupported} {
			if errors.Is(err, sentinel) != errors.Is(it.Err, sentinel) {
				t.Fatalf("item %d: errors.Is(%v) differs: batch %v, Encrypt %v", i, sentinel, it.Err, err)
			}
		}
		if err != nil {
			if it.Ciphertext != nil || it.Version != 0 {
				t.Fatalf("item %d: failed item has output", i)
			}
			continue
		}
		if it.Version != v || len(it.Ciphertext) != len(ct) {
			t.Fatalf("item %d: version %d / %d, length %d / %d", i, it.Version, v, len(it.Ciphertext), len(ct))
		}
		pt, _, _, err := e.Decrypt(context.Background(), lookupOf(key), it.Ciphertext, it.Context, false)
		if err != nil || !bytes.Equal(pt, it.Plaintext) {
			t.Fatalf("item %d: Decrypt = %v", i, err)
		}
	}

	// An HSM failure fails the items that need an unwrap, and every one of
	// them tries the HSM itself, as separate Encrypts would.
	e.Forget(key.KeyId)
	down := errTestHSMDown
	s.openErr.Store(&down)
	opens := s.opens.Load()
	items = []EncryptItem{{Key: key, Plaintext: []byte("a")}, {Key: key, Plaintext: []byte("b")}}
	e.EncryptBatch(context.Background(), items)
	for i, it := range items {
		if !errors.Is(it.Err, ErrUnwrap) || it.Ciphertext != nil {
			t.Fatalf("item %d with the HSM down: %v", i, it.Err)
		}
	}
	if n := s.opens.Load() - opens; n != 2 {
		t.Fatalf("HSM opens = %d, want 2", n)
	}
	s.openErr.Store(nil)

	// A failing random source fails every item that reached it.
	e2, err := New(Config{Sealer: s, Rand: bytes.NewReader(make([]byte, saltLen))})
	if err != nil {
		t.Fatal(err)
	}
	items = []EncryptItem{{Key: key, Plaintext: []byte("a")}, {Key: disabled, Plaintext: []byte("b")}, {Key: key, Plaintext: []byte("c")}}
	e2.EncryptBatch(context.Background(), items)
	if !errors.Is(items[0].Err, ErrUnwrap) || !errors.Is(items[2].Err, ErrUnwrap) || !errors.Is(items[1].Err, ErrKeyState) {
		t.Fatalf("short random source: %v / %v / %v", items[0].Err, items[1].Err, items[2].Err)
	}
	// Errors never carry key material.
	m := materialOf(t, s, key, 1)
	for _, it := range items {
		if it.Err != nil && bytes.Contains([]byte(it.Err.Error()), m) {
			t.Fatal("error message contains key material")
		}
	}
}

// Material held for a batch is released: once forgotten, the cache entry is
// zeroed (nothing holds it any more).
func TestEncryptBatchReleasesMaterial(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	items := []EncryptItem{{Key: key, Plaintext: []byte("a")}, {Key: key, Plaintext: []byte("b")}}
	e.EncryptBatch(context.Background(), items)
	ent, err := e.material(context.Background(), key, 1)
	if err != nil {
		t.Fatal(err)
	}
	if n := ent.state.Load(); n != 1 {
		t.Fatalf("references after a batch = %d, want 1 (ours)", n)
	}
	ent.release()
	e.Forget(key.KeyId)
	if !ent.zeroed.Load() || !bytes.Equal(ent.material, make([]byte, len(ent.material))) {
		t.Fatal("forgotten material was not zeroed after the batch")
	}
}

// The KDF matches crypto/hkdf for every header length a v1 header can have,
// other ikm lengths, and input too long for its buffer (the fallback).
func TestMessageKDFAllLengths(t *testing.T) {
	for _, ikmLen := range []int{0, 32, 64, 200} {
		for hl := 0; hl <= fixedHeaderLen+maxKeyIDLen+120; hl += 7 {
			ikm, salt, header := seq(1, ikmLen), seq(0x40, 32), seq(byte(hl), hl)
			want, err := hkdf.Key(sha256.New, ikm, salt, hkdfInfoV1+string(header), aeadKeyLen+nonceLen)
			if err != nil {
				t.Fatal(err)
			}
			k := kdfPool.Get().(*messageKDF)
			got := bytes.Clone(k.derive(ikm, salt, header))
			k.wipe()
			kdfPool.Put(k)
			if !bytes.Equal(got, want) {
				t.Fatalf("ikm %d, header %d: derive = %x, want %x", ikmLen, hl, got, want)
			}
		}
	}
}
