package keyops

import (
	"context"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base32"
	"encoding/binary"
	"io"
	"strings"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// materialLabel starts the associated data of every wrapped material blob.
const materialLabel = "cabinet/key-material/v1"

// entropyInfo is the HKDF info used to combine the two entropy sources.
const entropyInfo = "cabinet/key-material-gen/v1"

var keyIDEncoding = base32.StdEncoding.WithPadding(base32.NoPadding)

// NewKeyID returns "k-" + 26 lowercase base32 characters (128 random bits),
// matching ^k-[a-z0-9]{26}$.
func NewKeyID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	return "k-" + strings.ToLower(keyIDEncoding.EncodeToString(b[:])), nil
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

// materialLen is the length of a version's material for spec, or 0 when the
// spec is not supported yet.
func materialLen(spec fsmpb.KeySpec) int {
	switch spec {
	case fsmpb.KeySpec_KEY_SPEC_AES_256:
		return 32
	default:
		return 0
	}
}

// WrapNewMaterial generates material for (keyID, version) of spec and seals
// it under kekVersion; the plaintext material is zeroed and never returned.
//
// Entropy: n bytes from the HSM's generator and n bytes from Config.Rand are
// combined with HKDF-SHA-256 (secret = hsm || local, info =
// "cabinet/key-material-gen/v1"). The result is unpredictable if either
// source is, and, unlike XOR, it does not collapse to zeros if both sources
// return the same bytes.
func (e *Engine) WrapNewMaterial(ctx context.Context, keyID string, version uint32, spec fsmpb.KeySpec, kekVersion uint32) (*fsmpb.WrappedBlob, error) {
	if !validKeyIDBytes(keyID) {
		return nil, newErr(ErrInvalidArgument, "key id must be 1..%d characters of [A-Za-z0-9._-]", maxKeyIDLen)
	}
	if version == 0 {
		return nil, newErr(ErrInvalidArgument, "key versions start at 1")
	}
	n := materialLen(spec)
	if n == 0 {
		return nil, newErr(ErrUnsupported, "key spec %s is not supported yet", specName(spec))
	}
	hsmRandom, err := e.sealer.GenerateRandom(ctx, n)
	if err != nil {
		return nil, wrapErr(ErrUnwrap, err, "hsm could not generate random bytes")
	}
	defer clear(hsmRandom)
	if len(hsmRandom) != n {
		return nil, newErr(ErrUnwrap, "hsm returned %d random bytes, want %d", len(hsmRandom), n)
	}
	secret := make([]byte, 2*n)
	defer clear(secret)
	copy(secret, hsmRandom)
	if _, err := io.ReadFull(e.rand, secret[n:]); err != nil {
		return nil, wrapErr(ErrUnwrap, err, "could not read local random bytes")
	}
	material, err := hkdf.Key(sha256.New, secret, nil, entropyInfo, n)
	if err != nil {
		return nil, wrapErr(ErrUnwrap, err, "could not derive key material")
	}
	defer clear(material)
	sealed, err := e.sealer.Seal(ctx, kekVersion, material, MaterialAAD(keyID, version, spec))
	if err != nil {
		return nil, wrapErr(ErrUnwrap, err, "hsm could not wrap material for key %s version %d under KEK version %d", keyID, version, kekVersion)
	}
	return &fsmpb.WrappedBlob{KekVersion: kekVersion, Blob: sealed}, nil
}
