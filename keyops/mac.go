package keyops

import (
	"context"
	"crypto/hmac"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// GenerateMac returns HMAC(msg) with the spec's hash (HMAC_SHA256: 32
// bytes, HMAC_SHA512: 64 bytes) under key's primary version, after the
// state rules for OpGenerateMac. msg is at most MaxMessageLen bytes.
func (e *Engine) GenerateMac(ctx context.Context, key *fsmpb.KeyRecord, msg []byte) (mac []byte, version uint32, err error) {
	version = key.GetPrimaryVersion()
	if err := CheckOperation(key, version, OpGenerateMac, false); err != nil {
		return nil, 0, err
	}
	mac, err = e.mac(ctx, key, version, msg)
	if err != nil {
		return nil, 0, err
	}
	return mac, version, nil
}

// VerifyMac recomputes the MAC of msg under key's version (0 = primary)
// and compares it with mac in constant time (hmac.Equal). A wrong MAC is
// (false, nil). allowCompromised lets a COMPROMISED key verify.
func (e *Engine) VerifyMac(ctx context.Context, key *fsmpb.KeyRecord, version uint32, msg, mac []byte, allowCompromised bool) (bool, error) {
	version = resolveVersion(key, version)
	if err := CheckOperation(key, version, OpVerifyMac, allowCompromised); err != nil {
		return false, err
	}
	want, err := e.mac(ctx, key, version, msg)
	if err != nil {
		return false, err
	}
	return hmac.Equal(want, mac), nil
}

func (e *Engine) mac(ctx context.Context, key *fsmpb.KeyRecord, version uint32, msg []byte) ([]byte, error) {
	if len(msg) > MaxMessageLen {
		return nil, newErr(ErrInvalidArgument, "message is %d bytes; MAC messages are at most %d", len(msg), MaxMessageLen)
	}
	s := specs[key.GetSpec()]
	entry, err := e.material(ctx, key, version)
	if err != nil {
		return nil, err
	}
	defer entry.release()
	h := hmac.New(s.mac, entry.material)
	h.Write(msg)
	return h.Sum(nil), nil
}
