// Package keyops owns what Cabinet does with key material: generating,
// importing (BYOK) and wrapping it through a node's HSM, unwrapping it on
// first use and caching the result, the ciphertext format, every
// cryptographic operation (Encrypt/Decrypt/ReEncrypt/GenerateDataKey,
// Sign/Verify, GenerateMac/VerifyMac, asymmetric encryption, GetPublicKey),
// and the state rules that decide whether a key version may be used now.
//
// It knows nothing about Raft or gRPC: callers pass key records from the
// replicated state and map the sentinel errors to status codes. See
// DESIGN.md in this folder and docs/CIPHERTEXT.md.
package keyops

import (
	"context"
	"crypto/rand"
	"errors"
	"io"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// Sealer is what keyops needs from a node's HSM (hsm.Provider satisfies it).
type Sealer interface {
	Seal(ctx context.Context, kekVersion uint32, plaintext, aad []byte) ([]byte, error)
	Open(ctx context.Context, kekVersion uint32, sealed, aad []byte) ([]byte, error)
	GenerateRandom(ctx context.Context, n int) ([]byte, error)
}

// DefaultCacheSize is the default bound of the unwrap cache, in key versions.
const DefaultCacheSize = 10000

// Data key lengths accepted by GenerateDataKey.
const (
	DefaultDataKeyLen = 32
	MaxDataKeyLen     = 1024
)

// Config configures an Engine.
type Config struct {
	// Sealer wraps and unwraps material; required.
	Sealer Sealer
	// CacheSize bounds the number of cached key versions; 0 means
	// DefaultCacheSize.
	CacheSize int
	// Rand supplies salts, data keys and the local half of new material
	// (mixed with the HSM's randomness); nil means crypto/rand.Reader.
	// RSA key generation, signatures, RSA-OAEP and import wrapping keys
	// always use crypto/rand (docs/KEY-SPECS.md).
	Rand io.Reader
}

// Engine performs key operations. It is safe for concurrent use.
type Engine struct {
	sealer  Sealer
	rand    io.Reader
	cache   *unwrapCache
	entropy hsmEntropy
}

// New returns an Engine.
func New(cfg Config) (*Engine, error) {
	if cfg.Sealer == nil {
		return nil, errors.New("keyops: Config.Sealer is required")
	}
	if cfg.CacheSize < 0 {
		return nil, errors.New("keyops: Config.CacheSize must not be negative")
	}
	if cfg.CacheSize == 0 {
		cfg.CacheSize = DefaultCacheSize
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	return &Engine{sealer: cfg.Sealer, rand: cfg.Rand, cache: newUnwrapCache(cfg.CacheSize)}, nil
}

// Forget drops every cached version of keyID. Call it when a key is
// disabled, revoked, scheduled for destruction, destroyed or otherwise
// changes; material is zeroed as soon as no operation in flight uses it.
func (e *Engine) Forget(keyID string) { e.cache.forget(keyID) }

// Purge drops the whole cache (after a snapshot restore or KEK change).
func (e *Engine) Purge() { e.cache.purge() }

// CacheStats reports the unwrap cache's counters.
func (e *Engine) CacheStats() CacheStats { return e.cache.stats() }

// Encrypt seals plaintext (at most MaxPlaintextLen bytes) under key's primary
// version, binding encCtx, after checking the state rules. The key must be
// an AES_256 key (RSA keys encrypt with EncryptAsymmetric).
func (e *Engine) Encrypt(ctx context.Context, key *fsmpb.KeyRecord, plaintext []byte, encCtx map[string]string) (ciphertext []byte, version uint32, err error) {
	if len(plaintext) > MaxPlaintextLen {
		return nil, 0, newErr(ErrInvalidArgument, "plaintext is %d bytes; Encrypt takes at most %d (encrypt larger data under a data key from GenerateDataKey)", len(plaintext), MaxPlaintextLen)
	}
	ctxLen, err := validateContext(encCtx)
	if err != nil {
		return nil, 0, err
	}
	if err := CheckOperation(key, key.GetPrimaryVersion(), OpEncrypt, false); err != nil {
		return nil, 0, err
	}
	return e.encrypt(ctx, key, plaintext, encCtx, ctxLen)
}

// errNotSymmetric is returned when a symmetric operation names an RSA
// ENCRYPT_DECRYPT key.
func errNotSymmetric(key *fsmpb.KeyRecord, op string) error {
	return newErr(ErrInvalidArgument, "key %s is an %s key; %s takes AES_256 keys (use EncryptAsymmetric/DecryptAsymmetric with RSA keys)",
		key.GetKeyId(), specName(key.GetSpec()), op)
}

// encrypt does Encrypt's work after the checks.
func (e *Engine) encrypt(ctx context.Context, key *fsmpb.KeyRecord, plaintext []byte, encCtx map[string]string, ctxLen int) ([]byte, uint32, error) {
	if key.GetSpec() != fsmpb.KeySpec_KEY_SPEC_AES_256 {
		return nil, 0, errNotSymmetric(key, "Encrypt")
	}
	keyID, version := key.GetKeyId(), key.GetPrimaryVersion()
	if !validKeyIDBytes(keyID) {
		return nil, 0, newErr(ErrInvalidArgument, "key id cannot be carried in a ciphertext")
	}
	entry, err := e.material(ctx, key, version)
	if err != nil {
		return nil, 0, err
	}
	defer entry.release()

	n := sealedLen(keyID, len(plaintext))
	out := make([]byte, n)
	salt := out[n-len(plaintext)-tagLen-saltLen : n-len(plaintext)-tagLen]
	if _, err := io.ReadFull(e.rand, salt); err != nil {
		return nil, 0, wrapErr(ErrUnwrap, err, "could not read random salt")
	}
	out, err = sealV1(out[:0], entry.material, keyID, version, salt, plaintext, encCtx)
	if err != nil {
		return nil, 0, wrapErr(ErrUnwrap, err, "could not derive message key")
	}
	return out, version, nil
}

// Decrypt parses ciphertext's header, looks the key up, checks the state
// rules for the version it names (allowCompromised lets a COMPROMISED key
// decrypt: only administrators may set it), and opens it with encCtx.
func (e *Engine) Decrypt(ctx context.Context, lookup func(keyID string) (*fsmpb.KeyRecord, bool), ciphertext []byte, encCtx map[string]string, allowCompromised bool) (plaintext []byte, keyID string, version uint32, err error) {
	p, key, ctxLen, err := e.openTarget(lookup, ciphertext, encCtx, OpDecrypt, allowCompromised)
	if err != nil {
		return nil, "", 0, err
	}
	plaintext, err = e.decrypt(ctx, p, key, encCtx, ctxLen)
	if err != nil {
		return nil, "", 0, err
	}
	return plaintext, p.KeyID, p.Version, nil
}

// openTarget parses a ciphertext, validates the context, looks the key up
// and checks op (OpDecrypt or OpReEncryptFrom) for the version it names.
func (e *Engine) openTarget(lookup func(keyID string) (*fsmpb.KeyRecord, bool), ciphertext []byte, encCtx map[string]string, op Operation, allowCompromised bool) (parsed, *fsmpb.KeyRecord, int, error) {
	p, err := parseCiphertext(ciphertext)
	if err != nil {
		return parsed{}, nil, 0, err
	}
	ctxLen, err := validateContext(encCtx)
	if err != nil {
		return parsed{}, nil, 0, err
	}
	key, ok := lookup(p.KeyID)
	if !ok || key == nil {
		return parsed{}, nil, 0, newErr(ErrKeyNotFound, "key %s named by the ciphertext does not exist", p.KeyID)
	}
	if err := CheckOperation(key, p.Version, op, allowCompromised); err != nil {
		return parsed{}, nil, 0, err
	}
	if key.GetSpec() != fsmpb.KeySpec_KEY_SPEC_AES_256 {
		// Only AES_256 keys make Cabinet ciphertexts: the header is forged
		// or the ciphertext belongs to DecryptAsymmetric.
		return parsed{}, nil, 0, newErr(ErrInvalidCiphertext, "ciphertext names key %s, an %s key; Cabinet ciphertexts are made by AES_256 keys (RSA ciphertexts go to DecryptAsymmetric)",
			key.GetKeyId(), specName(key.GetSpec()))
	}
	return p, key, ctxLen, nil
}

// decrypt opens a parsed ciphertext under key after the checks.
func (e *Engine) decrypt(ctx context.Context, p parsed, key *fsmpb.KeyRecord, encCtx map[string]string, ctxLen int) ([]byte, error) {
	entry, err := e.material(ctx, key, p.Version)
	if err != nil {
		return nil, err
	}
	defer entry.release()
	return openCiphertext(entry.material, p, encCtx)
}

// ReEncrypt decrypts ciphertext (OpReEncryptFrom on the version it names,
// with srcCtx; allowCompromised as for Decrypt) and encrypts the plaintext
// under destKey's primary version (OpReEncryptTo, with destCtx). The
// plaintext never leaves the Engine and is zeroed before returning.
// destKey may be the source key itself (moving data to its primary
// version after a rotation). Both keys must be AES_256.
func (e *Engine) ReEncrypt(ctx context.Context, lookup func(keyID string) (*fsmpb.KeyRecord, bool), ciphertext []byte, srcCtx map[string]string, destKey *fsmpb.KeyRecord, destCtx map[string]string, allowCompromised bool) (newCiphertext []byte, srcKeyID string, srcVersion, destVersion uint32, err error) {
	p, src, srcLen, err := e.openTarget(lookup, ciphertext, srcCtx, OpReEncryptFrom, allowCompromised)
	if err != nil {
		return nil, "", 0, 0, err
	}
	destLen, err := validateContext(destCtx)
	if err != nil {
		return nil, "", 0, 0, err
	}
	// Check the destination before decrypting anything.
	if err := CheckOperation(destKey, destKey.GetPrimaryVersion(), OpReEncryptTo, false); err != nil {
		return nil, "", 0, 0, err
	}
	if destKey.GetSpec() != fsmpb.KeySpec_KEY_SPEC_AES_256 {
		return nil, "", 0, 0, errNotSymmetric(destKey, "ReEncrypt")
	}
	plaintext, err := e.decrypt(ctx, p, src, srcCtx, srcLen)
	if err != nil {
		return nil, "", 0, 0, err
	}
	defer clear(plaintext)
	newCiphertext, destVersion, err = e.encrypt(ctx, destKey, plaintext, destCtx, destLen)
	if err != nil {
		return nil, "", 0, 0, err
	}
	return newCiphertext, p.KeyID, p.Version, destVersion, nil
}

// GenerateDataKey returns n random bytes (0 means DefaultDataKeyLen; at most
// MaxDataKeyLen) and their ciphertext under key, as Encrypt would produce.
func (e *Engine) GenerateDataKey(ctx context.Context, key *fsmpb.KeyRecord, n int, encCtx map[string]string) (plaintext, ciphertext []byte, version uint32, err error) {
	if n == 0 {
		n = DefaultDataKeyLen
	}
	if n < 1 || n > MaxDataKeyLen {
		return nil, nil, 0, newErr(ErrInvalidArgument, "data key length must be 1..%d bytes (0 means %d); got %d", MaxDataKeyLen, DefaultDataKeyLen, n)
	}
	ctxLen, err := validateContext(encCtx)
	if err != nil {
		return nil, nil, 0, err
	}
	if err := CheckOperation(key, key.GetPrimaryVersion(), OpGenerateDataKey, false); err != nil {
		return nil, nil, 0, err
	}
	if key.GetSpec() != fsmpb.KeySpec_KEY_SPEC_AES_256 {
		return nil, nil, 0, errNotSymmetric(key, "GenerateDataKey")
	}
	plaintext = make([]byte, n)
	if _, err := io.ReadFull(e.rand, plaintext); err != nil {
		return nil, nil, 0, wrapErr(ErrUnwrap, err, "could not read random bytes")
	}
	ciphertext, version, err = e.encrypt(ctx, key, plaintext, encCtx, ctxLen)
	if err != nil {
		clear(plaintext)
		return nil, nil, 0, err
	}
	return plaintext, ciphertext, version, nil
}

// material returns the acquired cache entry of key's version, unwrapping it
// through the Sealer on first use and parsing it into the form operations
// use. The caller must release it. A destroyed version or one without
// material never reaches the Sealer.
func (e *Engine) material(ctx context.Context, key *fsmpb.KeyRecord, version uint32) (*cacheEntry, error) {
	keyID, spec := key.GetKeyId(), key.GetSpec()
	v := findVersion(key, version)
	if v.GetState() == fsmpb.KeyVersionState_KEY_VERSION_STATE_DESTROYED {
		return nil, newErr(ErrKeyState, "version %d of key %s is DESTROYED; its material is gone and it can no longer be used", version, keyID)
	}
	wrapped := v.GetMaterial()
	if len(wrapped.GetBlob()) == 0 {
		return nil, newErr(ErrUnwrap, "key %s version %d has no wrapped material", keyID, version)
	}
	kek, blob := wrapped.GetKekVersion(), wrapped.GetBlob()
	k := cacheKey{keyID: keyID, version: version, kekVersion: kek, spec: spec}
	return e.cache.get(ctx, k, blob, func(ctx context.Context) (secret, error) {
		m, err := e.sealer.Open(ctx, kek, blob, MaterialAAD(keyID, version, spec))
		if err != nil {
			return secret{}, wrapErr(ErrUnwrap, err, "hsm could not unwrap key %s version %d (KEK version %d)", keyID, version, kek)
		}
		raw, signer, err := parseSecret(spec, m)
		if err != nil {
			clear(m)
			return secret{}, newErr(ErrUnwrap, "unwrapped material of key %s version %d is not valid %s material", keyID, version, specName(spec))
		}
		if signer != nil {
			clear(m) // the parsed key holds its own copy
		}
		return secret{material: raw, signer: signer}, nil
	})
}
