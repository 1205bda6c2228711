package keyops

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"slices"
	"sync"
)

// Ciphertext format, version 1 (docs/CIPHERTEXT.md is the reference):
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
const (
	// FormatV1 is the only ciphertext format this package produces.
	FormatV1 byte = 0x01

	saltLen     = 32
	tagLen      = 16
	nonceLen    = 12
	aeadKeyLen  = 32
	maxKeyIDLen = 255
	// fixedHeaderLen is the header without the key id.
	fixedHeaderLen = 1 + 1 + 4 + saltLen

	// MaxPlaintextLen is the largest plaintext Encrypt accepts (64 KiB).
	MaxPlaintextLen = 64 << 10
	// MaxCiphertextLen is the largest ciphertext this format can carry;
	// longer input is rejected before any work is done.
	MaxCiphertextLen = fixedHeaderLen + maxKeyIDLen + MaxPlaintextLen + tagLen

	hkdfInfoV1 = "cabinet/v1/aes-256-gcm"
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
	header []byte // format..salt
	salt   []byte
	body   []byte // ciphertext || tag
}

// ParseCiphertext parses the header of ct. It never panics; every failure is
// ErrInvalidCiphertext.
func ParseCiphertext(ct []byte) (Header, error) {
	p, err := parseCiphertext(ct)
	return p.Header, err
}

func parseCiphertext(ct []byte) (parsed, error) {
	if len(ct) == 0 {
		return parsed{}, newErr(ErrInvalidCiphertext, "ciphertext is empty")
	}
	if ct[0] != FormatV1 {
		return parsed{}, newErr(ErrInvalidCiphertext, "ciphertext is not in a format this node understands (it reads format %d); was it produced by Cabinet?", FormatV1)
	}
	if len(ct) > MaxCiphertextLen {
		return parsed{}, newErr(ErrInvalidCiphertext, "ciphertext is longer than any Cabinet ciphertext (%d bytes at most)", MaxCiphertextLen)
	}
	if len(ct) < 2 {
		return parsed{}, errTruncated
	}
	idLen := int(ct[1])
	if idLen == 0 {
		return parsed{}, newErr(ErrInvalidCiphertext, "ciphertext is malformed: empty key id")
	}
	hdrLen := fixedHeaderLen + idLen
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
	return parsed{
		Header: Header{Format: ct[0], KeyID: string(id), Version: version},
		header: ct[:hdrLen:hdrLen],
		salt:   ct[hdrLen-saltLen : hdrLen : hdrLen],
		body:   ct[hdrLen:],
	}, nil
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
	dst = append(dst, FormatV1, byte(len(keyID)))
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

// aead derives the per-message AES-256-GCM instance from a version's
// material, the message salt and the header, and sets s.nonce.
func (s *msgScratch) aead(material, salt, header []byte) (cipher.AEAD, error) {
	okm := s.kdf.derive(material, salt, header)
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

// sealedLen is the length of the v1 ciphertext of an n-byte plaintext under
// keyID.
func sealedLen(keyID string, n int) int { return fixedHeaderLen + len(keyID) + n + tagLen }

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
	aead, err := s.aead(material, header[len(header)-saltLen:], header)
	if err != nil {
		return nil, err
	}
	return aead.Seal(dst, s.nonce[:], plaintext, s.setAAD(header, encCtx)), nil
}

// openV1 opens a parsed v1 ciphertext; a failure to authenticate is
// errAuthFailed.
func openV1(material []byte, p parsed, encCtx map[string]string) ([]byte, error) {
	s := getScratch()
	defer s.release()
	aead, err := s.aead(material, p.salt, p.header)
	if err != nil {
		return nil, wrapErr(ErrUnwrap, err, "could not derive message key")
	}
	plaintext, err := aead.Open(nil, s.nonce[:], p.body, s.setAAD(p.header, encCtx))
	if err != nil {
		return nil, errAuthFailed
	}
	return plaintext, nil
}
