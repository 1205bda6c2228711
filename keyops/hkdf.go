package keyops

import (
	"bytes"
	"crypto/hkdf"
	"crypto/sha256"
	"crypto/subtle"
	"sync"
)

// messageKDF computes HKDF-SHA-256 (RFC 5869) for the per-message key and
// nonce without allocating: crypto/hkdf builds two crypto/hmac instances and
// an info string per call (measured ~1.5x slower, 19 of the 27 allocations
// of a warm Encrypt). TestMessageKDFMatchesHKDF and the test vectors check it
// against crypto/hkdf.
//
// Each HMAC is two one-shot sha256.Sum256 calls over a contiguous buffer
// (key^ipad || message, then key^opad || inner digest) rather than
// Reset/Write/Sum on hash.Hash states: the compressions are the same, but the
// streaming API's per-call buffering, interface calls and digest copies
// cost as much again as the compressions themselves.
type messageKDF struct {
	// buf holds key^pad || message for one HMAC computation.
	buf [sha256.BlockSize + maxKDFMessage]byte
	prk [sha256.Size]byte
	okm [2 * sha256.Size]byte
}

// maxKDFMessage is the longest HMAC message derive builds in buf: the
// second expand block, T(1) || info || header || 0x02, with the longer info
// string and the longest v1 header (= the longest v2 batch prefix). Longer
// input (never produced by this package) falls back to crypto/hkdf.
const maxKDFMessage = sha256.Size + max(len(hkdfInfoV1), len(hkdfInfoV2)) + fixedHeaderLen + maxKeyIDLen + 1

var kdfPool = sync.Pool{New: func() any { return new(messageKDF) }}

// derive returns okm = HKDF-SHA-256(ikm, salt, info || header) of length
// aeadKeyLen+nonceLen (info is hkdfInfoV1 with a v1 header, hkdfInfoV2 with
// a v2 batch prefix). The result aliases k and is valid until k is wiped or
// released; the fast path needs len(salt) <= 64.
func (k *messageKDF) derive(ikm, salt []byte, info string, header []byte) []byte {
	if len(salt) > sha256.BlockSize || len(ikm) > maxKDFMessage ||
		sha256.Size+len(info)+len(header)+1 > maxKDFMessage {
		return k.deriveSlow(ikm, salt, info, header)
	}
	msg := k.buf[sha256.BlockSize:]
	// Extract: PRK = HMAC(salt, ikm).
	n := copy(msg, ikm)
	k.hmac(salt, n, &k.prk)
	// Expand: T(1) = HMAC(PRK, info || 0x01), T(2) = HMAC(PRK, T(1) || info || 0x02).
	n = copy(msg, info)
	n += copy(msg[n:], header)
	msg[n] = 1
	k.hmac(k.prk[:], n+1, (*[sha256.Size]byte)(k.okm[:sha256.Size]))
	n = copy(msg, k.okm[:sha256.Size])
	n += copy(msg[n:], info)
	n += copy(msg[n:], header)
	msg[n] = 2
	k.hmac(k.prk[:], n+1, (*[sha256.Size]byte)(k.okm[sha256.Size:]))
	return k.okm[:aeadKeyLen+nonceLen]
}

// hmac sets dst = HMAC-SHA-256(key, buf[64:64+n]); len(key) <= 64. It
// overwrites buf.
func (k *messageKDF) hmac(key []byte, n int, dst *[sha256.Size]byte) {
	pad := k.buf[:sha256.BlockSize]
	subtle.XORBytes(pad, key, ipad[:len(key)])
	copy(pad[len(key):], ipad[len(key):])
	inner := sha256.Sum256(k.buf[:sha256.BlockSize+n])
	subtle.XORBytes(pad, key, opad[:len(key)])
	copy(pad[len(key):], opad[len(key):])
	copy(k.buf[sha256.BlockSize:], inner[:])
	*dst = sha256.Sum256(k.buf[:sha256.BlockSize+sha256.Size])
	clear(inner[:])
}

// ipad and opad are the HMAC pads (RFC 2104) for a SHA-256 block.
var ipad, opad = bytes.Repeat([]byte{0x36}, sha256.BlockSize), bytes.Repeat([]byte{0x5c}, sha256.BlockSize)

// deriveSlow is derive for input that does not fit buf.
func (k *messageKDF) deriveSlow(ikm, salt []byte, info string, header []byte) []byte {
	okm, err := hkdf.Key(sha256.New, ikm, salt, info+string(header), aeadKeyLen+nonceLen)
	if err != nil {
		panic("keyops: HKDF-SHA-256 failed: " + err.Error()) // only for lengths > 255*32
	}
	copy(k.okm[:], okm)
	clear(okm)
	return k.okm[:aeadKeyLen+nonceLen]
}

// wipe clears every secret the state holds.
func (k *messageKDF) wipe() {
	clear(k.buf[:])
	clear(k.prk[:])
	clear(k.okm[:])
}
