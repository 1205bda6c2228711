package keyops

import (
	"crypto/aes"
	"crypto/subtle"
	"encoding/binary"
	"math"
)

// kwpAIV is the alternative initial value of RFC 5649 (its high 32 bits;
// the low 32 bits are the message length indicator).
const kwpAIV = 0xA65959A6

// KeyWrapPad wraps plaintext (1..2^32-1 bytes) under kek (16, 24 or 32
// bytes: AES-128/192/256) with AES Key Wrap with Padding (RFC 5649, "KWP",
// NIST SP 800-38F KWP-AE). Output is 8 bytes longer than plaintext rounded
// up to a multiple of 8 (at least 16). Same as `openssl enc
// -id-aes256-wrap-pad -iv A65959A6`.
func KeyWrapPad(kek, plaintext []byte) ([]byte, error) {
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, newErr(ErrInvalidArgument, "key wrap: the wrapping key must be 16, 24 or 32 bytes; got %d", len(kek))
	}
	if len(plaintext) == 0 || uint64(len(plaintext)) > math.MaxUint32 {
		return nil, newErr(ErrInvalidArgument, "key wrap: plaintext must be 1..%d bytes; got %d", uint64(math.MaxUint32), len(plaintext))
	}
	padded := (len(plaintext) + 7) &^ 7
	n := padded / 8
	out := make([]byte, 8+padded)
	binary.BigEndian.PutUint32(out[0:], kwpAIV)
	binary.BigEndian.PutUint32(out[4:], uint32(len(plaintext)))
	copy(out[8:], plaintext) // zero padding is already there
	if n == 1 {
		// One block: a single AES encryption of AIV || P (RFC 5649 4.1).
		block.Encrypt(out, out)
		return out, nil
	}
	// RFC 3394 W with the AIV: A = out[0:8], R[i] = out[8i : 8i+8].
	var b [16]byte
	for j := range 6 {
		for i := 1; i <= n; i++ {
			copy(b[:8], out[:8])
			copy(b[8:], out[8*i:8*i+8])
			block.Encrypt(b[:], b[:])
			t := uint64(n*j + i)
			binary.BigEndian.PutUint64(out[:8], binary.BigEndian.Uint64(b[:8])^t)
			copy(out[8*i:], b[8:])
		}
	}
	clear(b[:])
	return out, nil
}

// KeyUnwrapPad reverses KeyWrapPad (RFC 5649). Every integrity failure
// (wrong key, altered bytes, bad padding or length indicator) returns the
// same ErrInvalidCiphertext; a malformed length or key is
// ErrInvalidArgument.
func KeyUnwrapPad(kek, wrapped []byte) ([]byte, error) {
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, newErr(ErrInvalidArgument, "key unwrap: the wrapping key must be 16, 24 or 32 bytes; got %d", len(kek))
	}
	if len(wrapped) < 16 || len(wrapped)%8 != 0 {
		return nil, newErr(ErrInvalidArgument, "key unwrap: wrapped input must be a multiple of 8 bytes and at least 16; got %d", len(wrapped))
	}
	n := len(wrapped)/8 - 1
	buf := make([]byte, len(wrapped))
	copy(buf, wrapped)
	if n == 1 {
		block.Decrypt(buf, buf)
	} else {
		// RFC 3394 W^-1.
		var b [16]byte
		for j := 5; j >= 0; j-- {
			for i := n; i >= 1; i-- {
				t := uint64(n*j + i)
				binary.BigEndian.PutUint64(b[:8], binary.BigEndian.Uint64(buf[:8])^t)
				copy(b[8:], buf[8*i:8*i+8])
				block.Decrypt(b[:], b[:])
				copy(buf[:8], b[:8])
				copy(buf[8*i:], b[8:])
			}
		}
		clear(b[:])
	}
	// Check AIV, the length indicator and the zero padding, without
	// branching on which one failed.
	mli := int(binary.BigEndian.Uint32(buf[4:8]))
	var aiv [4]byte
	binary.BigEndian.PutUint32(aiv[:], kwpAIV)
	good := subtle.ConstantTimeCompare(buf[0:4], aiv[:])
	lenOK := 0
	if mli > 8*(n-1) && mli <= 8*n {
		lenOK = 1
	}
	good &= lenOK
	var pad byte
	if lenOK == 1 {
		for _, c := range buf[8+mli:] {
			pad |= c
		}
	}
	good &= subtle.ConstantTimeByteEq(pad, 0)
	if good != 1 {
		clear(buf)
		return nil, errKeyUnwrapFailed
	}
	out := make([]byte, mli)
	copy(out, buf[8:8+mli])
	clear(buf)
	return out, nil
}

var errKeyUnwrapFailed = newErr(ErrInvalidCiphertext, "key unwrap failed: the wrapped key was altered or wrapped under another key")
