package hsm

import (
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
)

// KillSessions closes every session of p's token behind p's back (C_CloseAllSessions), as a
// token reset or another component's misbehaviour would: sessions, login and session objects
// are gone. Call it only while p is idle.
func KillSessions(p *PKCS11) error {
	p.mod.mu.RLock()
	defer p.mod.mu.RUnlock()
	if p.live == nil {
		return errors.New("provider has no live state")
	}
	return p.mod.ctx.CloseAllSessions(p.live.slot)
}

// AESCMAC exposes the Go AES-CMAC for tests.
var AESCMAC = aesCMAC

// CheckValueBlock exposes the fixed check-value block for tests.
var CheckValueBlock = checkValueBlock

// ReadKEKValue tries to read KEK `version`'s CKA_VALUE through p's own
// logged-in session, from the token object and from the session copy used
// for Seal/Open. Both must fail for a sensitive key.
func ReadKEKValue(p *PKCS11, version uint32) (tokenErr, copyErr error) {
	p.mod.mu.RLock()
	defer p.mod.mu.RUnlock()
	st := p.live
	if st == nil {
		return errors.New("no live state"), errors.New("no live state")
	}
	st.anchorMu.Lock()
	defer st.anchorMu.Unlock()
	c := p.mod.ctx
	value := []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)}
	h, ok, err := findOne(c, st.anchor, KEKLabel(version), kekFindTemplate(version))
	if err != nil || !ok {
		return fmt.Errorf("find kek: ok=%v err=%v", ok, err), nil
	}
	if _, err := c.GetAttributeValue(st.anchor, h, value); err != nil {
		tokenErr = err
	}
	st.objMu.Lock()
	k := st.keks[version]
	st.objMu.Unlock()
	if k == nil {
		return tokenErr, errors.New("no session copy yet")
	}
	if _, err := c.GetAttributeValue(st.anchor, k.working, value); err != nil {
		copyErr = err
	}
	return tokenErr, copyErr
}
