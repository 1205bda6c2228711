package keyops

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"testing"
)

func FuzzParseCiphertext(f *testing.F) {
	e, _ := newTestEngine(f, 0)
	key := newTestKey(f, e, 1)
	ct, _, _ := e.Encrypt(context.Background(), key, []byte("seed"), nil)
	f.Add(ct)
	f.Add(ct[:fixedHeaderLen])
	f.Add([]byte{})
	f.Add([]byte{FormatV1})
	f.Add([]byte{FormatV1, 0xFF})
	f.Add([]byte{0x02, 1, 'k', 0, 0, 0, 1})
	// Format 2 (batch).
	items := []EncryptItem{{Key: key, Plaintext: []byte("seed")}, {Key: key, Plaintext: nil, Index: 7}}
	e.EncryptBatch(context.Background(), items)
	for _, it := range items {
		f.Add(it.Ciphertext)
		f.Add(it.Ciphertext[:fixedHeaderLenV2+len(key.KeyId)])
		f.Add(it.Ciphertext[:fixedHeaderLenV2+len(key.KeyId)+tagLen-1])
	}
	f.Add([]byte{FormatV2})
	f.Add([]byte{FormatV2, 0xFF})
	f.Add([]byte{0x03, 1, 'k', 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ParseCiphertext(data)
		if err != nil {
			if !errors.Is(err, ErrInvalidCiphertext) {
				t.Fatalf("error %v is not ErrInvalidCiphertext", err)
			}
			return
		}
		// A parsed header re-encodes to the input's prefix.
		p, _ := parseCiphertext(data)
		re := appendPrefix(nil, h.Format, h.KeyID, h.Version, p.salt)
		if !bytes.Equal(re, p.prefix) {
			t.Fatalf("prefix %x does not re-encode (%x)", p.prefix, re)
		}
		if h.Format == FormatV2 {
			re = binary.BigEndian.AppendUint32(re, p.index)
		}
		if (h.Format != FormatV1 && h.Format != FormatV2) || h.Version == 0 || !bytes.Equal(re, p.header) ||
			!bytes.HasPrefix(data, re) || len(p.body) < tagLen || len(re)+len(p.body) != len(data) ||
			len(data) > maxCiphertextLen(h.Format) {
			t.Fatalf("inconsistent parse %+v of %x", h, data)
		}
	})
}

func FuzzDecrypt(f *testing.F) {
	e, _ := newTestEngine(f, 0)
	key := newTestKey(f, e, 2)
	lookup := lookupOf(key)
	for _, pt := range []string{"", "x", "a longer plaintext for the fuzzer"} {
		ct, _, _ := e.Encrypt(context.Background(), key, []byte(pt), map[string]string{"k": "v"})
		f.Add(ct, "k", "v")
		ct, _, _ = e.Encrypt(context.Background(), key, []byte(pt), nil)
		f.Add(ct, "", "")
	}
	// Format 2 (batch).
	var items []EncryptItem
	for i, pt := range []string{"", "x", "a longer plaintext for the fuzzer"} {
		items = append(items, EncryptItem{Key: key, Plaintext: []byte(pt), Context: map[string]string{"k": "v"}, Index: uint32(2 * i)},
			EncryptItem{Key: key, Plaintext: []byte(pt), Index: uint32(2*i + 1)})
	}
	e.EncryptBatch(context.Background(), items)
	for _, it := range items {
		if it.Context != nil {
			f.Add(it.Ciphertext, "k", "v")
		} else {
			f.Add(it.Ciphertext, "", "")
		}
	}
	f.Fuzz(func(t *testing.T, data []byte, ck, cv string) {
		var encCtx map[string]string
		if ck != "" {
			encCtx = map[string]string{ck: cv}
		}
		pt, _, _, err := e.Decrypt(context.Background(), lookup, data, encCtx, false)
		if err == nil {
			// Only genuine ciphertexts decrypt; re-encrypting must work,
			// in both formats.
			if _, _, err := e.Encrypt(context.Background(), key, pt, encCtx); err != nil {
				t.Fatal(err)
			}
			b := []EncryptItem{{Key: key, Plaintext: pt, Context: encCtx}}
			if e.EncryptBatch(context.Background(), b); b[0].Err != nil {
				t.Fatal(b[0].Err)
			}
			return
		}
		for _, s := range []error{ErrInvalidCiphertext, ErrInvalidArgument, ErrKeyNotFound, ErrVersionNotFound} {
			if errors.Is(err, s) {
				return
			}
		}
		t.Fatalf("unexpected error class: %v", err)
	})
}

// FuzzKeyUnwrapPad: arbitrary input never panics, fails only with the
// documented classes, and whatever unwraps re-wraps to the same bytes (KWP
// is deterministic), so only genuine wraps are accepted.
func FuzzKeyUnwrapPad(f *testing.F) {
	kek := seq(0x20, 32)
	for _, n := range []int{1, 8, 9, 20, 64} {
		w, _ := KeyWrapPad(kek, seq(byte(n), n))
		f.Add(w)
	}
	f.Add([]byte{})
	f.Add(make([]byte, 16))
	f.Add(make([]byte, 23))
	f.Fuzz(func(t *testing.T, data []byte) {
		pt, err := KeyUnwrapPad(kek, data)
		if err != nil {
			if !errors.Is(err, ErrInvalidCiphertext) && !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		if len(pt) == 0 || len(pt) > len(data)-8 {
			t.Fatalf("unwrapped %d bytes from %d", len(pt), len(data))
		}
		re, err := KeyWrapPad(kek, pt)
		if err != nil || !bytes.Equal(re, data) {
			t.Fatalf("re-wrap differs: %x vs %x", re, data)
		}
	})
}

// FuzzUnwrapImportedMaterial: arbitrary wrapped input (split into the
// RSA-OAEP part and the KWP part, then decrypted) never panics and is
// refused as InvalidArgument unless it is a genuine wrap.
func FuzzUnwrapImportedMaterial(f *testing.F) {
	e, _, pub, sealed := sharedImportPair(f)
	for _, m := range [][]byte{seq(1, 32), seq(2, 1), seq(3, 200)} {
		w, err := WrapForImport(pub, m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(w)
		f.Add(w[:384])
		f.Add(w[:400])
	}
	f.Add([]byte{})
	f.Add(make([]byte, 384+16))
	f.Fuzz(func(t *testing.T, wrapped []byte) {
		// The length split alone.
		if wk, wm, err := splitImportWrapped(wrapped, 384); err == nil {
			if len(wk) != 384 || len(wm) < 16 || len(wm)%8 != 0 || len(wk)+len(wm) != len(wrapped) {
				t.Fatalf("bad split %d + %d of %d", len(wk), len(wm), len(wrapped))
			}
		} else if !errors.Is(err, ErrInvalidArgument) {
			t.Fatal(err)
		}
		m, err := e.UnwrapImportedMaterial(context.Background(), testToken, sealed, wrapped)
		if err != nil {
			if !errors.Is(err, ErrInvalidArgument) || errors.Is(err, ErrUnwrap) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		if len(m) == 0 {
			t.Fatal("empty material")
		}
	})
}
