package hsm

import "errors"

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
