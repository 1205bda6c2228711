package keyops

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"slices"
	"sync"
)

// Ciphertext formats (docs/CIPHERTEXT.md is the reference).
//
// Format 1, made by Encrypt, GenerateDataKey and ReEncrypt:
//
//	format     1 byte   0x01
//	idLen      1 byte   1..255
//	keyID      idLen bytes, [A-Za-z0-9._-]
//	version    uint32 big-endian, >= 1
//	salt       32 bytes, random per message
//	body       AES-256-GCM ciphertext || 16-byte tag
//
// The header is everything before body. Per message:
//
//	okm   = HKDF-SHA-256(ikm = version material, salt = salt, info = hkdfInfoV1 || header, 44)
//	key   = okm[0:32], nonce = okm[32:44]
//	aad   = header || encodeContext(encryption context)
//
// Format 2 ("batch"), made only by EncryptBatch:
//
//	format     1 byte   0x02
//	idLen      1 byte   1..255
//	keyID      idLen bytes, [A-Za-z0-9._-]
//	version    uint32 big-endian, >= 1
//	salt       32 bytes, random per batch (shared by its messages)
//	index      uint32 big-endian, the item's position in the batch request
//	body       AES-256-GCM ciphertext || 16-byte tag
//
// The header is everything before body; the batch prefix is the header
// without the index. Per (batch, key id, version), once:
//
//	okm   = HKDF-SHA-256(ikm = version material, salt = salt, info = hkdfInfoV2 || prefix, 44)
//	key   = okm[0:32], base nonce = okm[32:44]
//
// and per message: nonce = base nonce XOR (8 zero bytes || index),
// aad = header || encodeContext(encryption context).
const (
	// FormatV1 is the per-message format: Encrypt, GenerateDataKey and
	// ReEncrypt produce it.
	FormatV1 byte = 0x01
	// FormatV2 is the batch format: only EncryptBatch produces it.
	FormatV2 byte = 0x02

	saltLen     = 32
	tagLen      = 16
	nonceLen    = 12
	aeadKeyLen  = 32
	indexLen    = 4
	maxKeyIDLen = 255
	// fixedHeaderLen is the v1 header (and the v2 batch prefix) without the
	// key id.
	fixedHeaderLen = 1 + 1 + 4 + saltLen
	// fixedHeaderLenV2 is the v2 header without the key id.
	fixedHeaderLenV2 = fixedHeaderLen + indexLen

	// MaxPlaintextLen is the largest plaintext Encrypt accepts (64 KiB).
	MaxPlaintextLen = 64 << 10
	// MaxCiphertextLen is the largest ciphertext of any format (format 2's
	// header is the longer); longer input is rejected before any work is
	// done.
	MaxCiphertextLen = fixedHeaderLenV2 + maxKeyIDLen + MaxPlaintextLen + tagLen

	hkdfInfoV1 = "cabinet/v1/aes-256-gcm"
	hkdfInfoV2 = "cabinet/v2/aes-256-gcm-batch"
)

// Encryption context limits.
const (
	MaxContextPairs      = 64
	MaxContextKeyLen     = 256
	MaxContextValueLen   = 1024
	MaxContextTotalBytes = 8 << 10 // sum of all key and value lengths
)

// Header is the parsed, unauthenticated ciphertext header. Nothing in it may
// be trusted until the body has been authenticated; it only says which key
// version to try.
type Header struct {
	Format  byte
	KeyID   string
	Version uint32
}

// parsed is a ciphertext split into its parts; slices alias the input.
type parsed struct {
	Header
	header []byte // v1: format..salt; v2: format..index
	prefix []byte // the HKDF info suffix: v1: header; v2: format..salt (the batch prefix)
	salt   []byte
	index  uint32 // v2 only
	body   []byte // ciphertext || tag
}

// ParseCiphertext parses the header of ct (format 1 or 2). It never panics;
// every failure is ErrInvalidCiphertext.
func ParseCiphertext(ct []byte) (Header, error) {
	p, err := parseCiphertext(ct)
	return p.Header, err
}

// maxCiphertextLen is the longest ciphertext of a format.
func maxCiphertextLen(format byte) int {
	if format == FormatV2 {
		return fixedHeaderLenV2 + maxKeyIDLen + MaxPlaintextLen + tagLen
	}
	return fixedHeaderLen + maxKeyIDLen + MaxPlaintextLen + tagLen
}

func parseCiphertext(ct []byte) (parsed, error) {
	if len(ct) == 0 {
		return parsed{}, newErr(ErrInvalidCiphertext, "ciphertext is empty")
	}
	format := ct[0]
	if format != FormatV1 && format != FormatV2 {
		return parsed{}, newErr(ErrInvalidCiphertext, "ciphertext is not in a format this node understands (it reads formats %d and %d); was it produced by Cabinet?", FormatV1, FormatV2)
	}
	if max := maxCiphertextLen(format); len(ct) > max {
		return parsed{}, newErr(ErrInvalidCiphertext, "ciphertext is longer than any Cabinet ciphertext of format %d (%d bytes at most)", format, max)
	}
	if len(ct) < 2 {
		return parsed{}, errTruncated
	}
	idLen := int(ct[1])
	if idLen == 0 {
		return parsed{}, newErr(ErrInvalidCiphertext, "ciphertext is malformed: empty key id")
	}
	prefixLen := fixedHeaderLen + idLen
	hdrLen := prefixLen
	if format == FormatV2 {
		hdrLen += indexLen
	}
	if len(ct) < hdrLen+tagLen {
		return parsed{}, errTruncated
	}
	id := ct[2 : 2+idLen]
	if !validKeyIDBytes(id) {
		return parsed{}, newErr(ErrInvalidCiphertext, "ciphertext is malformed: key id has characters a key id cannot have")
	}
	version := binary.BigEndian.Uint32(ct[2+idLen:])
	if version == 0 {
		return parsed{}, newErr(ErrInvalidCiphertext, "ciphertext is malformed: key version 0")
	}
	p := parsed{
		Header: Header{Format: format, KeyID: string(id), Version: version},
		header: ct[:hdrLen:hdrLen],
		prefix: ct[:prefixLen:prefixLen],
		salt:   ct[prefixLen-saltLen : prefixLen : prefixLen],
		body:   ct[hdrLen:],
	}
	if format == FormatV2 {
		p.index = binary.BigEndian.Uint32(ct[prefixLen:])
	}
	return p, nil
}

var errTruncated = newErr(ErrInvalidCiphertext, "ciphertext is truncated")

// validKeyIDBytes reports whether id can be carried in a ciphertext header
// (and so printed in an error message safely).
func validKeyIDBytes[S ~string | ~[]byte](id S) bool {
	if len(id) == 0 || len(id) > maxKeyIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_', c == '.':
		default:
			return false
		}
	}
	return true
}

// appendHeader appends a v1 header to dst.
func appendHeader(dst []byte, keyID string, version uint32, salt []byte) []byte {
	return appendPrefix(dst, FormatV1, keyID, version, salt)
}

// appendPrefix appends format || idLen || keyID || version || salt to dst:
// a v1 header (format 1) or a v2 batch prefix (format 2).
func appendPrefix(dst []byte, format byte, keyID string, version uint32, salt []byte) []byte {
	dst = append(dst, format, byte(len(keyID)))
	dst = append(dst, keyID...)
	dst = binary.BigEndian.AppendUint32(dst, version)
	return append(dst, salt...)
}

// validateContext checks the encryption context limits and returns the
// length of its canonical encoding.
func validateContext(encCtx map[string]string) (int, error) {
	if len(encCtx) > MaxContextPairs {
		return 0, newErr(ErrInvalidArgument, "encryption context has %d pairs; at most %d are allowed", len(encCtx), MaxContextPairs)
	}
	total := 0
	for k, v := range encCtx {
		if len(k) == 0 || len(k) > MaxContextKeyLen {
			return 0, newErr(ErrInvalidArgument, "encryption context keys must be 1..%d bytes long; one is %d bytes", MaxContextKeyLen, len(k))
		}
		if len(v) > MaxContextValueLen {
			return 0, newErr(ErrInvalidArgument, "encryption context values must be at most %d bytes long; the value of %q is %d bytes", MaxContextValueLen, k, len(v))
		}
		total += len(k) + len(v)
	}
	if total > MaxContextTotalBytes {
		return 0, newErr(ErrInvalidArgument, "encryption context is %d bytes in total; at most %d are allowed", total, MaxContextTotalBytes)
	}
	return 4 + 8*len(encCtx) + total, nil
}

// appendContext appends the canonical encoding of encCtx to dst:
// uint32 count, then for each key in byte order: uint32 len(key), key,
// uint32 len(value), value (all big-endian). The caller validated encCtx.
func appendContext(dst []byte, encCtx map[string]string) []byte {
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(encCtx)))
	if len(encCtx) == 0 {
		return dst
	}
	var buf [16]string
	keys := buf[:0]
	for k := range encCtx {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		v := encCtx[k]
		dst = binary.BigEndian.AppendUint32(dst, uint32(len(k)))
		dst = append(dst, k...)
		dst = binary.BigEndian.AppendUint32(dst, uint32(len(v)))
		dst = append(dst, v...)
	}
	return dst
}

// msgScratch is the pooled working state of one message: the key
// derivation, the nonce and the AAD buffer, so sealing or opening a message
// allocates only what crypto/aes and crypto/cipher allocate (the key
// schedule and the GCM instance) and its output.
type msgScratch struct {
	kdf   messageKDF
	nonce [nonceLen]byte
	aad   []byte
}

// maxPooledAAD bounds the AAD buffer a pooled msgScratch keeps (a maximal
// context is ~9 KiB; most are tiny).
const maxPooledAAD = 16 << 10

var scratchPool = sync.Pool{New: func() any { return &msgScratch{aad: make([]byte, 0, 256)} }}

func getScratch() *msgScratch { return scratchPool.Get().(*msgScratch) }

// release wipes the derived key material and returns s to the pool.
func (s *msgScratch) release() {
	s.kdf.wipe()
	clear(s.nonce[:])
	if cap(s.aad) > maxPooledAAD {
		s.aad = make([]byte, 0, 256)
	}
	s.aad = s.aad[:0]
	scratchPool.Put(s)
}

// aead derives an AES-256-GCM instance from a version's material, a salt
// and info = info || prefix (a v1 header or a v2 batch prefix), and sets
// s.nonce to the derived nonce (for v2, the base nonce).
func (s *msgScratch) aead(material, salt []byte, info string, prefix []byte) (cipher.AEAD, error) {
	okm := s.kdf.derive(material, salt, info, prefix)
	copy(s.nonce[:], okm[aeadKeyLen:])
	block, err := aes.NewCipher(okm[:aeadKeyLen])
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// setAAD sets s.aad = header || encodeContext(encCtx) and returns it.
func (s *msgScratch) setAAD(header []byte, encCtx map[string]string) []byte {
	s.aad = append(s.aad[:0], header...)
	s.aad = appendContext(s.aad, encCtx)
	return s.aad
}

// xorIndex turns a v2 base nonce into the nonce of message index:
// nonce = base XOR (8 zero bytes || uint32 BE index).
func xorIndex(nonce *[nonceLen]byte, index uint32) {
	v := binary.BigEndian.Uint32(nonce[nonceLen-indexLen:]) ^ index
	binary.BigEndian.PutUint32(nonce[nonceLen-indexLen:], v)
}

// sealedLen is the length of the v1 ciphertext of an n-byte plaintext under
// keyID.
func sealedLen(keyID string, n int) int { return fixedHeaderLen + len(keyID) + n + tagLen }

// sealedLenV2 is the length of the v2 ciphertext of an n-byte plaintext
// under keyID.
func sealedLenV2(keyID string, n int) int { return fixedHeaderLenV2 + len(keyID) + n + tagLen }

// sealV1 appends the v1 ciphertext of plaintext (header with salt, body,
// tag) to dst; with cap(dst)-len(dst) >= sealedLen it does not allocate
// beyond crypto/aes and crypto/cipher. salt may alias the header position in
// dst's spare capacity. The caller validated keyID and encCtx.
func sealV1(dst, material []byte, keyID string, version uint32, salt, plaintext []byte, encCtx map[string]string) ([]byte, error) {
	s := getScratch()
	defer s.release()
	start := len(dst)
	dst = appendHeader(dst, keyID, version, salt)
	header := dst[start:len(dst):len(dst)]
	aead, err := s.aead(material, header[len(header)-saltLen:], hkdfInfoV1, header)
	if err != nil {
		return nil, err
	}
	return aead.Seal(dst, s.nonce[:], plaintext, s.setAAD(header, encCtx)), nil
}

// batchSealer seals the v2 messages of one (batch, key id, key version)
// group: the batch key and base nonce are derived once, and the AES-GCM
// instance built from the batch key serves every message of the group.
type batchSealer struct {
	prefix []byte // the batch prefix: format 2 || idLen || key id || version || salt
	aead   cipher.AEAD
	base   [nonceLen]byte
}

// init derives the group's batch key and base nonce with s's KDF state and
// wipes the derived bytes from it. The caller validated keyID.
func (b *batchSealer) init(s *msgScratch, material []byte, keyID string, version uint32, salt []byte) error {
	b.prefix = appendPrefix(make([]byte, 0, fixedHeaderLen+len(keyID)), FormatV2, keyID, version, salt)
	aead, err := s.aead(material, salt, hkdfInfoV2, b.prefix)
	b.base = s.nonce
	s.kdf.wipe()
	clear(s.nonce[:])
	if err != nil {
		return err
	}
	b.aead = aead
	return nil
}

// wipe clears the base nonce and drops the AES-GCM instance (whose key
// schedule crypto/aes keeps out of reach).
func (b *batchSealer) wipe() {
	clear(b.base[:])
	b.aead = nil
}

// seal appends the v2 ciphertext of message index (header, body, tag) to
// dst, using s's nonce and AAD buffers; with cap(dst)-len(dst) >=
// sealedLenV2 it does not allocate. The caller validated encCtx and makes
// index unique within the batch.
func (b *batchSealer) seal(dst []byte, s *msgScratch, index uint32, plaintext []byte, encCtx map[string]string) []byte {
	start := len(dst)
	dst = append(dst, b.prefix...)
	dst = binary.BigEndian.AppendUint32(dst, index)
	header := dst[start:len(dst):len(dst)]
	s.nonce = b.base
	xorIndex(&s.nonce, index)
	return b.aead.Seal(dst, s.nonce[:], plaintext, s.setAAD(header, encCtx))
}

// openCiphertext opens a parsed ciphertext of either format; a failure to
// authenticate is errAuthFailed.
func openCiphertext(material []byte, p parsed, encCtx map[string]string) ([]byte, error) {
	s := getScratch()
	defer s.release()
	info := hkdfInfoV1
	if p.Format == FormatV2 {
		info = hkdfInfoV2
	}
	aead, err := s.aead(material, p.salt, info, p.prefix)
	if err != nil {
		return nil, wrapErr(ErrUnwrap, err, "could not derive message key")
	}
	if p.Format == FormatV2 {
		xorIndex(&s.nonce, p.index)
	}
	plaintext, err := aead.Open(nil, s.nonce[:], p.body, s.setAAD(p.header, encCtx))
	if err != nil {
		return nil, errAuthFailed
	}
	return plaintext, nil
}
