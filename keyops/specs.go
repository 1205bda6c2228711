package keyops

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"hash"
	"math/big"
	"slices"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// specInfo is everything keyops knows about one key spec
// (docs/KEY-SPECS.md is the reference).
type specInfo struct {
	// usages the spec may be created with.
	usages []fsmpb.KeyUsage
	// Symmetric specs: material is genLen random bytes; imported
	// material may be minLen..maxLen bytes. mac is the HMAC hash.
	genLen, minLen, maxLen int
	mac                    func() hash.Hash
	macSize                int
	// Asymmetric specs: material is the PKCS#8 DER private key.
	rsaBits int
	curve   elliptic.Curve
	ed25519 bool
	// sigAlgs are the signing algorithms the spec signs with.
	sigAlgs []SigningAlgorithm
}

var (
	encryptOnly = []fsmpb.KeyUsage{fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT}
	macOnly     = []fsmpb.KeyUsage{fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC}
	signOnly    = []fsmpb.KeyUsage{fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY}
	rsaUsages   = []fsmpb.KeyUsage{fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY}
	rsaSigAlgs  = []SigningAlgorithm{
		RSASSA_PSS_SHA_256, RSASSA_PSS_SHA_384, RSASSA_PSS_SHA_512,
		RSASSA_PKCS1_V1_5_SHA_256, RSASSA_PKCS1_V1_5_SHA_384, RSASSA_PKCS1_V1_5_SHA_512,
	}
)

var specs = map[fsmpb.KeySpec]*specInfo{
	fsmpb.KeySpec_KEY_SPEC_AES_256:     {usages: encryptOnly, genLen: 32, minLen: 32, maxLen: 32},
	fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256: {usages: macOnly, genLen: 32, minLen: 32, maxLen: 64, mac: sha256.New, macSize: sha256.Size},
	fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512: {usages: macOnly, genLen: 64, minLen: 64, maxLen: 128, mac: sha512.New, macSize: sha512.Size},
	fsmpb.KeySpec_KEY_SPEC_RSA_2048:    {usages: rsaUsages, rsaBits: 2048, sigAlgs: rsaSigAlgs},
	fsmpb.KeySpec_KEY_SPEC_RSA_3072:    {usages: rsaUsages, rsaBits: 3072, sigAlgs: rsaSigAlgs},
	fsmpb.KeySpec_KEY_SPEC_RSA_4096:    {usages: rsaUsages, rsaBits: 4096, sigAlgs: rsaSigAlgs},
	fsmpb.KeySpec_KEY_SPEC_EC_P256:     {usages: signOnly, curve: elliptic.P256(), sigAlgs: []SigningAlgorithm{ECDSA_SHA_256}},
	fsmpb.KeySpec_KEY_SPEC_EC_P384:     {usages: signOnly, curve: elliptic.P384(), sigAlgs: []SigningAlgorithm{ECDSA_SHA_384}},
	fsmpb.KeySpec_KEY_SPEC_ED25519:     {usages: signOnly, ed25519: true, sigAlgs: []SigningAlgorithm{ED25519}},
}

func (s *specInfo) symmetric() bool { return s.genLen > 0 }

// SpecAllowsUsage reports whether a key of spec may have usage (CreateKey
// and ImportKey validation): AES_256 ENCRYPT_DECRYPT; HMAC_*
// GENERATE_VERIFY_MAC; RSA_* ENCRYPT_DECRYPT or SIGN_VERIFY; EC_* and
// ED25519 SIGN_VERIFY.
func SpecAllowsUsage(spec fsmpb.KeySpec, usage fsmpb.KeyUsage) bool {
	s := specs[spec]
	return s != nil && slices.Contains(s.usages, usage)
}

// IsAsymmetric reports whether spec is an asymmetric (RSA, EC, Ed25519)
// spec, whose versions carry a public key.
func IsAsymmetric(spec fsmpb.KeySpec) bool {
	s := specs[spec]
	return s != nil && !s.symmetric()
}

// SigningAlgorithms lists the signing algorithms a key of spec signs with
// (nil for specs that do not sign).
func SigningAlgorithms(spec fsmpb.KeySpec) []SigningAlgorithm {
	if s := specs[spec]; s != nil {
		return slices.Clone(s.sigAlgs)
	}
	return nil
}

// parseSecret turns unwrapped (or imported) material of spec into the form
// operations use. Symmetric material is returned as is (raw). Asymmetric
// material is parsed as PKCS#8 and checked against the spec (RSA size,
// curve); the DER is not retained, and the caller still owns and must zero
// material. Errors name what is wrong but never contain material.
func parseSecret(spec fsmpb.KeySpec, material []byte) (raw []byte, signer crypto.Signer, err error) {
	s := specs[spec]
	if s == nil {
		return nil, nil, newErr(ErrUnsupported, "key spec %s is not supported", specName(spec))
	}
	if s.symmetric() {
		if len(material) < s.minLen || len(material) > s.maxLen {
			if s.minLen == s.maxLen {
				return nil, nil, newErr(ErrInvalidArgument, "%s material must be %d bytes; got %d", specName(spec), s.minLen, len(material))
			}
			return nil, nil, newErr(ErrInvalidArgument, "%s material must be %d..%d bytes; got %d", specName(spec), s.minLen, s.maxLen, len(material))
		}
		return material, nil, nil
	}
	priv, perr := x509.ParsePKCS8PrivateKey(material)
	if perr != nil {
		return nil, nil, newErr(ErrInvalidArgument, "%s material must be a PKCS#8 DER private key; it does not parse as one", specName(spec))
	}
	switch {
	case s.rsaBits > 0:
		k, ok := priv.(*rsa.PrivateKey)
		if !ok {
			zeroSigner(asSigner(priv))
			return nil, nil, newErr(ErrInvalidArgument, "%s material must be an RSA private key; it is a %s key", specName(spec), keyTypeName(priv))
		}
		if k.N.BitLen() != s.rsaBits || len(k.Primes) != 2 {
			bits := k.N.BitLen()
			zeroSigner(k)
			return nil, nil, newErr(ErrInvalidArgument, "%s material must be a two-prime RSA key of exactly %d bits; it has %d bits", specName(spec), s.rsaBits, bits)
		}
		return nil, k, nil
	case s.curve != nil:
		k, ok := priv.(*ecdsa.PrivateKey)
		if !ok || k.Curve != s.curve {
			zeroSigner(asSigner(priv))
			return nil, nil, newErr(ErrInvalidArgument, "%s material must be an ECDSA private key on curve %s; it is a %s key", specName(spec), s.curve.Params().Name, keyTypeName(priv))
		}
		return nil, k, nil
	default: // Ed25519
		k, ok := priv.(ed25519.PrivateKey)
		if !ok {
			zeroSigner(asSigner(priv))
			return nil, nil, newErr(ErrInvalidArgument, "ED25519 material must be an Ed25519 private key; it is a %s key", keyTypeName(priv))
		}
		return nil, k, nil
	}
}

func asSigner(k any) crypto.Signer {
	s, _ := k.(crypto.Signer)
	return s
}

func keyTypeName(k any) string {
	switch k := k.(type) {
	case *rsa.PrivateKey:
		return "RSA"
	case *ecdsa.PrivateKey:
		return "ECDSA " + k.Curve.Params().Name
	case ed25519.PrivateKey:
		return "Ed25519"
	default:
		return "different"
	}
}

// checkPublicKey parses a PKIX DER public key and checks it fits spec.
func checkPublicKey(spec fsmpb.KeySpec, der []byte) (crypto.PublicKey, bool) {
	s := specs[spec]
	if s == nil || s.symmetric() || len(der) == 0 {
		return nil, false
	}
	pub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return nil, false
	}
	switch k := pub.(type) {
	case *rsa.PublicKey:
		return k, s.rsaBits > 0 && k.N.BitLen() == s.rsaBits
	case *ecdsa.PublicKey:
		return k, s.curve != nil && k.Curve == s.curve
	case ed25519.PublicKey:
		return k, s.ed25519
	}
	return nil, false
}

// zeroSigner clears what can be cleared of a private key: the words of
// every secret big.Int of an RSA or ECDSA key, all 64 bytes of an Ed25519
// key. Copies the standard library keeps internally (the FIPS module's
// precomputed form, reachable only through the key) cannot be reached and
// go with the key to the garbage collector.
func zeroSigner(s crypto.Signer) {
	switch k := s.(type) {
	case *rsa.PrivateKey:
		if k == nil {
			return
		}
		zeroInts(k.D, k.Precomputed.Dp, k.Precomputed.Dq, k.Precomputed.Qinv)
		zeroInts(k.Primes...)
		for _, c := range k.Precomputed.CRTValues {
			zeroInts(c.Exp, c.Coeff, c.R)
		}
	case *ecdsa.PrivateKey:
		if k != nil {
			zeroInts(k.D)
		}
	case ed25519.PrivateKey:
		clear(k)
	}
}

func zeroInts(xs ...*big.Int) {
	for _, x := range xs {
		if x != nil {
			clear(x.Bits())
		}
	}
}
