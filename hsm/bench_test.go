package hsm_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/cabinet-kms/cabinet/hsm"
)

// BenchmarkSealOpen measures sealing and opening a 32-byte key under a KEK. The memory provider
// (Go AES-GCM, no cgo) is the ceiling the SoftHSM figures should be read against.
func BenchmarkSealOpen(b *testing.B) {
	pt := bytes.Repeat([]byte{0x42}, 32)
	aad := []byte("key-0123456789/v1")
	soft, _ := newToken(b, "bench")
	for _, p := range []struct {
		name string
		p    hsm.Provider
	}{
		{"memory", hsm.NewMemory()},
		{"softhsm", soft},
	} {
		ctx := context.Background()
		if _, err := p.p.GenerateKEK(ctx, 1); err != nil {
			b.Fatal(err)
		}
		sealed := mustSeal(b, p.p, 1, pt, aad)
		b.Run(p.name+"/seal", func(b *testing.B) {
			for b.Loop() {
				if _, err := p.p.Seal(ctx, 1, pt, aad); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(p.name+"/open", func(b *testing.B) {
			for b.Loop() {
				if _, err := p.p.Open(ctx, 1, sealed, aad); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(p.name+"/open-parallel", func(b *testing.B) {
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := p.p.Open(ctx, 1, sealed, aad); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}
