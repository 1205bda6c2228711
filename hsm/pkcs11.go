package hsm

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

// DefaultLibrary is SoftHSM2's PKCS#11 library on Debian.
const DefaultLibrary = "/usr/lib/softhsm/libsofthsm2.so"

// recoveryInterval is the least time between two failed attempts to reach a lost token, so a
// burst of requests during an outage fails fast instead of re-initialising the library each time.
const recoveryInterval = 100 * time.Millisecond

// PKCS11Config configures a PKCS#11 provider.
type PKCS11Config struct {
	Library    string      // default DefaultLibrary
	TokenLabel string      // the token is found by label, never by slot number
	PIN        string      // user PIN
	SOPIN      string      // security officer PIN; only needed for TrustedWrap
	OAEPHash   crypto.Hash // RSA-OAEP hash (and MGF1 hash) for KEK wrap; crypto.SHA1 default (all SoftHSM 2.6.1 can do), crypto.SHA256 where the HSM can
	PoolSize   int         // session pool size; default 8
	// TrustedWrap is the strict mode: KEKs get CKA_WRAP_WITH_TRUSTED, so the token refuses to
	// wrap them under any key the security officer has not marked CKA_TRUSTED; WrapKEK logs in
	// as SO to import the recipient key as a trusted session object, wraps, and destroys it.
	TrustedWrap bool
	// ConfigPath, when set, is the SoftHSM config (SOFTHSM2_CONF) for this provider's library:
	// it is put into the environment just for C_Initialize. Tests use it to run several tokens
	// (each with its own copy of the library) in one process; servers normally leave it empty.
	ConfigPath string
	Logger     *slog.Logger // may be nil; key material, PINs and plaintext are never logged
}

// PKCS11 is a Provider backed by a PKCS#11 token.
//
// Concurrency: every operation holds the library's read lock (module.mu) and one session from a
// channel-based pool, so no session is ever used by two goroutines at once. Recovery from an
// outage, Close and the trusted-wrap login dance hold the write lock.
type PKCS11 struct {
	cfg PKCS11Config
	log *slog.Logger
	mod *module

	// identityMu serialises identity lookup/generation, so concurrent first calls create one
	// key pair. kekMu serialises KEK creation and unwrap-and-store (check, then create).
	// Both are taken before the module lock, never while holding it.
	identityMu sync.Mutex
	kekMu      sync.Mutex
	// kekUse keeps a KEK's cached handles from being used while DestroyKEK destroys the objects
	// behind them: Seal, Open, KEKCheckValue and WrapKEK hold the read lock of their version's
	// stripe from lookup to last use, DestroyKEK the write lock (after kekMu). Striped so that
	// other versions (on other stripes) are not held up and the set stays bounded.
	kekUse [kekUseStripes]sync.RWMutex

	// guarded by mod.mu
	closed  bool
	live    *tokenState // nil while the token is unreachable
	lastErr error       // why the token is unreachable (wraps ErrUnavailable)
	lastTry time.Time   // last failed recovery attempt
}

// tokenState is everything that is only valid for one login of one library initialisation:
// the slot, sessions and object handles. It is rebuilt from scratch by recovery.
type tokenState struct {
	gen  uint64 // module generation it was built under
	slot uint

	// anchor is the session that logged in and owns the session-object copies of the KEKs
	// (session objects die with the session that created them, so they must not live in a
	// pool session that may be replaced). Used only under anchorMu.
	anchor   pkcs11.SessionHandle
	anchorMu sync.Mutex

	pool     chan *session
	poolSize int

	objMu    sync.Mutex // guards keks and identity
	keks     map[uint32]*kekObjects
	identity *identityObjects
}

type session struct {
	h    pkcs11.SessionHandle
	open bool
}

type kekObjects struct {
	token      pkcs11.ObjectHandle // the persistent object; used only for C_WrapKey
	working    pkcs11.ObjectHandle // session-object copy (non-extractable) used for GCM and CMAC
	checkValue []byte
}

type identityObjects struct {
	priv pkcs11.ObjectHandle
	pub  *rsa.PublicKey
}

var errClosed = fmt.Errorf("%w: provider closed", ErrUnavailable)

// kekUseStripes is the number of KEK-use locks; versions v and v+kekUseStripes share one.
const kekUseStripes = 64

// kekUseLock is the lock that guards the use of KEK version's cached handles.
func (p *PKCS11) kekUseLock(version uint32) *sync.RWMutex {
	return &p.kekUse[version%kekUseStripes]
}

// tokenLostError marks an error that means the token is gone although the PKCS#11 code alone
// does not say so (SoftHSM reports a vanished token directory as CKR_GENERAL_ERROR):
// classify treats it as a token-level failure.
type tokenLostError struct{ err error }

func (e *tokenLostError) Error() string { return e.err.Error() }
func (e *tokenLostError) Unwrap() error { return e.err }

// checkTokenPresent asks the token for its info (SoftHSM reads the token's files for this), so
// an operation whose outcome must reach the token itself can tell "done" from "token away".
func checkTokenPresent(c *pkcs11.Ctx, slot uint, label string) error {
	ti, err := c.GetTokenInfo(slot)
	if err != nil {
		return &tokenLostError{fmt.Errorf("token info: %w", err)}
	}
	if ti.Label != label {
		return &tokenLostError{fmt.Errorf("slot now holds token %q", ti.Label)}
	}
	return nil
}

// OpenPKCS11 loads the library, finds the token by label, logs in and returns the provider.
// Objects are found lazily, by label, on first use after every login.
func OpenPKCS11(ctx context.Context, cfg PKCS11Config) (*PKCS11, error) {
	if cfg.Library == "" {
		cfg.Library = DefaultLibrary
	}
	if cfg.PoolSize <= 0 {
		cfg.PoolSize = 8
	}
	if cfg.OAEPHash == 0 {
		cfg.OAEPHash = crypto.SHA1
	}
	switch {
	case cfg.TokenLabel == "":
		return nil, errors.New("hsm: open pkcs#11: token label required")
	case cfg.PIN == "":
		return nil, errors.New("hsm: open pkcs#11: user PIN required")
	case cfg.TrustedWrap && cfg.SOPIN == "":
		return nil, errors.New("hsm: open pkcs#11: trusted wrap needs the SO PIN")
	case cfg.OAEPHash != crypto.SHA1 && cfg.OAEPHash != crypto.SHA256:
		return nil, fmt.Errorf("hsm: open pkcs#11: unsupported OAEP hash %v (want SHA-1 or SHA-256)", cfg.OAEPHash)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "hsm", "token", cfg.TokenLabel)

	mod, err := acquireModule(cfg.Library, cfg.ConfigPath)
	if err != nil {
		return nil, err
	}
	p := &PKCS11{cfg: cfg, log: log, mod: mod}
	mod.mu.Lock()
	defer mod.mu.Unlock()
	if !mod.initialized || mod.stale {
		if err := mod.reinitLocked(); err != nil {
			mod.releaseLocked()
			return nil, err
		}
	}
	st, err := p.establishLocked()
	if err != nil {
		mod.releaseLocked()
		return nil, fmt.Errorf("hsm: open pkcs#11 token %q: %w", cfg.TokenLabel, err)
	}
	p.live = st
	log.Info("hsm: token opened", "library", cfg.Library, "pool", cfg.PoolSize, "trusted_wrap", cfg.TrustedWrap)
	return p, nil
}

// establishLocked finds the token, opens the anchor session and logs in. Caller holds mod.mu.Lock.
func (p *PKCS11) establishLocked() (*tokenState, error) {
	c := p.mod.ctx
	slots, err := c.GetSlotList(true)
	if err != nil {
		return nil, fmt.Errorf("list slots: %w", err)
	}
	var found []uint
	for _, s := range slots {
		ti, err := c.GetTokenInfo(s)
		if err == nil && ti.Label == p.cfg.TokenLabel {
			found = append(found, s)
		}
	}
	switch len(found) {
	case 0:
		return nil, fmt.Errorf("no token labelled %q in %s", p.cfg.TokenLabel, p.cfg.Library)
	case 1:
	default:
		return nil, fmt.Errorf("%d tokens labelled %q; labels must be unique", len(found), p.cfg.TokenLabel)
	}
	anchor, err := c.OpenSession(found[0], pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return nil, fmt.Errorf("open session: %w", err)
	}
	if err := c.Login(anchor, pkcs11.CKU_USER, p.cfg.PIN); err != nil && !isCKR(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
		_ = c.CloseSession(anchor)
		return nil, fmt.Errorf("user login: %w", err) // the PKCS#11 code only, never the PIN
	}
	st := &tokenState{
		gen:      p.mod.gen,
		slot:     found[0],
		anchor:   anchor,
		pool:     make(chan *session, p.cfg.PoolSize),
		poolSize: p.cfg.PoolSize,
		keks:     make(map[uint32]*kekObjects),
	}
	for range p.cfg.PoolSize {
		st.pool <- &session{} // opened lazily
	}
	return st, nil
}

// closeLocked closes every session of st (which destroys the KEK session copies). Caller holds
// mod.mu.Lock, so every pool session is back in the pool.
func (st *tokenState) closeLocked(c *pkcs11.Ctx) {
	for range st.poolSize {
		select {
		case s := <-st.pool:
			if s.open {
				_ = c.CloseSession(s.h)
			}
		default:
		}
	}
	_ = c.CloseSession(st.anchor)
}

// dropLiveLocked forgets the live state, closing its sessions if their handles still belong to
// the current library initialisation (after a re-initialisation they could alias new sessions).
func (p *PKCS11) dropLiveLocked() {
	if p.live == nil {
		return
	}
	if p.live.gen == p.mod.gen && p.mod.initialized {
		p.live.closeLocked(p.mod.ctx)
	}
	p.live = nil
}

func (p *PKCS11) usableLocked() bool {
	return p.live != nil && p.live.gen == p.mod.gen && p.mod.initialized && !p.mod.stale
}

// recoverLocked brings the provider back to a usable state: re-initialise the library if it is
// stale, find the token, open sessions, log in. Objects are re-found lazily. Caller holds mod.mu.Lock.
func (p *PKCS11) recoverLocked() error {
	if p.closed {
		return errClosed
	}
	if p.usableLocked() {
		return nil
	}
	if p.lastErr != nil && time.Since(p.lastTry) < recoveryInterval {
		return p.lastErr
	}
	wasDown := p.lastErr != nil
	p.dropLiveLocked()
	if p.mod.stale || !p.mod.initialized {
		if err := p.mod.reinitLocked(); err != nil {
			p.setDownLocked(err)
			return p.lastErr
		}
	}
	st, err := p.establishLocked()
	if err != nil {
		// SoftHSM does not see a token come back without C_Finalize + C_Initialize.
		p.mod.stale = true
		p.setDownLocked(err)
		return p.lastErr
	}
	p.live = st
	p.lastErr = nil
	if wasDown {
		p.log.Info("hsm: token reachable again")
	}
	return nil
}

func (p *PKCS11) setDownLocked(cause error) {
	p.lastTry = time.Now()
	if !errors.Is(cause, ErrUnavailable) {
		cause = fmt.Errorf("%w: %w", ErrUnavailable, cause)
	}
	p.lastErr = cause
	p.log.Debug("hsm: token still unreachable", "err", cause)
}

// markDown records that st failed with a token- or state-level error. The next operation
// rebuilds the state (and re-initialises the library for token-level failures).
func (p *PKCS11) markDown(st *tokenState, f failure, cause error) {
	p.mod.mu.Lock()
	defer p.mod.mu.Unlock()
	if p.live != st {
		return // someone already handled it
	}
	p.log.Warn("hsm: token unavailable, will reconnect", "err", cause)
	if f == failToken && st.gen == p.mod.gen {
		p.mod.stale = true
	}
	p.dropLiveLocked()
	p.lastErr = fmt.Errorf("%w: %w", ErrUnavailable, cause)
	p.lastTry = time.Time{} // the next call may try to recover at once
}

// acquire returns the live state with mod.mu read-locked (the caller must RUnlock), recovering
// first if needed.
func (p *PKCS11) acquire() (*tokenState, error) {
	for range 3 {
		p.mod.mu.RLock()
		if p.closed {
			p.mod.mu.RUnlock()
			return nil, errClosed
		}
		if p.usableLocked() {
			return p.live, nil
		}
		p.mod.mu.RUnlock()
		p.mod.mu.Lock()
		err := p.recoverLocked()
		p.mod.mu.Unlock()
		if err != nil {
			return nil, err
		}
	}
	return nil, fmt.Errorf("%w: token state keeps changing", ErrUnavailable)
}

// run executes fn with a pool session. Dead sessions are replaced; token- and state-level
// failures trigger recovery; with retry, fn runs once more after a recovery (only for
// operations that are safe to repeat).
func (p *PKCS11) run(ctx context.Context, op string, retry bool, fn func(st *tokenState, s pkcs11.SessionHandle) error) error {
	attempts := 1
	if retry {
		attempts = 2
	}
	var err error
	for range attempts {
		if cerr := ctx.Err(); cerr != nil {
			return fmt.Errorf("hsm: %s: %w", op, cerr)
		}
		var st *tokenState
		st, err = p.acquire()
		if err != nil {
			return fmt.Errorf("hsm: %s: %w", op, err)
		}
		var s *session
		select {
		case s = <-st.pool:
		case <-ctx.Done():
			p.mod.mu.RUnlock()
			return fmt.Errorf("hsm: %s: waiting for a session: %w", op, ctx.Err())
		}
		if !s.open {
			h, oerr := p.mod.ctx.OpenSession(st.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
			if oerr != nil {
				st.pool <- s
				p.mod.mu.RUnlock()
				err = fmt.Errorf("open session: %w", oerr)
				p.markDown(st, failToken, err)
				continue
			}
			s.h, s.open = h, true
		}
		err = fn(st, s.h)
		f := classify(err)
		if f == failSession && !st.anchorAlive(p.mod.ctx) {
			f = failState // not just this session: the login went with the others
		}
		if f != failNone {
			// Whatever went wrong, this session is suspect: close it; a fresh one is opened on next use.
			_ = p.mod.ctx.CloseSession(s.h)
			s.open = false
		}
		st.pool <- s
		p.mod.mu.RUnlock()
		switch f {
		case failNone:
			if err != nil {
				return fmt.Errorf("hsm: %s: %w", op, err)
			}
			return nil
		case failSession:
			p.log.Debug("hsm: replaced dead session", "op", op, "err", err)
		default:
			p.markDown(st, f, err)
		}
	}
	return fmt.Errorf("hsm: %s: %w: %w", op, ErrUnavailable, err)
}

// anchorAlive reports whether the anchor session still exists and is logged in as user.
func (st *tokenState) anchorAlive(c *pkcs11.Ctx) bool {
	st.anchorMu.Lock()
	defer st.anchorMu.Unlock()
	si, err := c.GetSessionInfo(st.anchor)
	return err == nil && si.State == pkcs11.CKS_RW_USER_FUNCTIONS
}

// failure says how bad a PKCS#11 error is for the provider's state.
type failure int

const (
	failNone    failure = iota // success, or an error about this request only
	failSession                // this session is unusable: replace it
	failState                  // login or object handles lost: log in and find objects again
	failToken                  // token or library gone: re-initialise the library
)

func classify(err error) failure {
	if err == nil {
		return failNone
	}
	var lost *tokenLostError
	if errors.As(err, &lost) {
		return failToken
	}
	var e pkcs11.Error
	if !errors.As(err, &e) {
		return failNone
	}
	switch uint(e) {
	case pkcs11.CKR_SESSION_HANDLE_INVALID, pkcs11.CKR_SESSION_CLOSED, pkcs11.CKR_OPERATION_ACTIVE:
		return failSession
	case pkcs11.CKR_USER_NOT_LOGGED_IN, pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID,
		pkcs11.CKR_WRAPPING_KEY_HANDLE_INVALID, pkcs11.CKR_UNWRAPPING_KEY_HANDLE_INVALID:
		return failState
	case pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_DEVICE_ERROR, pkcs11.CKR_TOKEN_NOT_PRESENT,
		pkcs11.CKR_TOKEN_NOT_RECOGNIZED, pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, pkcs11.CKR_SESSION_COUNT:
		return failToken
	}
	return failNone
}

func isCKR(err error, code uint) bool {
	var e pkcs11.Error
	return errors.As(err, &e) && uint(e) == code
}

// ---- objects ----

func findObjects(c *pkcs11.Ctx, s pkcs11.SessionHandle, tmpl []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := c.FindObjectsInit(s, tmpl); err != nil {
		return nil, fmt.Errorf("find objects: %w", err)
	}
	var all []pkcs11.ObjectHandle
	for {
		hs, _, err := c.FindObjects(s, 16)
		if err != nil {
			_ = c.FindObjectsFinal(s)
			return nil, fmt.Errorf("find objects: %w", err)
		}
		if len(hs) == 0 {
			break
		}
		all = append(all, hs...)
	}
	if err := c.FindObjectsFinal(s); err != nil {
		return nil, fmt.Errorf("find objects: %w", err)
	}
	return all, nil
}

func findOne(c *pkcs11.Ctx, s pkcs11.SessionHandle, label string, tmpl []*pkcs11.Attribute) (pkcs11.ObjectHandle, bool, error) {
	hs, err := findObjects(c, s, tmpl)
	if err != nil {
		return 0, false, err
	}
	switch len(hs) {
	case 0:
		return 0, false, nil
	case 1:
		return hs[0], true, nil
	}
	return 0, false, fmt.Errorf("%d objects labelled %q", len(hs), label)
}

func kekFindTemplate(version uint32) []*pkcs11.Attribute {
	return kekObjectTemplate(version, true) // not our session copies, which share the label
}

// kekObjectTemplate finds KEK version's token objects (token) or its session copies (!token).
func kekObjectTemplate(version uint32, token bool) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, token),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, KEKLabel(version)),
	}
}

// kekAttributes are the attributes every KEK has, generated or unwrapped.
func (p *PKCS11) kekAttributes(token bool) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, token),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true), // only ever leaves wrapped, for joiners
		pkcs11.NewAttribute(pkcs11.CKA_WRAP_WITH_TRUSTED, p.cfg.TrustedWrap),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true), // Seal
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true), // Open
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),    // CMAC check value
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	}
}

func labelled(label string, attrs ...*pkcs11.Attribute) []*pkcs11.Attribute {
	return append(attrs,
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(label)))
}

// lookupKEK finds KEK version (cached per login), makes its working session copy and computes
// its check value. ErrKEKNotFound if the token has no such object.
func (st *tokenState) lookupKEK(c *pkcs11.Ctx, s pkcs11.SessionHandle, version uint32) (*kekObjects, error) {
	st.objMu.Lock()
	defer st.objMu.Unlock()
	if k, ok := st.keks[version]; ok {
		return k, nil
	}
	label := KEKLabel(version)
	tok, ok, err := findOne(c, s, label, kekFindTemplate(version))
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("kek v%d: %w", version, ErrKEKNotFound)
	}
	if err := checkAES256(c, s, tok); err != nil {
		return nil, fmt.Errorf("kek v%d: %w", version, err)
	}
	// Token objects are slow in SoftHSM (it re-reads and locks the object file per use), so
	// Seal/Open/CMAC use a session copy that cannot be extracted even by wrapping.
	st.anchorMu.Lock()
	working, err := c.CopyObject(st.anchor, tok, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
	})
	st.anchorMu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("kek v%d: copy to session object: %w", version, err)
	}
	kcv, err := checkValue(c, s, working)
	if err != nil {
		_ = c.DestroyObject(s, working)
		return nil, fmt.Errorf("kek v%d: %w", version, err)
	}
	k := &kekObjects{token: tok, working: working, checkValue: kcv}
	st.keks[version] = k
	return k, nil
}

func checkAES256(c *pkcs11.Ctx, s pkcs11.SessionHandle, key pkcs11.ObjectHandle) error {
	attrs, err := c.GetAttributeValue(s, key, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, nil),
	})
	if err != nil {
		return fmt.Errorf("read key attributes: %w", err)
	}
	var keyType, valueLen uint64
	for _, a := range attrs {
		switch a.Type {
		case pkcs11.CKA_KEY_TYPE:
			keyType = ulong(a.Value)
		case pkcs11.CKA_VALUE_LEN:
			valueLen = ulong(a.Value)
		}
	}
	// SoftHSM 2.6.1 reports CKA_VALUE_LEN 0 for unwrapped keys (and refuses CKA_VALUE_LEN in an
	// unwrap template), so 0 means "unknown" here. An unwrapped KEK of the wrong length still
	// cannot pass: its check value differs from the one the cluster recorded for that version.
	if keyType != pkcs11.CKK_AES || (valueLen != 0 && valueLen != KEKSize) {
		return fmt.Errorf("key is type %#x, %d bytes; want AES, %d bytes", keyType, valueLen, KEKSize)
	}
	return nil
}

// ulong decodes a CK_ULONG attribute value (native byte order, little-endian on our platforms).
func ulong(b []byte) uint64 {
	var v uint64
	for i := len(b) - 1; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

// checkValue computes a KEK's check value inside the HSM: AES-CMAC of the fixed block.
func checkValue(c *pkcs11.Ctx, s pkcs11.SessionHandle, key pkcs11.ObjectHandle) ([]byte, error) {
	if err := c.SignInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CMAC, nil)}, key); err != nil {
		return nil, fmt.Errorf("check value: %w", err)
	}
	mac, err := c.Sign(s, checkValueBlock[:])
	if err != nil {
		return nil, fmt.Errorf("check value: %w", err)
	}
	if len(mac) != CheckValueSize {
		return nil, fmt.Errorf("check value: CMAC is %d bytes, want %d", len(mac), CheckValueSize)
	}
	return mac, nil
}

func identityFindTemplate(class uint) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, class),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, IdentityLabel),
	}
}

// lookupIdentity finds the identity key pair (cached per login). found is false when neither
// half exists; a lone half is an error.
func (st *tokenState) lookupIdentity(c *pkcs11.Ctx, s pkcs11.SessionHandle) (*identityObjects, bool, error) {
	st.objMu.Lock()
	defer st.objMu.Unlock()
	if st.identity != nil {
		return st.identity, true, nil
	}
	priv, privOK, err := findOne(c, s, IdentityLabel, identityFindTemplate(pkcs11.CKO_PRIVATE_KEY))
	if err != nil {
		return nil, false, err
	}
	pub, pubOK, err := findOne(c, s, IdentityLabel, identityFindTemplate(pkcs11.CKO_PUBLIC_KEY))
	if err != nil {
		return nil, false, err
	}
	if !privOK && !pubOK {
		return nil, false, nil
	}
	if !privOK || !pubOK {
		return nil, false, fmt.Errorf("identity key pair %q is incomplete (private: %v, public: %v)", IdentityLabel, privOK, pubOK)
	}
	attrs, err := c.GetAttributeValue(s, pub, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, nil),
	})
	if err != nil {
		return nil, false, fmt.Errorf("read identity public key: %w", err)
	}
	key := &rsa.PublicKey{}
	for _, a := range attrs {
		switch a.Type {
		case pkcs11.CKA_MODULUS:
			key.N = new(big.Int).SetBytes(a.Value)
		case pkcs11.CKA_PUBLIC_EXPONENT:
			e := new(big.Int).SetBytes(a.Value)
			if !e.IsInt64() || e.Int64() > 1<<31-1 {
				return nil, false, errors.New("identity public exponent too large")
			}
			key.E = int(e.Int64())
		}
	}
	if key.N == nil || key.N.Sign() == 0 || key.E == 0 {
		return nil, false, errors.New("identity public key has no modulus or exponent")
	}
	st.identity = &identityObjects{priv: priv, pub: key}
	return st.identity, true, nil
}

func (p *PKCS11) oaep() []*pkcs11.Mechanism {
	hash, mgf := uint(pkcs11.CKM_SHA_1), uint(pkcs11.CKG_MGF1_SHA1)
	if p.cfg.OAEPHash == crypto.SHA256 {
		hash, mgf = pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256
	}
	return []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP,
		pkcs11.NewOAEPParams(hash, mgf, pkcs11.CKZ_DATA_SPECIFIED, nil))}
}

// recipientTemplate imports a recipient's RSA public key as a session object that can wrap.
func recipientTemplate(pub *rsa.PublicKey, trusted bool) []*pkcs11.Attribute {
	t := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, pub.N.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(pub.E)).Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
	}
	if trusted {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_TRUSTED, true))
	}
	return t
}

// ---- Provider ----

func (p *PKCS11) EnsureIdentity(ctx context.Context) (*rsa.PublicKey, error) {
	p.identityMu.Lock()
	defer p.identityMu.Unlock()
	var pub *rsa.PublicKey
	err := p.run(ctx, "ensure identity", true, func(st *tokenState, s pkcs11.SessionHandle) error {
		c := p.mod.ctx
		id, ok, err := st.lookupIdentity(c, s)
		if err != nil {
			return err
		}
		if !ok {
			p.log.Info("hsm: generating identity key pair", "bits", IdentityBits)
			_, _, err := c.GenerateKeyPair(s,
				[]*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)},
				labelled(IdentityLabel,
					pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY),
					pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
					pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
					pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, false),
					pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, IdentityBits),
					pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
					pkcs11.NewAttribute(pkcs11.CKA_WRAP, true),
					pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true),
					pkcs11.NewAttribute(pkcs11.CKA_VERIFY, false),
				),
				labelled(IdentityLabel,
					pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
					pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
					pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
					pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
					pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
					pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
					pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
					// No C_Decrypt: with it, anyone holding the PIN could decrypt a captured
					// wrapped-KEK blob and read the KEK in plaintext; C_UnwrapKey keeps it inside.
					pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
					pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
				))
			if err != nil {
				return fmt.Errorf("generate key pair: %w", err)
			}
			if id, ok, err = st.lookupIdentity(c, s); err != nil {
				return err
			} else if !ok {
				return errors.New("generated identity key pair not found")
			}
		}
		k := *id.pub
		pub = &k
		return nil
	})
	return pub, err
}

func (p *PKCS11) GenerateKEK(ctx context.Context, version uint32) ([]byte, error) {
	p.kekMu.Lock()
	defer p.kekMu.Unlock()
	var kcv []byte
	// No retry: after an outage mid-way the key may or may not exist; the caller decides.
	err := p.run(ctx, fmt.Sprintf("generate kek v%d", version), false, func(st *tokenState, s pkcs11.SessionHandle) error {
		c := p.mod.ctx
		_, exists, err := findOne(c, s, KEKLabel(version), kekFindTemplate(version))
		if err != nil {
			return err
		}
		if exists {
			return ErrKEKExists
		}
		attrs := labelled(KEKLabel(version), append(p.kekAttributes(true),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, KEKSize))...)
		if _, err := c.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}, attrs); err != nil {
			return fmt.Errorf("generate key: %w", err)
		}
		k, err := st.lookupKEK(c, s, version)
		if err != nil {
			return err
		}
		kcv = clone(k.checkValue)
		return nil
	})
	if err == nil {
		p.log.Info("hsm: generated kek", "version", version)
	}
	return kcv, err
}

func (p *PKCS11) KEKCheckValue(ctx context.Context, version uint32) ([]byte, error) {
	use := p.kekUseLock(version)
	use.RLock()
	defer use.RUnlock()
	var kcv []byte
	err := p.run(ctx, fmt.Sprintf("kek v%d check value", version), true, func(st *tokenState, s pkcs11.SessionHandle) error {
		k, err := st.lookupKEK(p.mod.ctx, s, version)
		if err != nil {
			return err
		}
		kcv = clone(k.checkValue)
		return nil
	})
	return kcv, err
}

func (p *PKCS11) WrapKEK(ctx context.Context, version uint32, recipient *rsa.PublicKey) ([]byte, error) {
	if err := checkRecipient(recipient); err != nil {
		return nil, err
	}
	if p.cfg.TrustedWrap {
		// Takes no kekUse lock: it re-finds the token object under the exclusive module lock.
		return p.wrapTrusted(ctx, version, recipient)
	}
	use := p.kekUseLock(version)
	use.RLock()
	defer use.RUnlock()
	var wrapped []byte
	err := p.run(ctx, fmt.Sprintf("wrap kek v%d", version), true, func(st *tokenState, s pkcs11.SessionHandle) error {
		c := p.mod.ctx
		k, err := st.lookupKEK(c, s, version)
		if err != nil {
			return err
		}
		wrapped, err = wrapWith(c, s, p.oaep(), recipient, false, k.token)
		return err
	})
	return wrapped, err
}

// wrapWith imports recipient as a session object, wraps key under it and destroys it again.
func wrapWith(c *pkcs11.Ctx, s pkcs11.SessionHandle, mech []*pkcs11.Mechanism, recipient *rsa.PublicKey, trusted bool, key pkcs11.ObjectHandle) ([]byte, error) {
	pub, err := c.CreateObject(s, recipientTemplate(recipient, trusted))
	if err != nil {
		return nil, fmt.Errorf("import recipient key: %w", err)
	}
	defer func() { _ = c.DestroyObject(s, pub) }()
	wrapped, err := c.WrapKey(s, mech, pub, key)
	if err != nil {
		return nil, fmt.Errorf("wrap: %w", err)
	}
	return wrapped, nil
}

// wrapTrusted is WrapKEK in TrustedWrap mode. Only the SO may create a CKA_TRUSTED key, and
// login state is per application, not per session, so this logs the whole process out of the
// token, logs in as SO, imports the recipient key as a trusted public session object (public
// session objects survive logout), logs back in as user and wraps. The user logout destroys
// the KEK session copies and invalidates private handles, so it runs under the exclusive lock
// and the cached objects are found again afterwards. It is the rare join path, not a hot one.
func (p *PKCS11) wrapTrusted(ctx context.Context, version uint32, recipient *rsa.PublicKey) ([]byte, error) {
	op := fmt.Sprintf("wrap kek v%d (trusted)", version)
	// Fail with ErrKEKNotFound before disturbing the login.
	if _, err := p.KEKCheckValue(ctx, version); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("hsm: %s: %w", op, err)
	}
	p.mod.mu.Lock()
	defer p.mod.mu.Unlock()
	if err := p.recoverLocked(); err != nil {
		return nil, fmt.Errorf("hsm: %s: %w", op, err)
	}
	st := p.live
	c := p.mod.ctx
	a := st.anchor
	var pub pkcs11.ObjectHandle
	created := false
	wrapped, err := func() ([]byte, error) {
		st.keks = make(map[uint32]*kekObjects)
		st.identity = nil
		if err := c.Logout(a); err != nil && !isCKR(err, pkcs11.CKR_USER_NOT_LOGGED_IN) {
			return nil, fmt.Errorf("user logout: %w", err)
		}
		if err := c.Login(a, pkcs11.CKU_SO, p.cfg.SOPIN); err != nil {
			return nil, fmt.Errorf("SO login: %w", err)
		}
		var err error
		pub, err = c.CreateObject(a, recipientTemplate(recipient, true))
		if err != nil {
			return nil, fmt.Errorf("import trusted recipient key: %w", err)
		}
		created = true
		if err := c.Logout(a); err != nil {
			return nil, fmt.Errorf("SO logout: %w", err)
		}
		if err := c.Login(a, pkcs11.CKU_USER, p.cfg.PIN); err != nil {
			return nil, fmt.Errorf("user login: %w", err)
		}
		tok, ok, err := findOne(c, a, KEKLabel(version), kekFindTemplate(version))
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, fmt.Errorf("kek v%d: %w", version, ErrKEKNotFound)
		}
		w, err := c.WrapKey(a, p.oaep(), pub, tok)
		if err != nil {
			return nil, fmt.Errorf("wrap: %w", err)
		}
		return w, nil
	}()
	// Whatever happened, end as the logged-in user with the trusted key gone.
	if si, serr := c.GetSessionInfo(a); serr != nil || si.State != pkcs11.CKS_RW_USER_FUNCTIONS {
		_ = c.Logout(a)
		if lerr := c.Login(a, pkcs11.CKU_USER, p.cfg.PIN); lerr != nil && !isCKR(lerr, pkcs11.CKR_USER_ALREADY_LOGGED_IN) {
			p.dropLiveLocked()
			p.setDownLocked(fmt.Errorf("user login after trusted wrap: %w", lerr))
		}
	}
	if created {
		_ = c.DestroyObject(a, pub)
	}
	if err != nil {
		return nil, fmt.Errorf("hsm: %s: %w", op, err)
	}
	return wrapped, nil
}

func (p *PKCS11) UnwrapKEK(ctx context.Context, version uint32, wrapped []byte) ([]byte, error) {
	op := fmt.Sprintf("unwrap kek v%d", version)
	if len(wrapped) == 0 { // miekg/pkcs11 UnwrapKey indexes wrapped[0]
		return nil, fmt.Errorf("hsm: %s: empty wrapped key", op)
	}
	p.kekMu.Lock()
	defer p.kekMu.Unlock()
	var kcv []byte
	err := p.run(ctx, op, true, func(st *tokenState, s pkcs11.SessionHandle) error {
		c := p.mod.ctx
		id, ok, err := st.lookupIdentity(c, s)
		if err != nil {
			return err
		}
		if !ok {
			return errors.New("no identity key (call EnsureIdentity first)")
		}
		if len(wrapped) != id.pub.Size() {
			return fmt.Errorf("wrapped key is %d bytes, want %d", len(wrapped), id.pub.Size())
		}
		kcv, err = p.unwrapAndStore(c, s, st, version, id.priv, wrapped)
		return err
	})
	if err == nil {
		p.log.Info("hsm: unwrapped kek", "version", version)
	}
	return kcv, err
}

// DestroyKEK destroys every object labelled KEKLabel(version) — the token object(s) and the
// session copy in the anchor session — and forgets the cached handles. It holds kekMu (no
// GenerateKEK/UnwrapKEK of any version meanwhile) and the write lock of the version's kekUse
// stripe (no Seal/Open/KEKCheckValue/WrapKEK of that version, or of a version sharing the
// stripe, is using a handle being destroyed); other operations run on. Idempotent, so it is
// retried once after a recovery. It succeeds only if the token was reachable at the end and
// no object with the label is left, so an outage (where SoftHSM simply stops listing token
// objects) cannot pass for "not present": it fails with ErrUnavailable instead.
func (p *PKCS11) DestroyKEK(ctx context.Context, version uint32) error {
	p.kekMu.Lock()
	defer p.kekMu.Unlock()
	use := p.kekUseLock(version)
	use.Lock()
	defer use.Unlock()
	destroyed := 0
	err := p.run(ctx, fmt.Sprintf("destroy kek v%d", version), true, func(st *tokenState, s pkcs11.SessionHandle) error {
		c := p.mod.ctx
		if err := checkTokenPresent(c, st.slot, p.cfg.TokenLabel); err != nil {
			return err
		}
		n, err := st.destroyKEK(c, s, version)
		destroyed += n
		if err != nil {
			return err
		}
		return checkTokenPresent(c, st.slot, p.cfg.TokenLabel)
	})
	if err != nil {
		return err
	}
	if destroyed > 0 {
		p.log.Info("hsm: destroyed kek", "version", version, "objects", destroyed)
	}
	return nil
}

// destroyKEK drops the cached handles of KEK version, destroys its session copies (in the
// anchor session that made them) and its token objects, and checks that nothing with its
// label is left. Returns how many objects it destroyed. The caller holds the version's kekUse
// write lock, so no cached handle of it is in use.
func (st *tokenState) destroyKEK(c *pkcs11.Ctx, s pkcs11.SessionHandle, version uint32) (int, error) {
	st.objMu.Lock()
	delete(st.keks, version)
	st.objMu.Unlock()
	destroyed := 0
	copies, err := findObjects(c, s, kekObjectTemplate(version, false))
	if err != nil {
		return destroyed, err
	}
	for _, h := range copies {
		st.anchorMu.Lock()
		err := c.DestroyObject(st.anchor, h)
		st.anchorMu.Unlock()
		switch {
		case err == nil:
			destroyed++
		case isCKR(err, pkcs11.CKR_OBJECT_HANDLE_INVALID):
			// already gone (another session ended); the final search below confirms it
		default:
			return destroyed, fmt.Errorf("destroy session copy: %w", err)
		}
	}
	tokens, err := findObjects(c, s, kekObjectTemplate(version, true))
	if err != nil {
		return destroyed, err
	}
	for _, h := range tokens {
		err := c.DestroyObject(s, h)
		switch {
		case err == nil:
			destroyed++
		case isCKR(err, pkcs11.CKR_OBJECT_HANDLE_INVALID):
		default:
			return destroyed, fmt.Errorf("destroy token object: %w", err)
		}
	}
	left, err := findObjects(c, s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, KEKLabel(version)),
	})
	if err != nil {
		return destroyed, err
	}
	if len(left) > 0 {
		return destroyed, fmt.Errorf("%d objects labelled %q left after destroying them", len(left), KEKLabel(version))
	}
	return destroyed, nil
}

func (p *PKCS11) Seal(ctx context.Context, kekVersion uint32, plaintext, aad []byte) ([]byte, error) {
	use := p.kekUseLock(kekVersion)
	use.RLock()
	defer use.RUnlock()
	var out []byte
	err := p.run(ctx, "seal", true, func(st *tokenState, s pkcs11.SessionHandle) error {
		c := p.mod.ctx
		k, err := st.lookupKEK(c, s, kekVersion)
		if err != nil {
			return err
		}
		// One allocation for the result: the IV is drawn into its head and
		// the ciphertext appended after it.
		buf := make([]byte, gcmIVSize, gcmIVSize+len(plaintext)+gcmTagSize)
		iv := buf[:gcmIVSize:gcmIVSize]
		if _, err := io.ReadFull(rand.Reader, iv); err != nil {
			return err
		}
		params := pkcs11.NewGCMParams(iv, aad, gcmTagSize*8)
		defer params.Free()
		if err := c.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, k.working); err != nil {
			return fmt.Errorf("encrypt init: %w", err)
		}
		ct, err := c.Encrypt(s, plaintext)
		if err != nil {
			return fmt.Errorf("encrypt: %w", err)
		}
		if len(ct) != len(plaintext)+gcmTagSize {
			return fmt.Errorf("encrypt: output is %d bytes, want %d", len(ct), len(plaintext)+gcmTagSize)
		}
		out = append(buf, ct...)
		return nil
	})
	return out, err
}

func (p *PKCS11) Open(ctx context.Context, kekVersion uint32, sealed, aad []byte) ([]byte, error) {
	use := p.kekUseLock(kekVersion)
	use.RLock()
	defer use.RUnlock()
	var pt []byte
	err := p.run(ctx, "open", true, func(st *tokenState, s pkcs11.SessionHandle) error {
		c := p.mod.ctx
		k, err := st.lookupKEK(c, s, kekVersion)
		if err != nil {
			return err
		}
		if len(sealed) < gcmIVSize+gcmTagSize {
			return fmt.Errorf("sealed blob is %d bytes, too short: %w", len(sealed), ErrAuthFailed)
		}
		params := pkcs11.NewGCMParams(sealed[:gcmIVSize], aad, gcmTagSize*8)
		defer params.Free()
		if err := c.DecryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_GCM, params)}, k.working); err != nil {
			return fmt.Errorf("decrypt init: %w", err)
		}
		pt, err = c.Decrypt(s, sealed[gcmIVSize:])
		if err != nil {
			if classify(err) != failNone {
				return fmt.Errorf("decrypt: %w", err)
			}
			// SoftHSM reports a bad tag as CKR_GENERAL_ERROR; others use
			// CKR_ENCRYPTED_DATA_INVALID. Either way the caller learns only "not authentic".
			return ErrAuthFailed
		}
		if pt == nil {
			pt = []byte{}
		}
		return nil
	})
	return pt, err
}

func (p *PKCS11) GenerateRandom(ctx context.Context, n int) ([]byte, error) {
	if err := checkRandomLen(n); err != nil {
		return nil, err
	}
	if n == 0 {
		return []byte{}, p.Health(ctx)
	}
	var out []byte
	err := p.run(ctx, "generate random", true, func(st *tokenState, s pkcs11.SessionHandle) error {
		b, err := p.mod.ctx.GenerateRandom(s, n)
		if err != nil {
			return err
		}
		if len(b) != n {
			return fmt.Errorf("got %d random bytes, want %d", len(b), n)
		}
		out = b
		return nil
	})
	return out, err
}

// Health asks the token for its info (SoftHSM reads the token's files for this, so a vanished
// token directory shows up here even though session objects keep working from memory) and
// checks that the anchor session is still logged in as user. A failure marks the token down:
// every operation then returns ErrUnavailable until a recovery succeeds.
func (p *PKCS11) Health(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("hsm: health: %w", err)
	}
	st, err := p.acquire()
	if err != nil {
		return fmt.Errorf("hsm: health: %w", err)
	}
	c := p.mod.ctx
	var f failure
	ti, err := c.GetTokenInfo(st.slot)
	switch {
	case err != nil:
		f, err = failToken, fmt.Errorf("token info: %w", err)
	case ti.Label != p.cfg.TokenLabel:
		f, err = failToken, fmt.Errorf("slot now holds token %q", ti.Label)
	default:
		st.anchorMu.Lock()
		si, serr := c.GetSessionInfo(st.anchor)
		st.anchorMu.Unlock()
		switch {
		case serr != nil:
			f, err = failState, fmt.Errorf("session info: %w", serr)
		case si.State != pkcs11.CKS_RW_USER_FUNCTIONS:
			f, err = failState, fmt.Errorf("not logged in as user (session state %d)", si.State)
		}
	}
	p.mod.mu.RUnlock()
	if err != nil {
		p.markDown(st, f, err)
		return fmt.Errorf("hsm: health: %w: %w", ErrUnavailable, err)
	}
	return nil
}

// Close closes this provider's sessions; the last provider on a library finalizes it.
func (p *PKCS11) Close() error {
	p.mod.mu.Lock()
	defer p.mod.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	p.dropLiveLocked()
	p.mod.releaseLocked()
	p.log.Info("hsm: token closed")
	return nil
}
