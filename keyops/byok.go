package keyops

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// BYOK (docs/KEY-SPECS.md, "Importing key material"). An import token
// carries a fresh RSA-3072 wrapping key pair; its private key is sealed
// under the KEK with ImportKeyAAD(tokenID). The caller wraps material as
// AWS KMS's RSA_AES_KEY_WRAP_SHA_256:
//
//	wrapped = RSA-OAEP-SHA256(MGF1-SHA256, no label; public key, K)   (384 bytes)
//	       || KWP(K, material)                                        (RFC 5649)
//
// with K a fresh random 32-byte AES key.

// ImportWrappingKeyBits is the size of import wrapping keys.
const ImportWrappingKeyBits = 3072

// importKeyLabel starts the associated data of a sealed import private key.
const importKeyLabel = "cabinet/import-key/v1"

// maxWrappedImportLen bounds UnwrapImportedMaterial's input: an RSA-4096
// PKCS#8 key is ~2.4 KiB.
const maxWrappedImportLen = 16 << 10

// ImportKeyAAD is the associated data an import token's private key is
// sealed with: uint32 len(label) || label || uint32 len(tokenID) || tokenID
// (label "cabinet/import-key/v1", big-endian), so a sealed private key only
// opens for its own token and never as key material.
func ImportKeyAAD(tokenID string) []byte {
	b := make([]byte, 0, 8+len(importKeyLabel)+len(tokenID))
	b = binary.BigEndian.AppendUint32(b, uint32(len(importKeyLabel)))
	b = append(b, importKeyLabel...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(tokenID)))
	return append(b, tokenID...)
}

// NewImportKeyPair makes the RSA-3072 wrapping key pair of an import token
// (crypto/rand; see WrapNewMaterial on RSA generation) and returns its PKIX
// DER public key and its PKCS#8 private key sealed under kekVersion.
// tokenID must be 1..255 characters of [A-Za-z0-9._-].
func (e *Engine) NewImportKeyPair(ctx context.Context, tokenID string, kekVersion uint32) (publicKeyDER []byte, sealedPrivateKey *fsmpb.WrappedBlob, err error) {
	if !validKeyIDBytes(tokenID) {
		return nil, nil, newErr(ErrInvalidArgument, "import token id must be 1..%d characters of [A-Za-z0-9._-]", maxKeyIDLen)
	}
	k, err := rsa.GenerateKey(rand.Reader, ImportWrappingKeyBits)
	if err != nil {
		return nil, nil, wrapErr(ErrUnwrap, err, "could not generate an import wrapping key")
	}
	defer zeroSigner(k)
	pub, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		return nil, nil, wrapErr(ErrUnwrap, err, "could not encode the import wrapping public key")
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, nil, wrapErr(ErrUnwrap, err, "could not encode the import wrapping private key")
	}
	defer clear(der)
	sealed, err := e.sealer.Seal(ctx, kekVersion, der, ImportKeyAAD(tokenID))
	if err != nil {
		return nil, nil, wrapErr(ErrUnwrap, err, "hsm could not wrap the private key of import token %s under KEK version %d", tokenID, kekVersion)
	}
	return pub, &fsmpb.WrappedBlob{KekVersion: kekVersion, Blob: sealed}, nil
}

// errImportUnwrapFailed is the one error for every cryptographic failure of
// an import (RSA-OAEP or key unwrap), so a caller learns nothing about
// which step failed.
var errImportUnwrapFailed = newErr(ErrInvalidArgument,
	"wrapped key material could not be unwrapped: wrap it as RSA_AES_KEY_WRAP_SHA_256 with this import token's public key")

// splitImportWrapped splits RSA_AES_KEY_WRAP_SHA_256 input into the
// RSA-OAEP part (rsaLen bytes) and the KWP part (>= 16 bytes, a multiple
// of 8). It checks only lengths.
func splitImportWrapped(wrapped []byte, rsaLen int) (wrappedKey, wrappedMaterial []byte, err error) {
	if len(wrapped) > maxWrappedImportLen {
		return nil, nil, newErr(ErrInvalidArgument, "wrapped key material is %d bytes; at most %d are accepted", len(wrapped), maxWrappedImportLen)
	}
	rest := len(wrapped) - rsaLen
	if rest < 16 || rest%8 != 0 {
		return nil, nil, newErr(ErrInvalidArgument,
			"wrapped key material must be the %d-byte RSA-OAEP-wrapped AES key followed by the AES-KWP-wrapped material (a multiple of 8 bytes, at least 16); got %d bytes in all",
			rsaLen, len(wrapped))
	}
	return wrapped[:rsaLen], wrapped[rsaLen:], nil
}

// UnwrapImportedMaterial opens an import token's sealed private key through
// the HSM and unwraps caller material wrapped as RSA_AES_KEY_WRAP_SHA_256.
// It returns the plaintext material for SealImportedMaterial (which
// validates it for the spec and zeroes it); the AES key and the private key
// are zeroed here.
func (e *Engine) UnwrapImportedMaterial(ctx context.Context, tokenID string, sealedPrivateKey *fsmpb.WrappedBlob, wrapped []byte) ([]byte, error) {
	if !validKeyIDBytes(tokenID) {
		return nil, newErr(ErrInvalidArgument, "import token id must be 1..%d characters of [A-Za-z0-9._-]", maxKeyIDLen)
	}
	if len(sealedPrivateKey.GetBlob()) == 0 {
		return nil, newErr(ErrInvalidArgument, "import token %s has no wrapping key (was it used already or has it expired?)", tokenID)
	}
	wrappedKey, wrappedMaterial, err := splitImportWrapped(wrapped, ImportWrappingKeyBits/8)
	if err != nil {
		return nil, err
	}
	kek := sealedPrivateKey.GetKekVersion()
	der, err := e.sealer.Open(ctx, kek, sealedPrivateKey.GetBlob(), ImportKeyAAD(tokenID))
	if err != nil {
		return nil, wrapErr(ErrUnwrap, err, "hsm could not unwrap the private key of import token %s (KEK version %d)", tokenID, kek)
	}
	parsed, err := x509.ParsePKCS8PrivateKey(der)
	clear(der)
	priv, ok := parsed.(*rsa.PrivateKey)
	if err != nil || !ok || priv.N.BitLen() != ImportWrappingKeyBits {
		zeroSigner(asSigner(parsed))
		return nil, newErr(ErrUnwrap, "the private key of import token %s is not an RSA-%d key", tokenID, ImportWrappingKeyBits)
	}
	defer zeroSigner(priv)
	aesKey, err := rsa.DecryptOAEP(sha256.New(), nil, priv, wrappedKey, nil)
	if err != nil || len(aesKey) != 32 {
		clear(aesKey)
		return nil, errImportUnwrapFailed
	}
	defer clear(aesKey)
	material, err := KeyUnwrapPad(aesKey, wrappedMaterial)
	if err != nil {
		return nil, errImportUnwrapFailed
	}
	return material, nil
}

// WrapForImport wraps material for an import token's public key (PKIX DER,
// RSA) as RSA_AES_KEY_WRAP_SHA_256: a fresh random 32-byte AES key
// encrypted with RSA-OAEP-SHA256 (MGF1-SHA256, no label), followed by
// KeyWrapPad(aesKey, material). This is the client side (CLI, tests); the
// same bytes can be made with openssl (docs/KEY-SPECS.md).
func WrapForImport(publicKeyDER, material []byte) ([]byte, error) {
	pub, err := x509.ParsePKIXPublicKey(publicKeyDER)
	if err != nil {
		return nil, newErr(ErrInvalidArgument, "the import public key is not a PKIX DER public key")
	}
	rk, ok := pub.(*rsa.PublicKey)
	if !ok || rk.N.BitLen() < 2048 {
		return nil, newErr(ErrInvalidArgument, "the import public key must be an RSA key of at least 2048 bits")
	}
	if len(material) == 0 {
		return nil, newErr(ErrInvalidArgument, "no key material to wrap")
	}
	aesKey := make([]byte, 32)
	defer clear(aesKey)
	if _, err := rand.Read(aesKey); err != nil {
		return nil, wrapErr(ErrUnwrap, err, "could not read random bytes")
	}
	wk, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, rk, aesKey, nil)
	if err != nil {
		return nil, wrapErr(ErrInvalidArgument, err, "could not wrap the AES key")
	}
	wm, err := KeyWrapPad(aesKey, material)
	if err != nil {
		return nil, err
	}
	return append(wk, wm...), nil
}
