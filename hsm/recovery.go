package hsm

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/subtle"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"

	"github.com/miekg/pkcs11"
)

// Disaster recovery: `cabinet operator recovery export` wraps the KEKs under an
// operator's offline RSA recovery public key with WrapKEK; a restore into a
// brand-new HSM unwraps them with UnwrapKEKWithRecoveryKey.

// RecoveryKEKUnwrapper is implemented by both providers.
type RecoveryKEKUnwrapper interface {
	// UnwrapKEKWithRecoveryKey imports the recovery private key (PKCS#8 DER, RSA) into the
	// HSM as a session object — never a token object —, unwraps `wrapped` (RSA-OAEP with the
	// configured hash) into KEK `version` stored as a token object, destroys the recovery key
	// object and returns the KEK's check value. Same rules as UnwrapKEK for an existing version.
	UnwrapKEKWithRecoveryKey(ctx context.Context, version uint32, recoveryKeyPKCS8, wrapped []byte) ([]byte, error)
	// OAEPHash is the RSA-OAEP hash this HSM wraps and unwraps KEKs with.
	OAEPHash() crypto.Hash
}

var (
	_ RecoveryKEKUnwrapper = (*PKCS11)(nil)
	_ RecoveryKEKUnwrapper = (*Memory)(nil)
)

func parseRecoveryKey(der []byte) (*rsa.PrivateKey, error) {
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("recovery key is not a PKCS#8 private key: %w", err)
	}
	rk, ok := k.(*rsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("recovery key is %T, want RSA", k)
	}
	if rk.N.BitLen() < minRecipientBits {
		return nil, fmt.Errorf("recovery key is %d bits, want at least %d", rk.N.BitLen(), minRecipientBits)
	}
	if len(rk.Primes) != 2 {
		return nil, errors.New("recovery key must have exactly two primes")
	}
	rk.Precompute()
	return rk, nil
}

// OAEPHash returns the configured RSA-OAEP hash.
func (p *PKCS11) OAEPHash() crypto.Hash { return p.cfg.OAEPHash }

// recoveryKeyTemplate is the recovery private key as a session object that can only unwrap.
func recoveryKeyTemplate(k *rsa.PrivateKey) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "cabinet-recovery-import"),
		pkcs11.NewAttribute(pkcs11.CKA_MODULUS, k.N.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(k.E)).Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE_EXPONENT, k.D.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PRIME_1, k.Primes[0].Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_PRIME_2, k.Primes[1].Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_1, k.Precomputed.Dp.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_2, k.Precomputed.Dq.Bytes()),
		pkcs11.NewAttribute(pkcs11.CKA_COEFFICIENT, k.Precomputed.Qinv.Bytes()),
	}
}

// UnwrapKEKWithRecoveryKey implements RecoveryKEKUnwrapper. The recovery key lives in the
// token only for the duration of this call, as a session object of one pool session, and is
// destroyed before the call returns (a session object would also die with its session).
func (p *PKCS11) UnwrapKEKWithRecoveryKey(ctx context.Context, version uint32, recoveryKeyPKCS8, wrapped []byte) ([]byte, error) {
	op := fmt.Sprintf("unwrap kek v%d with the recovery key", version)
	if len(wrapped) == 0 { // miekg/pkcs11 UnwrapKey indexes wrapped[0]
		return nil, fmt.Errorf("hsm: %s: empty wrapped key", op)
	}
	rk, err := parseRecoveryKey(recoveryKeyPKCS8)
	if err != nil {
		return nil, fmt.Errorf("hsm: %s: %w", op, err)
	}
	if len(wrapped) != rk.Size() {
		return nil, fmt.Errorf("hsm: %s: wrapped key is %d bytes, want %d", op, len(wrapped), rk.Size())
	}
	tmpl := recoveryKeyTemplate(rk)
	p.kekMu.Lock()
	defer p.kekMu.Unlock()
	var kcv []byte
	err = p.run(ctx, op, true, func(st *tokenState, s pkcs11.SessionHandle) error {
		c := p.mod.ctx
		priv, err := c.CreateObject(s, tmpl)
		if err != nil {
			return fmt.Errorf("import recovery key as a session object: %w", err)
		}
		defer func() {
			if derr := c.DestroyObject(s, priv); derr != nil {
				p.log.Warn("hsm: could not destroy the imported recovery key session object; it dies with the session", "err", derr)
			}
		}()
		kcv, err = p.unwrapAndStore(c, s, st, version, priv, wrapped)
		return err
	})
	if err == nil {
		p.log.Info("hsm: unwrapped kek with the recovery key", "version", version)
	}
	return kcv, err
}

// unwrapAndStore unwraps `wrapped` with `unwrapper` into a temporary session object, and stores
// it as KEK `version` (token object) unless that version exists: then the check values must
// agree (ErrKEKMismatch otherwise, and nothing is stored). Returns the check value.
func (p *PKCS11) unwrapAndStore(c *pkcs11.Ctx, s pkcs11.SessionHandle, st *tokenState, version uint32, unwrapper pkcs11.ObjectHandle, wrapped []byte) ([]byte, error) {
	// Unwrap into a temporary session object first, so a mismatch stores nothing.
	tmp, err := c.UnwrapKey(s, p.oaep(), unwrapper, wrapped, p.kekAttributes(false))
	if err != nil {
		return nil, fmt.Errorf("unwrap: %w", err)
	}
	defer func() { _ = c.DestroyObject(s, tmp) }()
	if err := checkAES256(c, s, tmp); err != nil {
		return nil, err
	}
	got, err := checkValue(c, s, tmp)
	if err != nil {
		return nil, err
	}
	have, err := st.lookupKEK(c, s, version)
	switch {
	case err == nil:
		if subtle.ConstantTimeCompare(have.checkValue, got) != 1 {
			return nil, ErrKEKMismatch
		}
		return clone(have.checkValue), nil
	case !errors.Is(err, ErrKEKNotFound):
		return nil, err
	}
	if _, err := c.CopyObject(s, tmp, labelled(KEKLabel(version), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true))); err != nil {
		return nil, fmt.Errorf("store as token object: %w", err)
	}
	k, err := st.lookupKEK(c, s, version)
	if err != nil {
		return nil, err
	}
	if subtle.ConstantTimeCompare(k.checkValue, got) != 1 {
		return nil, errors.New("stored kek has a different check value than the unwrapped one")
	}
	return clone(k.checkValue), nil
}

// OAEPHash is SHA-1: Memory wraps like SoftHSM 2.6.
func (m *Memory) OAEPHash() crypto.Hash { return crypto.SHA1 }

// UnwrapKEKWithRecoveryKey implements RecoveryKEKUnwrapper in process memory.
func (m *Memory) UnwrapKEKWithRecoveryKey(ctx context.Context, version uint32, recoveryKeyPKCS8, wrapped []byte) ([]byte, error) {
	rk, err := parseRecoveryKey(recoveryKeyPKCS8)
	if err != nil {
		return nil, fmt.Errorf("hsm: unwrap kek v%d with the recovery key: %w", version, err)
	}
	if len(wrapped) != rk.Size() {
		return nil, fmt.Errorf("hsm: unwrap kek v%d with the recovery key: wrapped key is %d bytes, want %d", version, len(wrapped), rk.Size())
	}
	key, err := rsa.DecryptOAEP(sha1.New(), nil, rk, wrapped, nil)
	if err != nil {
		return nil, fmt.Errorf("hsm: unwrap kek v%d with the recovery key: %w", version, err)
	}
	k, err := newMemoryKEK(key)
	if err != nil {
		return nil, fmt.Errorf("hsm: unwrap kek v%d with the recovery key: %w", version, err)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, errMemoryClosed
	}
	if have, ok := m.keks[version]; ok {
		if subtle.ConstantTimeCompare(have.checkValue, k.checkValue) != 1 {
			return nil, fmt.Errorf("hsm: unwrap kek v%d with the recovery key: %w", version, ErrKEKMismatch)
		}
		return clone(have.checkValue), nil
	}
	m.keks[version] = k
	return clone(k.checkValue), nil
}
