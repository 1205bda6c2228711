package cluster

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// JoinToken is what an admin hands to the operator of a joining node: the
// token id, its secret, and the fingerprint of the cluster CA the joiner
// pins before it trusts the node it talks to.
//
// Encoded form: "cbj1." + base64url(id) + "." + base64url(secret) + "." + hex(sha256 of CA DER).
type JoinToken struct {
	ID            string
	Secret        []byte
	CAFingerprint string // "sha256:<hex>"
}

const joinTokenPrefix = "cbj1"

// NewJoinToken makes a token with a random 16-byte id and 32-byte secret.
func NewJoinToken(caFingerprint string) (JoinToken, error) {
	id := make([]byte, 12)
	secret := make([]byte, 32)
	if _, err := rand.Read(id); err != nil {
		return JoinToken{}, err
	}
	if _, err := rand.Read(secret); err != nil {
		return JoinToken{}, err
	}
	return JoinToken{ID: "jt-" + hex.EncodeToString(id), Secret: secret, CAFingerprint: caFingerprint}, nil
}

// SecretHash is what the replicated state keeps instead of the secret.
func (t JoinToken) SecretHash() []byte {
	h := sha256.Sum256(t.Secret)
	return h[:]
}

// String encodes the token for the operator.
func (t JoinToken) String() string {
	fp := strings.TrimPrefix(t.CAFingerprint, "sha256:")
	return strings.Join([]string{joinTokenPrefix,
		base64.RawURLEncoding.EncodeToString([]byte(t.ID)),
		base64.RawURLEncoding.EncodeToString(t.Secret),
		fp}, ".")
}

var errBadJoinToken = errors.New("malformed join token: expected the whole string printed by `cabinet operator join-token create` (cbj1.<id>.<secret>.<ca-fingerprint>)")

// ParseJoinToken decodes a token string. It never echoes the secret.
func ParseJoinToken(s string) (JoinToken, error) {
	parts := strings.Split(strings.TrimSpace(s), ".")
	if len(parts) != 4 || parts[0] != joinTokenPrefix {
		return JoinToken{}, errBadJoinToken
	}
	id, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil || len(id) == 0 || len(id) > 64 {
		return JoinToken{}, errBadJoinToken
	}
	secret, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil || len(secret) != 32 {
		return JoinToken{}, errBadJoinToken
	}
	fp, err := hex.DecodeString(parts[3])
	if err != nil || len(fp) != sha256.Size {
		return JoinToken{}, errBadJoinToken
	}
	for _, c := range string(id) {
		if !(c == '-' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z') {
			return JoinToken{}, errBadJoinToken
		}
	}
	return JoinToken{ID: string(id), Secret: secret, CAFingerprint: fmt.Sprintf("sha256:%x", fp)}, nil
}
