package keyops

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base32"
	"encoding/binary"
	"io"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// materialLabel starts the associated data of every wrapped material blob.
const materialLabel = "cabinet/key-material/v1"

// entropyInfo is the HKDF info used to combine the two entropy sources.
const entropyInfo = "cabinet/key-material-gen/v1"

// keyIDEncoding is RFC 4648 base32 (StdEncoding) in lower case: the same
// characters strings.ToLower of StdEncoding gives, without the extra copy.
var keyIDEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// NewKeyID returns "k-" + 26 lowercase base32 characters (128 random bits),
// matching ^k-[a-z0-9]{26}$.
func NewKeyID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	var out [2 + 26]byte
	out[0], out[1] = 'k', '-'
	keyIDEncoding.Encode(out[2:], b[:])
	return string(out[:]), nil
}

// MaterialAAD is the associated data a version's material is sealed with:
//
//	uint32 len(label) || label || uint32 len(keyID) || keyID || uint32 version || uint32 spec
//
// with label "cabinet/key-material/v1", all integers big-endian. A blob moved
// to another key, version or spec fails to open. KEK rotation re-seals
// material under a new KEK version with the same AAD.
func MaterialAAD(keyID string, version uint32, spec fsmpb.KeySpec) []byte {
	b := make([]byte, 0, 4+len(materialLabel)+4+len(keyID)+8)
	b = binary.BigEndian.AppendUint32(b, uint32(len(materialLabel)))
	b = append(b, materialLabel...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(keyID)))
	b = append(b, keyID...)
	b = binary.BigEndian.AppendUint32(b, version)
	return binary.BigEndian.AppendUint32(b, uint32(spec))
}

// WrapNewMaterial generates material for (keyID, version) of spec and seals
// it under kekVersion. It returns the sealed blob and, for asymmetric specs,
// the PKIX DER public key (nil for symmetric specs). Plaintext material is
// zeroed and never returned.
//
// Entropy (docs/KEY-SPECS.md): symmetric material, Ed25519 seeds and ECDSA
// scalars come from mixRandom: bytes from the HSM's generator and as many
// from Config.Rand, combined with HKDF-SHA-256, so they are unpredictable if
// either source is. RSA keys come from crypto/rsa.GenerateKey, which since
// Go 1.26 always draws from the process CSPRNG (crypto/rand) and ignores any
// reader it is given: the HSM's randomness cannot be mixed into RSA prime
// generation without reimplementing it, which we do not.
func (e *Engine) WrapNewMaterial(ctx context.Context, keyID string, version uint32, spec fsmpb.KeySpec, kekVersion uint32) (*fsmpb.WrappedBlob, []byte, error) {
	if err := checkMaterialTarget(keyID, version, spec); err != nil {
		return nil, nil, err
	}
	s := specs[spec]
	if s.symmetric() {
		material, err := e.mixRandom(ctx, s.genLen, entropyInfo)
		if err != nil {
			return nil, nil, err
		}
		defer clear(material)
		blob, err := e.seal(ctx, keyID, version, spec, kekVersion, material)
		return blob, nil, err
	}
	priv, err := e.generatePrivateKey(ctx, s)
	if err != nil {
		return nil, nil, err
	}
	defer zeroSigner(priv)
	return e.sealPrivateKey(ctx, keyID, version, spec, kekVersion, priv)
}

// SealImportedMaterial validates caller-supplied (BYOK) material for spec,
// seals it like generated material and returns the blob and, for
// asymmetric specs, the PKIX DER public key. Accepted: AES_256 32 bytes;
// HMAC_SHA256 32..64 bytes; HMAC_SHA512 64..128 bytes; RSA_* a PKCS#8
// two-prime RSA key of exactly that size; EC_* PKCS#8 ECDSA on that curve;
// ED25519 PKCS#8 Ed25519. Asymmetric keys are re-encoded as canonical
// PKCS#8 before sealing (attributes dropped), so sealed material always has
// the form generated material has. material is zeroed before returning,
// whatever the outcome.
func (e *Engine) SealImportedMaterial(ctx context.Context, keyID string, version uint32, spec fsmpb.KeySpec, kekVersion uint32, material []byte) (*fsmpb.WrappedBlob, []byte, error) {
	defer clear(material)
	if err := checkMaterialTarget(keyID, version, spec); err != nil {
		return nil, nil, err
	}
	raw, signer, err := parseSecret(spec, material)
	if err != nil {
		return nil, nil, err
	}
	if raw != nil {
		blob, err := e.seal(ctx, keyID, version, spec, kekVersion, raw)
		return blob, nil, err
	}
	defer zeroSigner(signer)
	return e.sealPrivateKey(ctx, keyID, version, spec, kekVersion, signer)
}

func checkMaterialTarget(keyID string, version uint32, spec fsmpb.KeySpec) error {
	if !validKeyIDBytes(keyID) {
		return newErr(ErrInvalidArgument, "key id must be 1..%d characters of [A-Za-z0-9._-]", maxKeyIDLen)
	}
	if version == 0 {
		return newErr(ErrInvalidArgument, "key versions start at 1")
	}
	if specs[spec] == nil {
		return newErr(ErrUnsupported, "key spec %s is not supported", specName(spec))
	}
	return nil
}

// seal seals material with MaterialAAD(keyID, version, spec).
func (e *Engine) seal(ctx context.Context, keyID string, version uint32, spec fsmpb.KeySpec, kekVersion uint32, material []byte) (*fsmpb.WrappedBlob, error) {
	sealed, err := e.sealer.Seal(ctx, kekVersion, material, MaterialAAD(keyID, version, spec))
	if err != nil {
		return nil, wrapErr(ErrUnwrap, err, "hsm could not wrap material for key %s version %d under KEK version %d", keyID, version, kekVersion)
	}
	return &fsmpb.WrappedBlob{KekVersion: kekVersion, Blob: sealed}, nil
}

// sealPrivateKey seals priv as PKCS#8 DER and returns the blob and the PKIX
// DER public key.
func (e *Engine) sealPrivateKey(ctx context.Context, keyID string, version uint32, spec fsmpb.KeySpec, kekVersion uint32, priv crypto.Signer) (*fsmpb.WrappedBlob, []byte, error) {
	pub, err := x509.MarshalPKIXPublicKey(priv.Public())
	if err != nil {
		return nil, nil, wrapErr(ErrInvalidArgument, err, "could not encode the public key of %s material", specName(spec))
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, nil, wrapErr(ErrInvalidArgument, err, "could not encode %s material as PKCS#8", specName(spec))
	}
	defer clear(der)
	blob, err := e.seal(ctx, keyID, version, spec, kekVersion, der)
	if err != nil {
		return nil, nil, err
	}
	return blob, pub, nil
}

// mixRandom returns n bytes = HKDF-SHA-256(ikm = hsm(n) || local(n),
// salt = none, info). Unpredictable if either source is; unlike XOR it does
// not collapse to zeros when both sources return the same bytes.
//
// The HKDF runs on a pooled messageKDF (hkdf.go): the secret is assembled in
// its buffer and the HMACs are one-shot sha256.Sum256 calls, so no hmac/hash
// states or secret copies are allocated (crypto/hkdf cost ~6 µs per key under
// load). TestMixRandomMatchesHKDF checks it against crypto/hkdf; input the
// buffer cannot hold goes to crypto/hkdf.
func (e *Engine) mixRandom(ctx context.Context, n int, info string) ([]byte, error) {
	hsmRandom, err := e.entropy.take(ctx, e.sealer, n)
	if err != nil {
		return nil, wrapErr(ErrUnwrap, err, "hsm could not generate random bytes")
	}
	defer clear(hsmRandom)
	if len(hsmRandom) != n {
		return nil, newErr(ErrUnwrap, "hsm returned %d random bytes, want %d", len(hsmRandom), n)
	}
	if !mixFits(n, info) {
		return e.mixRandomSlow(hsmRandom, n, info)
	}
	k := kdfPool.Get().(*messageKDF)
	defer func() {
		k.wipe()
		kdfPool.Put(k)
	}()
	msg := k.buf[sha256.BlockSize:]
	copy(msg, hsmRandom)
	if _, err := io.ReadFull(e.rand, msg[n:2*n]); err != nil {
		return nil, wrapErr(ErrUnwrap, err, "could not read local random bytes")
	}
	return k.mixExpand(2*n, info, n), nil
}

// mixFits reports whether mixRandom's HKDF fits a messageKDF: the 2n-byte
// secret and each expand message (T(i-1) || info || i) in buf, n in okm.
func mixFits(n int, info string) bool {
	return n > 0 && n <= 2*sha256.Size && 2*n <= maxKDFMessage && sha256.Size+len(info)+1 <= maxKDFMessage
}

// mixExpand returns a new slice of n = HKDF-SHA-256(ikm = buf[64:64+ikmLen],
// salt = none, info) bytes (RFC 5869: PRK = HMAC(zeros, ikm); T(i) =
// HMAC(PRK, T(i-1) || info || i)). The caller wipes k.
func (k *messageKDF) mixExpand(ikmLen int, info string, n int) []byte {
	msg := k.buf[sha256.BlockSize:]
	// An empty HMAC key is the all-zero salt of HashLen bytes: both pad to
	// the same block.
	k.hmac(nil, ikmLen, &k.prk)
	m := copy(msg, info)
	msg[m] = 1
	k.hmac(k.prk[:], m+1, (*[sha256.Size]byte)(k.okm[:sha256.Size]))
	if n > sha256.Size {
		m = copy(msg, k.okm[:sha256.Size])
		m += copy(msg[m:], info)
		msg[m] = 2
		k.hmac(k.prk[:], m+1, (*[sha256.Size]byte)(k.okm[sha256.Size:]))
	}
	out := make([]byte, n)
	copy(out, k.okm[:n])
	return out
}

// mixRandomSlow is mixRandom through crypto/hkdf, for sizes mixFits rejects.
func (e *Engine) mixRandomSlow(hsmRandom []byte, n int, info string) ([]byte, error) {
	secret := make([]byte, 2*n)
	defer clear(secret)
	copy(secret, hsmRandom)
	if _, err := io.ReadFull(e.rand, secret[n:]); err != nil {
		return nil, wrapErr(ErrUnwrap, err, "could not read local random bytes")
	}
	out, err := hkdf.Key(sha256.New, secret, nil, info, n)
	if err != nil {
		return nil, wrapErr(ErrUnwrap, err, "could not derive key material")
	}
	return out, nil
}

// maxScalarTries bounds ECDSA rejection sampling; a P-256 candidate is
// rejected with probability ~2^-32, a P-384 one ~2^-190.
const maxScalarTries = 16

// generatePrivateKey makes a new asymmetric key of s.
func (e *Engine) generatePrivateKey(ctx context.Context, s *specInfo) (crypto.Signer, error) {
	switch {
	case s.rsaBits > 0:
		k, err := rsa.GenerateKey(rand.Reader, s.rsaBits)
		if err != nil {
			return nil, wrapErr(ErrUnwrap, err, "could not generate an RSA-%d key", s.rsaBits)
		}
		return k, nil
	case s.curve != nil:
		// Rejection sampling (FIPS 186-5 A.2.2): candidates d from
		// mixRandom until 1 <= d < n.
		size := (s.curve.Params().BitSize + 7) / 8
		for i := range maxScalarTries {
			d, err := e.mixRandom(ctx, size, entropyInfo+"/ecdsa-scalar/"+string(rune('a'+i)))
			if err != nil {
				return nil, err
			}
			k, err := ecdsa.ParseRawPrivateKey(s.curve, d)
			clear(d)
			if err == nil {
				return k, nil
			}
		}
		return nil, newErr(ErrUnwrap, "could not generate an ECDSA scalar in %d tries; is the random source broken?", maxScalarTries)
	default:
		seed, err := e.mixRandom(ctx, ed25519.SeedSize, entropyInfo+"/ed25519-seed")
		if err != nil {
			return nil, err
		}
		defer clear(seed)
		return ed25519.NewKeyFromSeed(seed), nil
	}
}
