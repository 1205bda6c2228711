package keyops

import (
	"errors"
	"fmt"
)

// Sentinel errors. Callers (the gRPC layer) classify an error with errors.Is
// and show err.Error() to the user; the sentinel's own text never appears in
// a message, so every message can say what happened and what to do.
//
// No message ever contains plaintext, key material or ciphertext bytes. Key
// ids that come from an unauthenticated ciphertext header are safe to print:
// ParseCiphertext admits only [A-Za-z0-9._-] in them.
var (
	// ErrInvalidArgument: the request is malformed (InvalidArgument).
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrInvalidCiphertext: the ciphertext is malformed or failed
	// authentication (InvalidArgument).
	ErrInvalidCiphertext = errors.New("invalid ciphertext")
	// ErrKeyNotFound: no such key (NotFound).
	ErrKeyNotFound = errors.New("key not found")
	// ErrVersionNotFound: the key has no such version (NotFound).
	ErrVersionNotFound = errors.New("key version not found")
	// ErrKeyState: the key or version exists but its state forbids the
	// operation now (FailedPrecondition).
	ErrKeyState = errors.New("key state does not allow the operation")
	// ErrUnsupported: the key spec or operation is not implemented
	// (Unimplemented).
	ErrUnsupported = errors.New("unsupported")
	// ErrUnwrap: the HSM could not unwrap (or wrap) material
	// (Unavailable/Internal). The Sealer's error is wrapped too, so
	// errors.Is(err, hsm.ErrUnavailable) keeps working.
	ErrUnwrap = errors.New("hsm could not unwrap key material")
)

// opError carries a user-facing message and the classes it belongs to.
type opError struct {
	msg  string
	kind error
	// cause is an underlying error (e.g. from the Sealer), or nil.
	cause error
}

func (e *opError) Error() string {
	if e.cause != nil {
		return e.msg + ": " + e.cause.Error()
	}
	return e.msg
}

func (e *opError) Unwrap() []error {
	if e.cause != nil {
		return []error{e.kind, e.cause}
	}
	return []error{e.kind}
}

func newErr(kind error, format string, args ...any) error {
	return &opError{msg: fmt.Sprintf(format, args...), kind: kind}
}

func wrapErr(kind, cause error, format string, args ...any) error {
	return &opError{msg: fmt.Sprintf(format, args...), kind: kind, cause: cause}
}

// errAuthFailed is returned for every authentication failure of a
// ciphertext, whatever the reason (wrong key, tampered header or body, wrong
// encryption context): one message, so a failure tells an attacker nothing.
var errAuthFailed = newErr(ErrInvalidCiphertext,
	"ciphertext could not be decrypted: it was altered, or the encryption context does not match the one used to encrypt")
