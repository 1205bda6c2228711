package hsm

import (
	"errors"

	"github.com/miekg/pkcs11"
)

// CountPrivateKeys counts the RSA private-key objects p's login can see: token objects
// (tokenObjects true) or session objects. Call it only while p is idle.
func CountPrivateKeys(p *PKCS11, tokenObjects bool) (int, error) {
	p.mod.mu.RLock()
	defer p.mod.mu.RUnlock()
	st := p.live
	if st == nil {
		return 0, errors.New("no live state")
	}
	st.anchorMu.Lock()
	defer st.anchorMu.Unlock()
	hs, err := findObjects(p.mod.ctx, st.anchor, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, tokenObjects),
	})
	return len(hs), err
}
