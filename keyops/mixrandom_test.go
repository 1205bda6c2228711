package keyops

import (
	"bytes"
	"context"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"regexp"
	"strings"
	"testing"
)

// recordingReader returns crypto/rand bytes and keeps a copy of them.
type recordingReader struct{ got []byte }

func (r *recordingReader) Read(p []byte) (int, error) {
	n, err := rand.Read(p)
	r.got = append(r.got, p[:n]...)
	return n, err
}

// TestMixRandomMatchesHKDF: mixRandom's pooled HKDF (fast path and the
// crypto/hkdf fallback) equals crypto/hkdf over hsm || local for every size
// material generation uses and around the fast path's limits.
func TestMixRandomMatchesHKDF(t *testing.T) {
	ctx := context.Background()
	infos := []string{entropyInfo, entropyInfo + "/ecdsa-scalar/a", entropyInfo + "/ed25519-seed", "", strings.Repeat("i", 400)}
	for _, n := range []int{1, 16, 31, 32, 33, 48, 63, 64, 65, 100} {
		for _, info := range infos {
			cs := &countingSealer{testSealer: newTestSealer()}
			local := &recordingReader{}
			e, err := New(Config{Sealer: cs, Rand: local})
			if err != nil {
				t.Fatal(err)
			}
			got, err := e.mixRandom(ctx, n, info)
			if err != nil {
				t.Fatal(err)
			}
			hsmPart := make([]byte, n)
			for i := range hsmPart {
				hsmPart[i] = byte(i) // countingSealer's stream from 0
			}
			if len(local.got) != n {
				t.Fatalf("n=%d: read %d local bytes", n, len(local.got))
			}
			want, err := hkdf.Key(sha256.New, append(hsmPart, local.got...), nil, info, n)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("n=%d info=%.20q: mixRandom = %x, crypto/hkdf = %x", n, info, got, want)
			}
		}
	}
}

// TestMixRandomWipesPool: the pooled KDF state holds no secret afterwards.
func TestMixRandomWipesPool(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	if _, err := e.mixRandom(context.Background(), 32, entropyInfo); err != nil {
		t.Fatal(err)
	}
	k := kdfPool.Get().(*messageKDF)
	defer kdfPool.Put(k)
	var zero messageKDF
	if k.buf != zero.buf || k.prk != zero.prk || k.okm != zero.okm {
		t.Fatal("pooled messageKDF not wiped")
	}
}

func TestNewKeyIDFormat(t *testing.T) {
	re := regexp.MustCompile(`^k-[a-z0-9]{26}$`)
	seen := map[string]bool{}
	for range 1000 {
		id, err := NewKeyID()
		if err != nil {
			t.Fatal(err)
		}
		if !re.MatchString(id) || seen[id] {
			t.Fatalf("bad or repeated key id %q", id)
		}
		seen[id] = true
	}
	// Same text as lower-casing standard base32 (the previous encoding).
	for range 100 {
		b := make([]byte, 16)
		rand.Read(b)
		want := strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b))
		if got := keyIDEncoding.EncodeToString(b); got != want {
			t.Fatalf("encoding %x: %q, want %q", b, got, want)
		}
	}
}

func BenchmarkMixRandom32(b *testing.B) {
	e, _ := newTestEngine(b, 0)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		out, err := e.mixRandom(ctx, 32, entropyInfo)
		if err != nil {
			b.Fatal(err)
		}
		clear(out)
	}
}

func BenchmarkNewKeyID(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, err := NewKeyID(); err != nil {
			b.Fatal(err)
		}
	}
}
