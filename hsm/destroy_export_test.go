package hsm

import (
	"errors"
)

// CountKEKObjects counts the objects labelled KEKLabel(version) that p's session can see:
// token objects and session objects (the Seal/Open copies).
func CountKEKObjects(p *PKCS11, version uint32) (token, session int, err error) {
	p.mod.mu.RLock()
	defer p.mod.mu.RUnlock()
	st := p.live
	if st == nil {
		return 0, 0, errors.New("no live state")
	}
	st.anchorMu.Lock()
	defer st.anchorMu.Unlock()
	c := p.mod.ctx
	tok, err := findObjects(c, st.anchor, kekObjectTemplate(version, true))
	if err != nil {
		return 0, 0, err
	}
	ses, err := findObjects(c, st.anchor, kekObjectTemplate(version, false))
	if err != nil {
		return 0, 0, err
	}
	return len(tok), len(ses), nil
}
