// Package hsm is a node's hardware security module: the node identity key pair, the cluster
// key-encryption keys (KEKs), wrap/unwrap for KEK transfer between nodes, and AES-256-GCM
// sealing under a KEK. Two providers implement the same interface: PKCS11 (a real token over
// PKCS#11, SoftHSM2 in development and tests) and Memory (pure Go, for unit tests of other
// packages and `cabinet server -dev`). No PKCS#11 type appears in the exported API.
//
// See DESIGN.md in this folder for the invariants and the SoftHSM facts the code relies on.
package hsm

import (
	"context"
	"crypto/rsa"
	"errors"
	"fmt"
)

var (
	// ErrKEKNotFound: the requested KEK version is not in this HSM.
	ErrKEKNotFound = errors.New("hsm: kek version not found")
	// ErrKEKMismatch: a KEK version is present (or was just unwrapped) with a different check value.
	ErrKEKMismatch = errors.New("hsm: kek check value mismatch")
	// ErrKEKExists: GenerateKEK was asked for a version that already exists.
	ErrKEKExists = errors.New("hsm: kek version already exists")
	// ErrUnavailable: the token or library cannot be reached (outage); callers map it to gRPC Unavailable.
	ErrUnavailable = errors.New("hsm: unavailable")
	// ErrAuthFailed: Open's tag check failed (wrong KEK, wrong AAD, tampered or truncated blob).
	ErrAuthFailed = errors.New("hsm: message authentication failed")
)

// Provider is a node's HSM. Safe for concurrent use.
type Provider interface {
	// EnsureIdentity returns the node's identity RSA-3072 public key, generating the key pair inside
	// the HSM on first use (private key: token object, sensitive, non-extractable, can unwrap/decrypt).
	EnsureIdentity(ctx context.Context) (*rsa.PublicKey, error)
	// GenerateKEK generates AES-256 KEK `version` inside the HSM as a persistent token object
	// (sensitive; extractable only by wrapping so it can be sent to joiners) and returns its check
	// value. Fails with ErrKEKExists if that version already exists.
	GenerateKEK(ctx context.Context, version uint32) (checkValue []byte, err error)
	// KEKCheckValue returns the check value of a KEK version held here, ErrKEKNotFound if absent.
	KEKCheckValue(ctx context.Context, version uint32) ([]byte, error)
	// WrapKEK wraps KEK `version` under a recipient's RSA public key (RSA-OAEP with the configured hash).
	WrapKEK(ctx context.Context, version uint32, recipient *rsa.PublicKey) ([]byte, error)
	// UnwrapKEK unwraps a KEK wrapped for this node's identity key, stores it persistently as
	// `version` and returns its check value. If `version` is already present with the same check
	// value it is a no-op; with a different one, ErrKEKMismatch (and nothing is stored).
	UnwrapKEK(ctx context.Context, version uint32, wrapped []byte) (checkValue []byte, err error)
	// DestroyKEK removes KEK `version` from this HSM for good: the token object and any
	// session copy. Idempotent: nil if the version is not present. After it returns,
	// Seal/Open/KEKCheckValue/WrapKEK for that version fail with ErrKEKNotFound, and a later
	// UnwrapKEK or GenerateKEK of the same version works again (as for a fresh version).
	DestroyKEK(ctx context.Context, version uint32) error
	// Seal encrypts under KEK `kekVersion` with AES-256-GCM: random 12-byte IV, 128-bit tag,
	// output IV || ciphertext || tag.
	Seal(ctx context.Context, kekVersion uint32, plaintext, aad []byte) ([]byte, error)
	// Open reverses Seal; ErrAuthFailed on a bad tag or a blob too short to hold IV and tag.
	Open(ctx context.Context, kekVersion uint32, sealed, aad []byte) ([]byte, error)
	// GenerateRandom returns n random bytes from the HSM.
	GenerateRandom(ctx context.Context, n int) ([]byte, error)
	// Health proves the token is reachable and logged in with a cheap operation; ErrUnavailable
	// (wrapped) otherwise.
	Health(ctx context.Context) error
	Close() error
}

var (
	_ Provider = (*PKCS11)(nil)
	_ Provider = (*Memory)(nil)
)

const (
	// IdentityLabel is CKA_LABEL (and CKA_ID) of the identity key pair.
	IdentityLabel = "cabinet-identity"
	// IdentityBits is the identity key size.
	IdentityBits = 3072
	// KEKSize is the KEK length in bytes (AES-256).
	KEKSize = 32
	// CheckValueSize is the length of a KEK check value: a full AES-CMAC tag.
	CheckValueSize = 16

	gcmIVSize  = 12
	gcmTagSize = 16
	// minRecipientBits is the smallest RSA key WrapKEK wraps for.
	minRecipientBits = 2048
	// maxRandom bounds one GenerateRandom call.
	maxRandom = 1 << 20
)

// checkValueBlock is the fixed block whose AES-CMAC under a KEK is that KEK's check value.
var checkValueBlock = [16]byte{'c', 'a', 'b', 'i', 'n', 'e', 't', '-', 'k', 'c', 'v', '-', 'v', '1', 0, 0}

// KEKLabel is CKA_LABEL (and CKA_ID) of KEK version v.
func KEKLabel(v uint32) string { return fmt.Sprintf("cabinet-kek-v%d", v) }

func checkRecipient(pub *rsa.PublicKey) error {
	if pub == nil || pub.N == nil || pub.E == 0 {
		return errors.New("hsm: wrap kek: no recipient key")
	}
	if pub.N.BitLen() < minRecipientBits {
		return fmt.Errorf("hsm: wrap kek: recipient key is %d bits, want at least %d", pub.N.BitLen(), minRecipientBits)
	}
	return nil
}

func checkRandomLen(n int) error {
	if n < 0 || n > maxRandom {
		return fmt.Errorf("hsm: generate random: length %d out of range [0, %d]", n, maxRandom)
	}
	return nil
}
