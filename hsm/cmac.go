package hsm

import (
	"crypto/aes"
	"crypto/subtle"
)

// aesCMAC computes AES-CMAC (RFC 4493, NIST SP 800-38B) of msg under key. The memory provider
// uses it for check values so they equal what CKM_AES_CMAC computes inside a PKCS#11 token.
func aesCMAC(key, msg []byte) ([]byte, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	const bs = aes.BlockSize
	var l, k1, k2 [bs]byte
	block.Encrypt(l[:], l[:])
	cmacDouble(&k1, &l)
	cmacDouble(&k2, &k1)

	n := (len(msg) + bs - 1) / bs
	complete := n > 0 && len(msg)%bs == 0
	if n == 0 {
		n = 1
	}
	var last [bs]byte
	tail := msg[(n-1)*bs:]
	if complete {
		subtle.XORBytes(last[:], tail, k1[:])
	} else {
		copy(last[:], tail)
		last[len(tail)] = 0x80
		subtle.XORBytes(last[:], last[:], k2[:])
	}
	var x [bs]byte
	for i := 0; i < n-1; i++ {
		subtle.XORBytes(x[:], x[:], msg[i*bs:(i+1)*bs])
		block.Encrypt(x[:], x[:])
	}
	subtle.XORBytes(x[:], x[:], last[:])
	block.Encrypt(x[:], x[:])
	return x[:], nil
}

// cmacDouble sets dst = in·x in GF(2^128) (a left shift, reduced by Rb = 0x87).
func cmacDouble(dst, in *[16]byte) {
	carry := in[0] >> 7
	for i := 0; i < 15; i++ {
		dst[i] = in[i]<<1 | in[i+1]>>7
	}
	dst[15] = in[15]<<1 ^ (0x87 * carry)
}
