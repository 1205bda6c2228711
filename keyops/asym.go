package keyops

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"slices"
	"strings"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// SigningAlgorithm is a signature scheme; names (String, and what
// ParseSigningAlgorithm accepts) are those of AWS KMS.
type SigningAlgorithm int

// Signing algorithms. RSASSA-PSS uses MGF1 with the same hash and a salt as
// long as the hash; ECDSA signatures are ASN.1 DER (r, s); ED25519 is pure
// Ed25519 (RFC 8032) over the message itself.
const (
	SigningAlgorithmUnspecified SigningAlgorithm = iota
	RSASSA_PSS_SHA_256
	RSASSA_PSS_SHA_384
	RSASSA_PSS_SHA_512
	RSASSA_PKCS1_V1_5_SHA_256
	RSASSA_PKCS1_V1_5_SHA_384
	RSASSA_PKCS1_V1_5_SHA_512
	ECDSA_SHA_256
	ECDSA_SHA_384
	ED25519
	signingAlgorithmCount
)

var signingAlgorithmNames = [signingAlgorithmCount]string{
	"SIGNING_ALGORITHM_UNSPECIFIED",
	"RSASSA_PSS_SHA_256", "RSASSA_PSS_SHA_384", "RSASSA_PSS_SHA_512",
	"RSASSA_PKCS1_V1_5_SHA_256", "RSASSA_PKCS1_V1_5_SHA_384", "RSASSA_PKCS1_V1_5_SHA_512",
	"ECDSA_SHA_256", "ECDSA_SHA_384", "ED25519",
}

func (a SigningAlgorithm) String() string {
	if a >= 0 && a < signingAlgorithmCount {
		return signingAlgorithmNames[a]
	}
	return "SIGNING_ALGORITHM_UNSPECIFIED"
}

// ParseSigningAlgorithm parses an AWS KMS signing algorithm name
// ("RSASSA_PSS_SHA_256", ..., "ED25519"); anything else is
// ErrInvalidArgument.
func ParseSigningAlgorithm(s string) (SigningAlgorithm, error) {
	for a := RSASSA_PSS_SHA_256; a < signingAlgorithmCount; a++ {
		if signingAlgorithmNames[a] == s {
			return a, nil
		}
	}
	return 0, newErr(ErrInvalidArgument, "unknown signing algorithm %q; use one of %s", truncate(s, 64), strings.Join(signingAlgorithmNames[1:], ", "))
}

// hash is the algorithm's hash (0 for ED25519, which hashes internally).
func (a SigningAlgorithm) hash() crypto.Hash {
	switch a {
	case RSASSA_PSS_SHA_256, RSASSA_PKCS1_V1_5_SHA_256, ECDSA_SHA_256:
		return crypto.SHA256
	case RSASSA_PSS_SHA_384, RSASSA_PKCS1_V1_5_SHA_384, ECDSA_SHA_384:
		return crypto.SHA384
	case RSASSA_PSS_SHA_512, RSASSA_PKCS1_V1_5_SHA_512:
		return crypto.SHA512
	}
	return 0
}

func (a SigningAlgorithm) pss() bool {
	return a == RSASSA_PSS_SHA_256 || a == RSASSA_PSS_SHA_384 || a == RSASSA_PSS_SHA_512
}

// MessageType says whether Sign/Verify get the message or its digest.
type MessageType int

const (
	// MessageRaw: the message itself (at most MaxMessageLen bytes); Cabinet
	// hashes it with the algorithm's hash.
	MessageRaw MessageType = iota
	// MessageDigest: the caller hashed the message with the algorithm's
	// hash; msg must be exactly that long. Not allowed with ED25519.
	MessageDigest
)

func (m MessageType) String() string {
	switch m {
	case MessageRaw:
		return "RAW"
	case MessageDigest:
		return "DIGEST"
	}
	return "UNKNOWN"
}

// ParseMessageType parses "RAW" or "DIGEST".
func ParseMessageType(s string) (MessageType, error) {
	switch s {
	case "RAW":
		return MessageRaw, nil
	case "DIGEST":
		return MessageDigest, nil
	}
	return 0, newErr(ErrInvalidArgument, "unknown message type %q; use RAW or DIGEST", truncate(s, 64))
}

// MaxMessageLen is the largest RAW message Sign, Verify, GenerateMac and
// VerifyMac take (64 KiB, as Encrypt); larger data should be hashed by the
// caller and signed as a DIGEST.
const MaxMessageLen = MaxPlaintextLen

// maxSignatureLen bounds the signatures Verify looks at (RSA-4096: 512).
const maxSignatureLen = 1024

// prepareSigning checks alg and mt against the key and returns what the
// private/public key operation takes: the digest (or, for ED25519, the
// message).
func prepareSigning(key *fsmpb.KeyRecord, msg []byte, mt MessageType, alg SigningAlgorithm) ([]byte, error) {
	spec := key.GetSpec()
	if !slices.Contains(specs[spec].sigAlgs, alg) {
		return nil, newErr(ErrInvalidArgument, "key %s is an %s key; it signs with %v, not %s",
			key.GetKeyId(), specName(spec), specs[spec].sigAlgs, alg)
	}
	h := alg.hash()
	switch mt {
	case MessageRaw:
		if len(msg) > MaxMessageLen {
			return nil, newErr(ErrInvalidArgument, "message is %d bytes; RAW messages are at most %d (hash larger ones and sign the DIGEST)", len(msg), MaxMessageLen)
		}
		if alg == ED25519 {
			return msg, nil
		}
		hh := h.New()
		hh.Write(msg)
		return hh.Sum(nil), nil
	case MessageDigest:
		if alg == ED25519 {
			return nil, newErr(ErrInvalidArgument, "ED25519 signs RAW messages only (pure Ed25519); DIGEST is not allowed")
		}
		if len(msg) != h.Size() {
			return nil, newErr(ErrInvalidArgument, "a %s DIGEST must be the %d-byte %s hash of the message; got %d bytes", alg, h.Size(), h, len(msg))
		}
		return msg, nil
	}
	return nil, newErr(ErrInvalidArgument, "unknown message type %d; use RAW or DIGEST", int(mt))
}

// Sign signs msg (RAW or DIGEST) with alg under key's primary version. The
// key must be a SIGN_VERIFY key whose spec signs with alg (RSA keys: the six
// RSASSA algorithms; EC_P256: ECDSA_SHA_256; EC_P384: ECDSA_SHA_384;
// ED25519: ED25519); anything else is ErrInvalidArgument.
func (e *Engine) Sign(ctx context.Context, key *fsmpb.KeyRecord, msg []byte, mt MessageType, alg SigningAlgorithm) (sig []byte, version uint32, err error) {
	version = key.GetPrimaryVersion()
	if err := CheckOperation(key, version, OpSign, false); err != nil {
		return nil, 0, err
	}
	digest, err := prepareSigning(key, msg, mt, alg)
	if err != nil {
		return nil, 0, err
	}
	entry, err := e.material(ctx, key, version)
	if err != nil {
		return nil, 0, err
	}
	defer entry.release()
	switch k := entry.signer.(type) {
	case *rsa.PrivateKey:
		if alg.pss() {
			sig, err = rsa.SignPSS(rand.Reader, k, alg.hash(), digest, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
		} else {
			sig, err = rsa.SignPKCS1v15(rand.Reader, k, alg.hash(), digest)
		}
	case *ecdsa.PrivateKey:
		sig, err = ecdsa.SignASN1(rand.Reader, k, digest)
	case ed25519.PrivateKey:
		sig = ed25519.Sign(k, digest)
	default:
		return nil, 0, newErr(ErrUnwrap, "key %s version %d has no usable private key", key.GetKeyId(), version)
	}
	if err != nil {
		return nil, 0, wrapErr(ErrUnwrap, err, "could not sign with key %s version %d", key.GetKeyId(), version)
	}
	return sig, version, nil
}

// Verify checks sig over msg with alg and key's version (0 = primary). It
// uses the public key kept in the state (KeyVersion.public_key_der), so it
// never needs the HSM. An invalid signature is (false, nil); a bad request
// (algorithm not for this spec, DIGEST of the wrong length) is
// ErrInvalidArgument. allowCompromised lets a COMPROMISED key verify.
func (e *Engine) Verify(ctx context.Context, key *fsmpb.KeyRecord, version uint32, msg []byte, mt MessageType, alg SigningAlgorithm, sig []byte, allowCompromised bool) (bool, error) {
	version = resolveVersion(key, version)
	if err := CheckOperation(key, version, OpVerify, allowCompromised); err != nil {
		return false, err
	}
	digest, err := prepareSigning(key, msg, mt, alg)
	if err != nil {
		return false, err
	}
	pub, err := statePublicKey(key, version)
	if err != nil {
		return false, err
	}
	if len(sig) == 0 || len(sig) > maxSignatureLen {
		return false, nil
	}
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if alg.pss() {
			return rsa.VerifyPSS(k, alg.hash(), digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}) == nil, nil
		}
		return rsa.VerifyPKCS1v15(k, alg.hash(), digest, sig) == nil, nil
	case *ecdsa.PublicKey:
		return ecdsa.VerifyASN1(k, digest, sig), nil
	case ed25519.PublicKey:
		return ed25519.Verify(k, digest, sig), nil
	}
	return false, newErr(ErrUnwrap, "key %s version %d has no usable public key in the state", key.GetKeyId(), version)
}

// statePublicKey parses the version's public key from the state and checks
// it fits the key's spec.
func statePublicKey(key *fsmpb.KeyRecord, version uint32) (crypto.PublicKey, error) {
	pub, ok := checkPublicKey(key.GetSpec(), findVersion(key, version).GetPublicKeyDer())
	if !ok {
		return nil, newErr(ErrUnwrap, "key %s version %d has no usable %s public key in the state", key.GetKeyId(), version, specName(key.GetSpec()))
	}
	return pub, nil
}

// PublicKey returns the PKIX DER public key of an asymmetric key's version
// (0 = primary), from the state, after the state rules for OpGetPublicKey.
func PublicKey(key *fsmpb.KeyRecord, version uint32) (der []byte, err error) {
	version = resolveVersion(key, version)
	if err := CheckOperation(key, version, OpGetPublicKey, false); err != nil {
		return nil, err
	}
	if _, err := statePublicKey(key, version); err != nil {
		return nil, err
	}
	return bytes.Clone(findVersion(key, version).GetPublicKeyDer()), nil
}

// rsaOAEPOverhead is what RSA-OAEP-SHA256 takes from the modulus size:
// plaintexts are at most k - 2*32 - 2 bytes (190 for RSA-2048).
const rsaOAEPOverhead = 2*sha256.Size + 2

// EncryptAsymmetric encrypts plaintext with RSA-OAEP-SHA256 (MGF1-SHA256,
// empty label) under the public key of an RSA ENCRYPT_DECRYPT key's
// version (0 = primary), taken from the state: no HSM is involved. As every
// producing operation it uses only the primary version (a non-zero version
// must be the primary: this lets a caller pin the version it fetched the
// public key of). The output is the raw RSA ciphertext (modulus size),
// interoperable with `openssl pkeyutl -encrypt -pkeyopt
// rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt
// rsa_mgf1_md:sha256`; it carries no header, so DecryptAsymmetric needs the
// key and version.
func (e *Engine) EncryptAsymmetric(ctx context.Context, key *fsmpb.KeyRecord, version uint32, plaintext []byte) ([]byte, uint32, error) {
	version = resolveVersion(key, version)
	if err := CheckOperation(key, version, OpEncrypt, false); err != nil {
		return nil, 0, err
	}
	if specs[key.GetSpec()].rsaBits == 0 {
		return nil, 0, errNotAsymmetric(key, "EncryptAsymmetric")
	}
	pub, err := statePublicKey(key, version)
	if err != nil {
		return nil, 0, err
	}
	rk := pub.(*rsa.PublicKey)
	if limit := rk.Size() - rsaOAEPOverhead; len(plaintext) > limit {
		return nil, 0, newErr(ErrInvalidArgument, "plaintext is %d bytes; RSA-OAEP-SHA256 under an %s key takes at most %d", len(plaintext), specName(key.GetSpec()), limit)
	}
	ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, rk, plaintext, nil)
	if err != nil {
		return nil, 0, wrapErr(ErrInvalidArgument, err, "could not encrypt under key %s version %d", key.GetKeyId(), version)
	}
	return ct, version, nil
}

func errNotAsymmetric(key *fsmpb.KeyRecord, op string) error {
	return newErr(ErrInvalidArgument, "key %s is an %s key; %s takes RSA ENCRYPT_DECRYPT keys (use Encrypt/Decrypt with AES_256 keys)",
		key.GetKeyId(), specName(key.GetSpec()), op)
}

// errAsymDecryptFailed is the one error for every RSA-OAEP failure, so the
// response says nothing about where decryption failed (no padding oracle).
var errAsymDecryptFailed = newErr(ErrInvalidCiphertext,
	"ciphertext could not be decrypted with this key version: it was altered, or made under another key or version, or not with RSAES_OAEP_SHA_256")

// DecryptAsymmetric decrypts an RSA-OAEP-SHA256 ciphertext (as
// EncryptAsymmetric or openssl make) with an RSA ENCRYPT_DECRYPT key's
// version (0 = primary) after the state rules for OpDecrypt
// (allowCompromised as for Decrypt).
func (e *Engine) DecryptAsymmetric(ctx context.Context, key *fsmpb.KeyRecord, version uint32, ciphertext []byte, allowCompromised bool) ([]byte, error) {
	version = resolveVersion(key, version)
	if err := CheckOperation(key, version, OpDecrypt, allowCompromised); err != nil {
		return nil, err
	}
	s := specs[key.GetSpec()]
	if s.rsaBits == 0 {
		return nil, errNotAsymmetric(key, "DecryptAsymmetric")
	}
	if len(ciphertext) != s.rsaBits/8 {
		return nil, newErr(ErrInvalidCiphertext, "an %s ciphertext is %d bytes; got %d", specName(key.GetSpec()), s.rsaBits/8, len(ciphertext))
	}
	entry, err := e.material(ctx, key, version)
	if err != nil {
		return nil, err
	}
	defer entry.release()
	k, ok := entry.signer.(*rsa.PrivateKey)
	if !ok {
		return nil, newErr(ErrUnwrap, "key %s version %d has no usable private key", key.GetKeyId(), version)
	}
	pt, err := rsa.DecryptOAEP(sha256.New(), nil, k, ciphertext, nil)
	if err != nil {
		return nil, errAsymDecryptFailed
	}
	return pt, nil
}

// truncate shortens caller-supplied text quoted in error messages.
func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}
