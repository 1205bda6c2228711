package client

import (
	"bufio"
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
)

// Envelope format, version 1 (DESIGN.md in this directory has the full
// description and the reasons):
//
//	offset  size  field
//	0       6     magic "CABENV"
//	6       1     format version = 1
//	7       1     suite = 1 (AES-256-GCM, STREAM chunk nonces)
//	8       4     chunk size C, big endian (256 .. 1 MiB; 64 KiB by default)
//	12      7     nonce prefix (random)
//	19      2     length L of the wrapped data key, big endian (1 .. 4096)
//	21      L     wrapped data key: a Cabinet ciphertext from GenerateDataKey
//	21+L    ...   chunks: every chunk but the last holds C plaintext bytes;
//	              the last holds 0..C (0 only when the data is empty); each
//	              is AES-256-GCM ciphertext + 16-byte tag
//
// Chunk i is sealed under the data key with nonce = prefix || uint32 i (big
// endian) || last (1 for the final chunk, else 0) and associated data =
// SHA-256 of the header (bytes 0 .. 21+L). So a changed header, a changed,
// dropped, reordered or appended chunk and a truncated stream all fail
// authentication. The encryption context is bound to the wrapped data key
// by Cabinet (GenerateDataKey/Decrypt), so a wrong context fails there.
const (
	envelopeMagic       = "CABENV"
	envelopeVersion     = 1
	envelopeSuiteGCM    = 1
	envelopeFixedHeader = 21
	noncePrefixLen      = 7
	gcmTagLen           = 16
	dataKeyLen          = 32

	// DefaultChunkSize is the plaintext size of an envelope chunk.
	DefaultChunkSize = 64 << 10
	// MinChunkSize and MaxChunkSize bound WithChunkSize and what
	// DecryptStream accepts (it allocates one chunk).
	MinChunkSize = 256
	MaxChunkSize = 1 << 20
	// maxWrappedKeyLen bounds the wrapped data key a reader accepts.
	maxWrappedKeyLen = 4096
)

// ErrInvalidEnvelope is returned (wrapped) for data that is not an intact
// envelope: unknown format, tampered with, truncated, reordered or extended.
var ErrInvalidEnvelope = errors.New("not an intact Cabinet envelope (corrupt, truncated or tampered with)")

// dataKeys is what an Envelope needs from Cabinet; *Client provides it.
type dataKeys interface {
	newDataKey(ctx context.Context, keyID string, encCtx map[string]string) (plaintext, wrapped []byte, err error)
	openDataKey(ctx context.Context, wrapped []byte, encCtx map[string]string) ([]byte, error)
}

func (c *Client) newDataKey(ctx context.Context, keyID string, encCtx map[string]string) ([]byte, []byte, error) {
	resp, err := c.GenerateDataKey(ctx, keyID, dataKeyLen, encCtx)
	if err != nil {
		return nil, nil, err
	}
	return resp.GetPlaintext(), resp.GetCiphertext(), nil
}

func (c *Client) openDataKey(ctx context.Context, wrapped []byte, encCtx map[string]string) ([]byte, error) {
	return c.Decrypt(ctx, wrapped, encCtx)
}

// Envelope encrypts data of any size locally under a fresh AES-256 data
// key from GenerateDataKey and stores the wrapped data key in the
// envelope's header: one GenerateDataKey call per envelope to encrypt, one
// Decrypt call to decrypt, however large the data. The data key's
// plaintext is cleared as soon as the cipher is set up (the AES key
// schedule inside crypto/cipher cannot be cleared). It is safe for
// concurrent use.
type Envelope struct {
	keys      dataKeys
	chunkSize int
	rand      io.Reader // nonce prefixes; crypto/rand (tests make it deterministic)
}

// EnvelopeOption configures NewEnvelope.
type EnvelopeOption func(*Envelope)

// WithChunkSize sets the plaintext size of the chunks EncryptStream writes
// (DefaultChunkSize; MinChunkSize..MaxChunkSize). Readers take the size
// from the header.
func WithChunkSize(n int) EnvelopeOption { return func(e *Envelope) { e.chunkSize = n } }

// NewEnvelope returns an Envelope that gets its data keys from c.
func NewEnvelope(c *Client, opts ...EnvelopeOption) *Envelope {
	return newEnvelope(c, opts...)
}

func newEnvelope(keys dataKeys, opts ...EnvelopeOption) *Envelope {
	e := &Envelope{keys: keys, chunkSize: DefaultChunkSize, rand: rand.Reader}
	for _, o := range opts {
		o(e)
	}
	return e
}

// Encrypt returns plaintext sealed in an envelope under a data key from
// keyID, bound to encCtx (may be nil).
func (e *Envelope) Encrypt(ctx context.Context, keyID string, plaintext []byte, encCtx map[string]string) ([]byte, error) {
	var b bytes.Buffer
	b.Grow(envelopeFixedHeader + 256 + len(plaintext) + (len(plaintext)/e.chunkSizeOrDefault()+1)*gcmTagLen)
	if err := e.EncryptStream(ctx, &b, bytes.NewReader(plaintext), keyID, encCtx); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// Decrypt opens an envelope made by Encrypt or EncryptStream with the same
// encryption context. It returns no plaintext unless the whole envelope is
// intact.
func (e *Envelope) Decrypt(ctx context.Context, envelope []byte, encCtx map[string]string) ([]byte, error) {
	var b bytes.Buffer
	if err := e.DecryptStream(ctx, &b, bytes.NewReader(envelope), encCtx); err != nil {
		clear(b.Bytes())
		return nil, err
	}
	return b.Bytes(), nil
}

func (e *Envelope) chunkSizeOrDefault() int {
	if e.chunkSize < MinChunkSize || e.chunkSize > MaxChunkSize {
		return DefaultChunkSize
	}
	return e.chunkSize
}

// EncryptStream reads r to its end and writes an envelope to w, under a
// fresh data key from keyID bound to encCtx. Memory use is one chunk; a
// cancelled ctx stops it between chunks.
func (e *Envelope) EncryptStream(ctx context.Context, w io.Writer, r io.Reader, keyID string, encCtx map[string]string) error {
	cs := e.chunkSize
	if cs < MinChunkSize || cs > MaxChunkSize {
		return fmt.Errorf("envelope: chunk size %d is outside %d..%d", cs, MinChunkSize, MaxChunkSize)
	}
	dk, wrapped, err := e.keys.newDataKey(ctx, keyID, encCtx)
	if err != nil {
		return fmt.Errorf("envelope: generate data key: %w", err)
	}
	aead, err := newChunkAEAD(dk)
	clear(dk)
	if err != nil {
		return err
	}
	if len(wrapped) == 0 || len(wrapped) > maxWrappedKeyLen {
		return fmt.Errorf("envelope: the wrapped data key is %d bytes (want 1..%d)", len(wrapped), maxWrappedKeyLen)
	}
	var prefix [noncePrefixLen]byte
	if _, err := io.ReadFull(e.rand, prefix[:]); err != nil {
		return fmt.Errorf("envelope: nonce prefix: %w", err)
	}
	header := encodeHeader(uint32(cs), prefix, wrapped)
	if _, err := w.Write(header); err != nil {
		return fmt.Errorf("envelope: write: %w", err)
	}
	s := chunkStream{aead: aead, prefix: prefix, aad: sha256.Sum256(header)}
	br := bufio.NewReader(r)
	buf := make([]byte, cs, cs+gcmTagLen)
	defer clear(buf)
	for counter := uint64(0); ; counter++ {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("envelope: %w", err)
		}
		n, err := io.ReadFull(br, buf)
		last := false
		switch {
		case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
			last = true
		case err != nil:
			return fmt.Errorf("envelope: read: %w", err)
		default: // a full chunk: the last one if nothing follows
			if _, err := br.Peek(1); errors.Is(err, io.EOF) {
				last = true
			} else if err != nil {
				return fmt.Errorf("envelope: read: %w", err)
			}
		}
		if counter == math.MaxUint32 && !last {
			return fmt.Errorf("envelope: data too large for chunk size %d", cs)
		}
		sealed := s.seal(buf[:0], buf[:n], uint32(counter), last)
		if _, err := w.Write(sealed); err != nil {
			return fmt.Errorf("envelope: write: %w", err)
		}
		if last {
			return nil
		}
	}
}

// DecryptStream reads an envelope from r and writes its plaintext to w,
// with one Decrypt call for the data key (encCtx must be the one used to
// encrypt). Chunks are written as they are authenticated, so a truncated
// or tampered stream is detected only when its damaged part is reached:
// treat what w received as untrusted until DecryptStream returns nil
// (write to a temporary file and rename it on success, as `cabinet
// decrypt-file` does). Trailing data after the last chunk is an error.
func (e *Envelope) DecryptStream(ctx context.Context, w io.Writer, r io.Reader, encCtx map[string]string) error {
	br := bufio.NewReader(r)
	h, err := readHeader(br)
	if err != nil {
		return err
	}
	dk, err := e.keys.openDataKey(ctx, h.wrapped, encCtx)
	if err != nil {
		return fmt.Errorf("envelope: decrypt data key: %w", err)
	}
	aead, err := newChunkAEAD(dk)
	clear(dk)
	if err != nil {
		return err
	}
	return openChunks(ctx, w, br, h, aead)
}

// header is a parsed envelope header.
type header struct {
	chunkSize int
	prefix    [noncePrefixLen]byte
	wrapped   []byte
	raw       []byte // the encoded header, hashed into every chunk's AAD
}

func encodeHeader(chunkSize uint32, prefix [noncePrefixLen]byte, wrapped []byte) []byte {
	h := make([]byte, 0, envelopeFixedHeader+len(wrapped))
	h = append(h, envelopeMagic...)
	h = append(h, envelopeVersion, envelopeSuiteGCM)
	h = binary.BigEndian.AppendUint32(h, chunkSize)
	h = append(h, prefix[:]...)
	h = binary.BigEndian.AppendUint16(h, uint16(len(wrapped)))
	return append(h, wrapped...)
}

// readHeader reads and checks the header; it allocates at most
// maxWrappedKeyLen bytes whatever the input.
func readHeader(r io.Reader) (*header, error) {
	fixed := make([]byte, envelopeFixedHeader)
	if _, err := io.ReadFull(r, fixed); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("envelope: %w: shorter than a header", ErrInvalidEnvelope)
		}
		return nil, fmt.Errorf("envelope: read: %w", err)
	}
	if string(fixed[:6]) != envelopeMagic {
		return nil, fmt.Errorf("envelope: %w: no %q magic (not an envelope)", ErrInvalidEnvelope, envelopeMagic)
	}
	if fixed[6] != envelopeVersion {
		return nil, fmt.Errorf("envelope: %w: format version %d is not supported (this client reads version %d)", ErrInvalidEnvelope, fixed[6], envelopeVersion)
	}
	if fixed[7] != envelopeSuiteGCM {
		return nil, fmt.Errorf("envelope: %w: unknown cipher suite %d", ErrInvalidEnvelope, fixed[7])
	}
	h := &header{chunkSize: int(binary.BigEndian.Uint32(fixed[8:12]))}
	if h.chunkSize < MinChunkSize || h.chunkSize > MaxChunkSize {
		return nil, fmt.Errorf("envelope: %w: chunk size %d is outside %d..%d", ErrInvalidEnvelope, h.chunkSize, MinChunkSize, MaxChunkSize)
	}
	copy(h.prefix[:], fixed[12:19])
	n := int(binary.BigEndian.Uint16(fixed[19:21]))
	if n == 0 || n > maxWrappedKeyLen {
		return nil, fmt.Errorf("envelope: %w: wrapped data key length %d is outside 1..%d", ErrInvalidEnvelope, n, maxWrappedKeyLen)
	}
	h.raw = make([]byte, envelopeFixedHeader+n)
	copy(h.raw, fixed)
	if _, err := io.ReadFull(r, h.raw[envelopeFixedHeader:]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("envelope: %w: header truncated", ErrInvalidEnvelope)
		}
		return nil, fmt.Errorf("envelope: read: %w", err)
	}
	h.wrapped = h.raw[envelopeFixedHeader:]
	return h, nil
}

// openChunks authenticates and writes the chunks that follow the header.
func openChunks(ctx context.Context, w io.Writer, br *bufio.Reader, h *header, aead cipher.AEAD) error {
	s := chunkStream{aead: aead, prefix: h.prefix, aad: sha256.Sum256(h.raw)}
	rec := make([]byte, h.chunkSize+gcmTagLen)
	defer clear(rec)
	for counter := uint64(0); counter <= math.MaxUint32; counter++ {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("envelope: %w", err)
		}
		n, err := io.ReadFull(br, rec)
		last := false
		switch {
		case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
			if n < gcmTagLen {
				return fmt.Errorf("envelope: %w: chunk %d truncated", ErrInvalidEnvelope, counter)
			}
			last = true
		case err != nil:
			return fmt.Errorf("envelope: read: %w", err)
		default:
			if _, err := br.Peek(1); errors.Is(err, io.EOF) {
				last = true
			} else if err != nil {
				return fmt.Errorf("envelope: read: %w", err)
			}
		}
		pt, err := s.open(rec[:0], rec[:n], uint32(counter), last)
		if err != nil {
			// A chunk sealed as last read as not last means data was
			// appended; one not sealed as last read as last means the
			// stream was cut; other chunks were changed or moved.
			return fmt.Errorf("envelope: %w: chunk %d does not authenticate", ErrInvalidEnvelope, counter)
		}
		if last && len(pt) == 0 && counter > 0 {
			return fmt.Errorf("envelope: %w: empty final chunk", ErrInvalidEnvelope)
		}
		if _, err := w.Write(pt); err != nil {
			return fmt.Errorf("envelope: write: %w", err)
		}
		if last {
			return nil
		}
	}
	return fmt.Errorf("envelope: %w: more than 2^32 chunks", ErrInvalidEnvelope)
}

func newChunkAEAD(dataKey []byte) (cipher.AEAD, error) {
	if len(dataKey) != dataKeyLen {
		return nil, fmt.Errorf("envelope: data key is %d bytes, want %d", len(dataKey), dataKeyLen)
	}
	block, err := aes.NewCipher(dataKey)
	if err != nil {
		return nil, fmt.Errorf("envelope: %w", err)
	}
	return cipher.NewGCM(block)
}

// chunkStream seals and opens chunks with STREAM nonces:
// prefix || counter || last flag.
type chunkStream struct {
	aead   cipher.AEAD
	prefix [noncePrefixLen]byte
	aad    [sha256.Size]byte
}

func (s *chunkStream) nonce(counter uint32, last bool) []byte {
	n := make([]byte, 0, 12)
	n = append(n, s.prefix[:]...)
	n = binary.BigEndian.AppendUint32(n, counter)
	if last {
		return append(n, 1)
	}
	return append(n, 0)
}

func (s *chunkStream) seal(dst, plaintext []byte, counter uint32, last bool) []byte {
	return s.aead.Seal(dst, s.nonce(counter, last), plaintext, s.aad[:])
}

func (s *chunkStream) open(dst, sealed []byte, counter uint32, last bool) ([]byte, error) {
	return s.aead.Open(dst, s.nonce(counter, last), sealed, s.aad[:])
}
