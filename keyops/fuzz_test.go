package keyops

import (
	"bytes"
	"context"
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
		re := appendHeader(nil, h.KeyID, h.Version, p.salt)
		if h.Format != FormatV1 || h.Version == 0 || !bytes.HasPrefix(data, re) || len(p.body) < tagLen {
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
	f.Fuzz(func(t *testing.T, data []byte, ck, cv string) {
		var encCtx map[string]string
		if ck != "" {
			encCtx = map[string]string{ck: cv}
		}
		pt, _, _, err := e.Decrypt(context.Background(), lookup, data, encCtx)
		if err == nil {
			// Only genuine ciphertexts decrypt; re-encrypting must work.
			if _, _, err := e.Encrypt(context.Background(), key, pt, encCtx); err != nil {
				t.Fatal(err)
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
