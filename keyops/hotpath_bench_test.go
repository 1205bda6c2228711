package keyops

import (
	"bytes"
	"testing"
)

// The per-message key derivation alone (HKDF-SHA-256, 44 bytes, with a
// 66-byte header as Cabinet's key ids make it).
func BenchmarkMessageKDF(b *testing.B) {
	ikm, salt := seq(0, 32), seq(0x40, 32)
	header := appendHeader(nil, "k-"+string(bytes.Repeat([]byte{'a'}, 26)), 1, salt)
	b.ReportAllocs()
	for b.Loop() {
		k := kdfPool.Get().(*messageKDF)
		k.derive(ikm, salt, hkdfInfoV1, header)
		k.wipe()
		kdfPool.Put(k)
	}
}
