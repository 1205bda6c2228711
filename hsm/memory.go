package hsm

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/subtle"
	"fmt"
	"sync"
)

// Memory is a pure-Go Provider that keeps everything in RAM: an RSA-3072 identity key
// (crypto/rsa), KEKs from crypto/rand, AES-GCM from crypto/cipher, check values by AES-CMAC.
// Its formats are those of PKCS11: a KEK it wraps (RSA-OAEP, SHA-1 + MGF1-SHA1, no label)
// unwraps in a SoftHSM token and the other way round, a blob it seals opens in a token holding
// the same KEK, and check values agree. Nothing survives Close or the process.
type Memory struct {
	identityMu sync.Mutex // serialises identity generation

	mu       sync.Mutex
	closed   bool
	identity *rsa.PrivateKey
	keks     map[uint32]*memoryKEK
}

type memoryKEK struct {
	key        []byte
	checkValue []byte
	aead       cipher.AEAD
}

// NewMemory returns an empty in-memory provider.
func NewMemory() *Memory {
	return &Memory{keks: make(map[uint32]*memoryKEK)}
}

var errMemoryClosed = fmt.Errorf("%w: provider closed", ErrUnavailable)

func newMemoryKEK(key []byte) (*memoryKEK, error) {
	if len(key) != KEKSize {
		return nil, fmt.Errorf("hsm: kek is %d bytes, want %d", len(key), KEKSize)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	kcv, err := aesCMAC(key, checkValueBlock[:])
	if err != nil {
		return nil, err
	}
	return &memoryKEK{key: key, checkValue: kcv, aead: aead}, nil
}

func (m *Memory) EnsureIdentity(ctx context.Context) (*rsa.PublicKey, error) {
	// Generate outside m.mu (it takes a second) so Seal/Open are not held up; identityMu
	// makes concurrent first calls share one key.
	m.identityMu.Lock()
	defer m.identityMu.Unlock()
	m.mu.Lock()
	closed, id := m.closed, m.identity
	m.mu.Unlock()
	if closed {
		return nil, errMemoryClosed
	}
	if id == nil {
		k, err := rsa.GenerateKey(rand.Reader, IdentityBits)
		if err != nil {
			return nil, fmt.Errorf("hsm: generate identity: %w", err)
		}
		m.mu.Lock()
		if m.closed {
			m.mu.Unlock()
			return nil, errMemoryClosed
		}
		m.identity, id = k, k
		m.mu.Unlock()
	}
	pub := id.PublicKey
	return &pub, nil
}

func (m *Memory) GenerateKEK(ctx context.Context, version uint32) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errMemoryClosed
	}
	if _, ok := m.keks[version]; ok {
		return nil, fmt.Errorf("hsm: generate kek v%d: %w", version, ErrKEKExists)
	}
	key := make([]byte, KEKSize)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("hsm: generate kek v%d: %w", version, err)
	}
	k, err := newMemoryKEK(key)
	if err != nil {
		return nil, fmt.Errorf("hsm: generate kek v%d: %w", version, err)
	}
	m.keks[version] = k
	return clone(k.checkValue), nil
}

func (m *Memory) kek(version uint32) (*memoryKEK, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errMemoryClosed
	}
	k, ok := m.keks[version]
	if !ok {
		return nil, fmt.Errorf("hsm: kek v%d: %w", version, ErrKEKNotFound)
	}
	return k, nil
}

func (m *Memory) KEKCheckValue(ctx context.Context, version uint32) ([]byte, error) {
	k, err := m.kek(version)
	if err != nil {
		return nil, err
	}
	return clone(k.checkValue), nil
}

func (m *Memory) WrapKEK(ctx context.Context, version uint32, recipient *rsa.PublicKey) ([]byte, error) {
	if err := checkRecipient(recipient); err != nil {
		return nil, err
	}
	// Copy the key under the lock: DestroyKEK and Close zero k.key in place.
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil, errMemoryClosed
	}
	k, ok := m.keks[version]
	if !ok {
		m.mu.Unlock()
		return nil, fmt.Errorf("hsm: kek v%d: %w", version, ErrKEKNotFound)
	}
	key := clone(k.key)
	m.mu.Unlock()
	defer clear(key)
	wrapped, err := rsa.EncryptOAEP(sha1.New(), rand.Reader, recipient, key, nil)
	if err != nil {
		return nil, fmt.Errorf("hsm: wrap kek v%d: %w", version, err)
	}
	return wrapped, nil
}

func (m *Memory) UnwrapKEK(ctx context.Context, version uint32, wrapped []byte) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errMemoryClosed
	}
	if m.identity == nil {
		return nil, fmt.Errorf("hsm: unwrap kek v%d: no identity key (call EnsureIdentity first)", version)
	}
	if len(wrapped) != m.identity.Size() {
		return nil, fmt.Errorf("hsm: unwrap kek v%d: wrapped blob is %d bytes, want %d", version, len(wrapped), m.identity.Size())
	}
	key, err := rsa.DecryptOAEP(sha1.New(), nil, m.identity, wrapped, nil)
	if err != nil {
		return nil, fmt.Errorf("hsm: unwrap kek v%d: %w", version, err)
	}
	k, err := newMemoryKEK(key)
	if err != nil {
		return nil, fmt.Errorf("hsm: unwrap kek v%d: %w", version, err)
	}
	if have, ok := m.keks[version]; ok {
		if subtle.ConstantTimeCompare(have.checkValue, k.checkValue) != 1 {
			return nil, fmt.Errorf("hsm: unwrap kek v%d: %w", version, ErrKEKMismatch)
		}
		return clone(have.checkValue), nil
	}
	m.keks[version] = k
	return clone(k.checkValue), nil
}

// DestroyKEK zeroes and forgets KEK `version` (best effort, as Close: the AES key schedule
// inside its cipher.AEAD cannot be zeroed). A Seal or Open that fetched the key before still
// finishes with it; every later call gets ErrKEKNotFound.
func (m *Memory) DestroyKEK(ctx context.Context, version uint32) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errMemoryClosed
	}
	if k, ok := m.keks[version]; ok {
		clear(k.key)
		delete(m.keks, version)
	}
	return nil
}

func (m *Memory) Seal(ctx context.Context, kekVersion uint32, plaintext, aad []byte) ([]byte, error) {
	k, err := m.kek(kekVersion)
	if err != nil {
		return nil, err
	}
	out := make([]byte, gcmIVSize, gcmIVSize+len(plaintext)+gcmTagSize)
	if _, err := rand.Read(out); err != nil {
		return nil, fmt.Errorf("hsm: seal: %w", err)
	}
	return k.aead.Seal(out, out, plaintext, aad), nil
}

func (m *Memory) Open(ctx context.Context, kekVersion uint32, sealed, aad []byte) ([]byte, error) {
	k, err := m.kek(kekVersion)
	if err != nil {
		return nil, err
	}
	if len(sealed) < gcmIVSize+gcmTagSize {
		return nil, fmt.Errorf("hsm: open: sealed blob is %d bytes, too short: %w", len(sealed), ErrAuthFailed)
	}
	pt, err := k.aead.Open(nil, sealed[:gcmIVSize], sealed[gcmIVSize:], aad)
	if err != nil {
		return nil, fmt.Errorf("hsm: open: %w", ErrAuthFailed)
	}
	if pt == nil {
		pt = []byte{}
	}
	return pt, nil
}

func (m *Memory) GenerateRandom(ctx context.Context, n int) ([]byte, error) {
	if err := checkRandomLen(n); err != nil {
		return nil, err
	}
	if err := m.Health(ctx); err != nil {
		return nil, err
	}
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("hsm: generate random: %w", err)
	}
	return b, nil
}

func (m *Memory) Health(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return errMemoryClosed
	}
	return nil
}

// Close forgets every key (best effort: KEK bytes are zeroed; the AES key schedules inside
// cipher.AEAD and the RSA key cannot be).
func (m *Memory) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	for v, k := range m.keks {
		clear(k.key)
		delete(m.keks, v)
	}
	m.identity = nil
	return nil
}

func clone(b []byte) []byte { return append([]byte(nil), b...) }
