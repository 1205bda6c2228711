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

// indexed returns items with Index = position (as a request would number
// them).
func indexed(items ...EncryptItem) []EncryptItem {
	for i := range items {
		items[i].Index = uint32(i)
	}
	return items
}

// EncryptBatch makes format 2; Encrypt, GenerateDataKey and ReEncrypt (also
// from a format 2 source) keep making format 1, and every format 1 vector
// still decrypts.
func TestOnlyEncryptBatchMakesFormat2(t *testing.T) {
	ctx := context.Background()
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	lookup := lookupOf(key)
	items := indexed(EncryptItem{Key: key, Plaintext: []byte("a")}, EncryptItem{Key: key, Plaintext: []byte("b"), Context: map[string]string{"x": "y"}})
	e.EncryptBatch(ctx, items)
	for i, it := range items {
		if h, err := ParseCiphertext(it.Ciphertext); err != nil || h.Format != FormatV2 || len(it.Ciphertext) != sealedLenV2(key.KeyId, len(it.Plaintext)) {
			t.Fatalf("EncryptBatch item %d: %+v, %v, length %d", i, h, err, len(it.Ciphertext))
		}
	}
	ct, _, err := e.Encrypt(ctx, key, []byte("a"), nil)
	if err != nil || ct[0] != FormatV1 || len(ct) != sealedLen(key.KeyId, 1) {
		t.Fatalf("Encrypt: %x, %v", ct, err)
	}
	_, dk, _, err := e.GenerateDataKey(ctx, key, 0, nil)
	if err != nil || dk[0] != FormatV1 {
		t.Fatalf("GenerateDataKey: %x, %v", dk, err)
	}
	re, _, _, _, err := e.ReEncrypt(ctx, lookup, items[1].Ciphertext, items[1].Context, key, nil, false)
	if err != nil || re[0] != FormatV1 {
		t.Fatalf("ReEncrypt of a format 2 ciphertext: %x, %v", re, err)
	}
	if pt, _, _, err := e.Decrypt(ctx, lookup, re, nil, false); err != nil || string(pt) != "b" {
		t.Fatalf("Decrypt(ReEncrypt(format 2)) = %q, %v", pt, err)
	}
	// ReEncrypt checks the format 2 source like Decrypt does.
	_, _, _, _, err = e.ReEncrypt(ctx, lookup, items[1].Ciphertext, nil, key, nil, false)
	checkAuthFailure(t, err)

	for _, v := range loadVectors(t) {
		s := newTestSealer()
		vk := keyWithMaterial(t, s, v.KeyID, v.Version, mustHex(t, v.Material))
		ve, err := New(Config{Sealer: s})
		if err != nil {
			t.Fatal(err)
		}
		pt, _, _, err := ve.Decrypt(ctx, lookupOf(vk), mustHex(t, v.Ciphertext), v.Context, false)
		if err != nil || !bytes.Equal(pt, mustHex(t, v.Plaintext)) {
			t.Fatalf("%s: Decrypt(format 1 vector) = %x, %v", v.Name, pt, err)
		}
	}
}

// New ciphertexts open with the reference paths: Encrypt's with the format 1
// reference, EncryptBatch's with the format 2 one. A batch shares one salt
// across its groups (two keys here), each item carries its own index, and
// no (batch key, nonce) pair repeats.
func TestNewCiphertextsOpenWithReference(t *testing.T) {
	e, s := newTestEngine(t, 0)
	key := newTestKey(t, e, 2)
	key2 := newTestKey(t, e, 1)
	material := materialOf(t, s, key, key.PrimaryVersion)
	material2 := materialOf(t, s, key2, key2.PrimaryVersion)
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
		items[i] = EncryptItem{Key: key, Plaintext: pt, Context: encCtx, Index: uint32(2 * i)}
		if i%3 == 0 {
			items[i].Context = nil
		}
		if i%4 == 1 {
			items[i].Key = key2
		}
	}
	e.EncryptBatch(context.Background(), items)
	var salt []byte
	seen := map[string]bool{}
	for i, it := range items {
		m := material
		if it.Key == key2 {
			m = material2
		}
		if it.Err != nil || it.Version != it.Key.PrimaryVersion {
			t.Fatalf("item %d: %v, version %d", i, it.Err, it.Version)
		}
		if got, err := refOpenV2(t, m, it.Ciphertext, it.Context); err != nil || !bytes.Equal(got, it.Plaintext) {
			t.Fatalf("item %d: reference open = %x, %v", i, got, err)
		}
		pt, _, _, err := e.Decrypt(context.Background(), lookupOf(key, key2), it.Ciphertext, it.Context, false)
		if err != nil || !bytes.Equal(pt, it.Plaintext) {
			t.Fatalf("item %d: Decrypt = %v", i, err)
		}
		p, err := parseCiphertext(it.Ciphertext)
		if err != nil || p.index != it.Index || p.Format != FormatV2 {
			t.Fatalf("item %d: parsed %+v, %v", i, p, err)
		}
		if salt == nil {
			salt = bytes.Clone(p.salt)
		} else if !bytes.Equal(p.salt, salt) {
			t.Fatalf("item %d has another salt than item 0", i)
		}
		bk, base := refBatchKey(t, m, p.prefix)
		pair := string(bk) + string(refNonce(base, p.index))
		if seen[pair] {
			t.Fatalf("item %d reuses a (batch key, nonce) pair", i)
		}
		seen[pair] = true
	}
	// A second batch gets a fresh salt.
	again := indexed(EncryptItem{Key: key, Plaintext: []byte("x")})
	e.EncryptBatch(context.Background(), again)
	if p, _ := parseCiphertext(again[0].Ciphertext); bytes.Equal(p.salt, salt) {
		t.Fatal("two batches share a salt")
	}
}

// Parts of format 2 ciphertexts cannot be moved between items or batches,
// and tampering with any field fails the one authentication check.
func TestBatchCiphertextTampered(t *testing.T) {
	ctx := context.Background()
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 2)
	other := newTestKey(t, e, 2)
	lookup := lookupOf(key, other)
	encCtx := map[string]string{"tenant": "acme"}
	mk := func() []EncryptItem {
		items := indexed(
			EncryptItem{Key: key, Plaintext: []byte("SECRET-PLAINTEXT"), Context: encCtx},
			EncryptItem{Key: key, Plaintext: []byte("OTHER--PLAINTEXT"), Context: encCtx},
			EncryptItem{Key: other, Plaintext: []byte("THIRD--PLAINTEXT"), Context: encCtx},
		)
		e.EncryptBatch(ctx, items)
		for i, it := range items {
			if it.Err != nil {
				t.Fatalf("item %d: %v", i, it.Err)
			}
		}
		return items
	}
	items, items2 := mk(), mk()
	ct, ct1, ct2 := items[0].Ciphertext, items[1].Ciphertext, items[2].Ciphertext
	idLen := len(key.KeyId)
	verAt := 2 + idLen
	saltAt := verAt + 4
	indexAt := saltAt + saltLen
	bodyAt := indexAt + indexLen
	tagAt := len(ct) - tagLen
	mutate := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(ct)) }
	setIndex := func(v uint32) []byte {
		return mutate(func(b []byte) []byte { binary.BigEndian.PutUint32(b[indexAt:], v); return b })
	}
	tests := []struct {
		name string
		ct   []byte
		want error // nil: the authentication failure
	}{
		{"format byte 3", mutate(func(b []byte) []byte { b[0] = 3; return b }), ErrInvalidCiphertext},
		{"format byte 1", mutate(func(b []byte) []byte { b[0] = FormatV1; return b }), nil},
		{"key id length zero", mutate(func(b []byte) []byte { b[1] = 0; return b }), ErrInvalidCiphertext},
		{"key id of another key", mutate(func(b []byte) []byte { copy(b[2:], other.KeyId); return b }), nil},
		{"version zero", mutate(func(b []byte) []byte { binary.BigEndian.PutUint32(b[verAt:], 0); return b }), ErrInvalidCiphertext},
		{"version other existing", mutate(func(b []byte) []byte { binary.BigEndian.PutUint32(b[verAt:], 1); return b }), nil},
		{"salt", mutate(func(b []byte) []byte { b[saltAt] ^= 1; return b }), nil},
		{"index +1", setIndex(1), nil},
		{"index high bit", setIndex(1 << 31), nil},
		{"index of the other item", mutate(func(b []byte) []byte { copy(b[indexAt:bodyAt], ct1[indexAt:bodyAt]); return b }), nil},
		{"body of the other item", append(bytes.Clone(ct[:bodyAt]), ct1[bodyAt:]...), nil},
		{"tag of the other item", append(bytes.Clone(ct[:tagAt]), ct1[tagAt:]...), nil},
		{"salt of another batch", mutate(func(b []byte) []byte { copy(b[saltAt:indexAt], items2[0].Ciphertext[saltAt:indexAt]); return b }), nil},
		{"body of the same item of another batch", append(bytes.Clone(ct[:bodyAt]), items2[0].Ciphertext[bodyAt:]...), nil},
		{"body of the other key's item", append(bytes.Clone(ct[:bodyAt]), ct2[len(ct2)-len(ct)+bodyAt:]...), nil},
		{"body", mutate(func(b []byte) []byte { b[bodyAt] ^= 1; return b }), nil},
		{"tag", mutate(func(b []byte) []byte { b[len(b)-1] ^= 1; return b }), nil},
		{"appended byte", append(bytes.Clone(ct), 0), nil},
		{"truncated to header and tag", append(bytes.Clone(ct[:bodyAt]), ct[tagAt:]...), nil},
		{"truncated below header and tag", bytes.Clone(ct[:bodyAt+tagLen-1]), ErrInvalidCiphertext},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pt, _, _, err := e.Decrypt(ctx, lookup, tt.ct, encCtx, false)
			if pt != nil {
				t.Fatal("tampered ciphertext returned plaintext")
			}
			if tt.want == nil {
				checkAuthFailure(t, err)
			} else {
				wantErr(t, err, tt.want)
			}
		})
	}
	// The untouched ones open; with another context they fail the same way.
	for i, it := range items {
		if pt, _, _, err := e.Decrypt(ctx, lookup, it.Ciphertext, encCtx, false); err != nil || !bytes.Equal(pt, it.Plaintext) {
			t.Fatalf("item %d: %v", i, err)
		}
		_, _, _, err := e.Decrypt(ctx, lookup, it.Ciphertext, map[string]string{"tenant": "evil"}, false)
		checkAuthFailure(t, err)
		_, _, _, err = e.Decrypt(ctx, lookup, it.Ciphertext, nil, false)
		checkAuthFailure(t, err)
	}
	// Every single bit flip fails; every truncation is refused.
	for i := range ct {
		for bit := range 8 {
			b := bytes.Clone(ct)
			b[i] ^= 1 << bit
			if pt, _, _, err := e.Decrypt(ctx, lookup, b, encCtx, false); err == nil || pt != nil {
				t.Fatalf("byte %d bit %d flipped: Decrypt succeeded", i, bit)
			}
		}
	}
	for n := range len(ct) {
		if pt, _, _, err := e.Decrypt(ctx, lookup, ct[:n], encCtx, false); pt != nil || !errors.Is(err, ErrInvalidCiphertext) {
			t.Fatalf("Decrypt(ct[:%d]) = %v", n, err)
		}
	}
	if _, err := ParseCiphertext(append([]byte{FormatV2}, make([]byte, maxCiphertextLen(FormatV2))...)); !errors.Is(err, ErrInvalidCiphertext) {
		t.Fatalf("oversized format 2 ciphertext: %v", err)
	}
	if _, err := ParseCiphertext(append([]byte{FormatV1}, make([]byte, maxCiphertextLen(FormatV1))...)); !errors.Is(err, ErrInvalidCiphertext) {
		t.Fatalf("oversized format 1 ciphertext: %v", err)
	}
}

// Indices that do not increase strictly fail the whole call.
func TestEncryptBatchIndices(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	key := newTestKey(t, e, 1)
	for _, idx := range [][]uint32{{0, 0}, {1, 0}, {0, 2, 2}, {5, 7, 6}} {
		items := make([]EncryptItem, len(idx))
		for i, x := range idx {
			items[i] = EncryptItem{Key: key, Plaintext: []byte("x"), Index: x, Ciphertext: []byte("stale"), Version: 9}
		}
		e.EncryptBatch(context.Background(), items)
		for i, it := range items {
			if !errors.Is(it.Err, ErrInvalidArgument) || it.Ciphertext != nil || it.Version != 0 {
				t.Fatalf("indices %v, item %d: %v", idx, i, it.Err)
			}
		}
	}
	items := []EncryptItem{{Key: key, Plaintext: []byte("a"), Index: 3}, {Key: key, Plaintext: []byte("b"), Index: 1<<32 - 1}}
	e.EncryptBatch(context.Background(), items)
	for i, it := range items {
		if p, err := parseCiphertext(it.Ciphertext); it.Err != nil || err != nil || p.index != it.Index {
			t.Fatalf("item %d: %v, %v", i, it.Err, err)
		}
		if pt, _, _, err := e.Decrypt(context.Background(), lookupOf(key), it.Ciphertext, nil, false); err != nil || !bytes.Equal(pt, it.Plaintext) {
			t.Fatalf("item %d: Decrypt = %v", i, err)
		}
	}
	e.EncryptBatch(context.Background(), nil) // no items: nothing to do
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
	items := indexed(
		EncryptItem{Key: key, Plaintext: []byte("one"), Context: ok},
		EncryptItem{Key: key, Plaintext: make([]byte, MaxPlaintextLen+1)},
		EncryptItem{Key: key, Plaintext: []byte("x"), Context: bigCtx},
		EncryptItem{Key: disabled, Plaintext: []byte("x")},
		EncryptItem{Key: rsa, Plaintext: []byte("x")},
		EncryptItem{Key: noMaterial, Plaintext: []byte("x")},
		EncryptItem{Key: badID, Plaintext: []byte("x")},
		EncryptItem{Key: key, Plaintext: nil, Context: ok},
		EncryptItem{Key: key, Plaintext: make([]byte, MaxPlaintextLen)},
	)
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
		// Format 2 is format 1 plus the 4-byte index.
		if it.Version != v || len(it.Ciphertext) != len(ct)+indexLen || it.Ciphertext[0] != FormatV2 || ct[0] != FormatV1 {
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
	items = indexed(EncryptItem{Key: key, Plaintext: []byte("a")}, EncryptItem{Key: key, Plaintext: []byte("b")})
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

	// A failing random source fails every item that reached it. (The
	// batch reads one salt: a source with one byte too few fails it.)
	e2, err := New(Config{Sealer: s, Rand: bytes.NewReader(make([]byte, saltLen-1))})
	if err != nil {
		t.Fatal(err)
	}
	items = indexed(EncryptItem{Key: key, Plaintext: []byte("a")}, EncryptItem{Key: disabled, Plaintext: []byte("b")}, EncryptItem{Key: key, Plaintext: []byte("c")})
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
	items := indexed(EncryptItem{Key: key, Plaintext: []byte("a")}, EncryptItem{Key: key, Plaintext: []byte("b")})
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

// The KDF matches crypto/hkdf for both info strings, every header (or
// batch prefix) length a ciphertext can have, other ikm lengths, and input
// too long for its buffer (the fallback).
func TestMessageKDFAllLengths(t *testing.T) {
	for _, info := range []string{hkdfInfoV1, hkdfInfoV2} {
		for _, ikmLen := range []int{0, 32, 64, 200} {
			for hl := 0; hl <= fixedHeaderLen+maxKeyIDLen+120; hl += 7 {
				ikm, salt, header := seq(1, ikmLen), seq(0x40, 32), seq(byte(hl), hl)
				want, err := hkdf.Key(sha256.New, ikm, salt, info+string(header), aeadKeyLen+nonceLen)
				if err != nil {
					t.Fatal(err)
				}
				k := kdfPool.Get().(*messageKDF)
				got := bytes.Clone(k.derive(ikm, salt, info, header))
				k.wipe()
				kdfPool.Put(k)
				if !bytes.Equal(got, want) {
					t.Fatalf("%s, ikm %d, header %d: derive = %x, want %x", info, ikmLen, hl, got, want)
				}
			}
		}
	}
}
