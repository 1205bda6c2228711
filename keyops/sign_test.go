package keyops

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"strings"
	"testing"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

var signSpecs = []fsmpb.KeySpec{
	fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeySpec_KEY_SPEC_RSA_3072, fsmpb.KeySpec_KEY_SPEC_RSA_4096,
	fsmpb.KeySpec_KEY_SPEC_EC_P256, fsmpb.KeySpec_KEY_SPEC_EC_P384, fsmpb.KeySpec_KEY_SPEC_ED25519,
}

// signInput returns what Sign takes for mt: the message, or its digest.
func signInput(alg SigningAlgorithm, mt MessageType, msg []byte) []byte {
	if mt == MessageRaw {
		return msg
	}
	if alg == ED25519 {
		return make([]byte, 64) // refused anyway
	}
	h := alg.hash().New()
	h.Write(msg)
	return h.Sum(nil)
}

// stdlibVerify checks sig with crypto/* directly, from the exported PKIX
// public key, with the parameters docs/KEY-SPECS.md promises.
func stdlibVerify(t *testing.T, pubDER []byte, alg SigningAlgorithm, msg, sig []byte) bool {
	t.Helper()
	pub, err := x509.ParsePKIXPublicKey(pubDER)
	if err != nil {
		t.Fatal(err)
	}
	var h crypto.Hash
	switch alg {
	case RSASSA_PSS_SHA_256, RSASSA_PKCS1_V1_5_SHA_256, ECDSA_SHA_256:
		h = crypto.SHA256
	case RSASSA_PSS_SHA_384, RSASSA_PKCS1_V1_5_SHA_384, ECDSA_SHA_384:
		h = crypto.SHA384
	case RSASSA_PSS_SHA_512, RSASSA_PKCS1_V1_5_SHA_512:
		h = crypto.SHA512
	}
	var digest []byte
	if h != 0 {
		hh := h.New()
		hh.Write(msg)
		digest = hh.Sum(nil)
	}
	switch alg {
	case RSASSA_PSS_SHA_256, RSASSA_PSS_SHA_384, RSASSA_PSS_SHA_512:
		return rsa.VerifyPSS(pub.(*rsa.PublicKey), h, digest, sig, &rsa.PSSOptions{SaltLength: h.Size(), Hash: h}) == nil
	case RSASSA_PKCS1_V1_5_SHA_256, RSASSA_PKCS1_V1_5_SHA_384, RSASSA_PKCS1_V1_5_SHA_512:
		return rsa.VerifyPKCS1v15(pub.(*rsa.PublicKey), h, digest, sig) == nil
	case ECDSA_SHA_256, ECDSA_SHA_384:
		return ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), digest, sig)
	case ED25519:
		return ed25519.Verify(pub.(ed25519.PublicKey), msg, sig)
	}
	t.Fatalf("no algorithm %s", alg)
	return false
}

func TestSignVerifyEveryAlgorithm(t *testing.T) {
	ctx := context.Background()
	e, s := newTestEngine(t, 0)
	msg := []byte("the quick brown fox signs the lazy dog")
	for _, spec := range signSpecs {
		key := newSpecKey(t, e, spec, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, 1)
		pub := key.Versions[0].PublicKeyDer
		for _, alg := range SigningAlgorithms(spec) {
			for _, mt := range []MessageType{MessageRaw, MessageDigest} {
				t.Run(specName(spec)+"/"+alg.String()+"/"+mt.String(), func(t *testing.T) {
					in := signInput(alg, mt, msg)
					sig, v, err := e.Sign(ctx, key, in, mt, alg)
					if alg == ED25519 && mt == MessageDigest {
						wantErr(t, err, ErrInvalidArgument)
						return
					}
					if err != nil || v != 1 {
						t.Fatalf("Sign = %d, %v", v, err)
					}
					opens := s.opens.Load()
					for _, vmt := range []MessageType{MessageRaw, MessageDigest} {
						if alg == ED25519 && vmt == MessageDigest {
							continue
						}
						// A RAW signature verifies as DIGEST and vice versa.
						ok, err := e.Verify(ctx, key, 0, signInput(alg, vmt, msg), vmt, alg, sig, false)
						if err != nil || !ok {
							t.Fatalf("Verify(%s) = %v, %v", vmt, ok, err)
						}
					}
					if !stdlibVerify(t, pub, alg, msg, sig) {
						t.Fatal("crypto stdlib does not verify the signature")
					}
					// Altered message or signature: (false, nil).
					bad := bytes.Clone(msg)
					bad[0] ^= 1
					if ok, err := e.Verify(ctx, key, 1, signInput(alg, mt, bad), mt, alg, sig, false); ok || err != nil {
						t.Fatalf("altered message: %v, %v", ok, err)
					}
					for _, badSig := range [][]byte{nil, {}, sig[:len(sig)-1], append(bytes.Clone(sig), 0), flip(sig, len(sig)/2), make([]byte, 2000)} {
						if ok, err := e.Verify(ctx, key, 1, in, mt, alg, badSig, false); ok || err != nil {
							t.Fatalf("altered signature (%d bytes): %v, %v", len(badSig), ok, err)
						}
					}
					if s.opens.Load() != opens {
						t.Fatal("Verify used the HSM")
					}
				})
			}
		}
		// Algorithms of other specs are refused.
		for alg := RSASSA_PSS_SHA_256; alg <= ED25519; alg++ {
			if contains(SigningAlgorithms(spec), alg) {
				continue
			}
			_, _, err := e.Sign(ctx, key, msg, MessageRaw, alg)
			wantErr(t, err, ErrInvalidArgument)
			_, err = e.Verify(ctx, key, 0, msg, MessageRaw, alg, []byte("sig"), false)
			wantErr(t, err, ErrInvalidArgument)
		}
		for _, alg := range []SigningAlgorithm{SigningAlgorithmUnspecified, SigningAlgorithm(99)} {
			_, _, err := e.Sign(ctx, key, msg, MessageRaw, alg)
			wantErr(t, err, ErrInvalidArgument)
		}
	}
}

func flip(b []byte, i int) []byte {
	c := bytes.Clone(b)
	c[i] ^= 0x10
	return c
}

func contains[T comparable](s []T, x T) bool {
	for _, y := range s {
		if y == x {
			return true
		}
	}
	return false
}

func TestSignInvalidInput(t *testing.T) {
	ctx := context.Background()
	e, _ := newTestEngine(t, 0)
	rsaKey := newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, 1)
	edKey := newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_ED25519, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, 1)
	tests := []struct {
		name string
		key  *fsmpb.KeyRecord
		msg  []byte
		mt   MessageType
		alg  SigningAlgorithm
		want error
		say  string
	}{
		{"digest too short", rsaKey, make([]byte, 31), MessageDigest, RSASSA_PSS_SHA_256, ErrInvalidArgument, "32-byte"},
		{"digest too long", rsaKey, make([]byte, 33), MessageDigest, RSASSA_PSS_SHA_256, ErrInvalidArgument, "32-byte"},
		{"sha-512 digest", rsaKey, make([]byte, 64), MessageDigest, RSASSA_PKCS1_V1_5_SHA_512, nil, ""},
		{"empty raw message", rsaKey, nil, MessageRaw, RSASSA_PKCS1_V1_5_SHA_256, nil, ""},
		{"largest raw message", rsaKey, make([]byte, MaxMessageLen), MessageRaw, RSASSA_PKCS1_V1_5_SHA_256, nil, ""},
		{"raw message too long", rsaKey, make([]byte, MaxMessageLen+1), MessageRaw, RSASSA_PKCS1_V1_5_SHA_256, ErrInvalidArgument, "DIGEST"},
		{"unknown message type", rsaKey, make([]byte, 32), MessageType(7), RSASSA_PSS_SHA_256, ErrInvalidArgument, "RAW or DIGEST"},
		{"ed25519 digest", edKey, make([]byte, 64), MessageDigest, ED25519, ErrInvalidArgument, "RAW messages only"},
		{"ed25519 on rsa", rsaKey, nil, MessageRaw, ED25519, ErrInvalidArgument, "signs with"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := e.Sign(ctx, tt.key, tt.msg, tt.mt, tt.alg)
			wantErr(t, err, tt.want)
			if err != nil && !strings.Contains(err.Error(), tt.say) {
				t.Errorf("message %q does not say %q", err, tt.say)
			}
			_, err = e.Verify(ctx, tt.key, 0, tt.msg, tt.mt, tt.alg, []byte("x"), false)
			wantErr(t, err, tt.want)
		})
	}
}

// Old versions keep verifying after rotation; a signature only verifies
// with the version that made it.
func TestVerifyVersions(t *testing.T) {
	ctx := context.Background()
	e, _ := newTestEngine(t, 0)
	key := newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_EC_P256, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, 1)
	msg := []byte("versioned")
	sig1, v1, err := e.Sign(ctx, key, msg, MessageRaw, ECDSA_SHA_256)
	if err != nil || v1 != 1 {
		t.Fatal(v1, err)
	}
	addSpecVersion(t, e, key)
	sig2, v2, _ := e.Sign(ctx, key, msg, MessageRaw, ECDSA_SHA_256)
	if v2 != 2 {
		t.Fatalf("after rotation Sign used version %d", v2)
	}
	for _, tc := range []struct {
		version uint32
		sig     []byte
		want    bool
	}{{1, sig1, true}, {2, sig2, true}, {0, sig2, true}, {0, sig1, false}, {2, sig1, false}, {1, sig2, false}} {
		ok, err := e.Verify(ctx, key, tc.version, msg, MessageRaw, ECDSA_SHA_256, tc.sig, false)
		if err != nil || ok != tc.want {
			t.Errorf("Verify(v%d) = %v, %v; want %v", tc.version, ok, err, tc.want)
		}
	}
	// A state whose public key does not fit the spec is an internal error.
	bad := cloneKey(key)
	bad.Versions[0].PublicKeyDer = key.Versions[0].PublicKeyDer[:10]
	_, err = e.Verify(ctx, bad, 1, msg, MessageRaw, ECDSA_SHA_256, sig1, false)
	wantErr(t, err, ErrUnwrap)
	bad.Versions[0].PublicKeyDer = newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_EC_P384, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, 1).Versions[0].PublicKeyDer
	_, err = e.Verify(ctx, bad, 1, msg, MessageRaw, ECDSA_SHA_256, sig1, false)
	wantErr(t, err, ErrUnwrap)
}

// Verify works while the HSM is down: it only needs the state.
func TestVerifyNeedsNoHSM(t *testing.T) {
	ctx := context.Background()
	e, s := newTestEngine(t, 0)
	key := newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, 1)
	sig, _, err := e.Sign(ctx, key, []byte("m"), MessageRaw, RSASSA_PSS_SHA_384)
	if err != nil {
		t.Fatal(err)
	}
	e.Purge()
	down := errTestHSMDown
	s.openErr.Store(&down)
	if ok, err := e.Verify(ctx, key, 0, []byte("m"), MessageRaw, RSASSA_PSS_SHA_384, sig, false); !ok || err != nil {
		t.Fatalf("Verify with the HSM down: %v, %v", ok, err)
	}
	if der, err := PublicKey(key, 0); err != nil || !bytes.Equal(der, key.Versions[0].PublicKeyDer) {
		t.Fatalf("PublicKey with the HSM down: %v", err)
	}
	_, _, err = e.Sign(ctx, key, []byte("m"), MessageRaw, RSASSA_PSS_SHA_384)
	if !errors.Is(err, ErrUnwrap) || !errors.Is(err, errTestHSMDown) {
		t.Fatalf("Sign with the HSM down: %v", err)
	}
}

func TestParseNames(t *testing.T) {
	names := []string{"RSASSA_PSS_SHA_256", "RSASSA_PSS_SHA_384", "RSASSA_PSS_SHA_512",
		"RSASSA_PKCS1_V1_5_SHA_256", "RSASSA_PKCS1_V1_5_SHA_384", "RSASSA_PKCS1_V1_5_SHA_512",
		"ECDSA_SHA_256", "ECDSA_SHA_384", "ED25519"}
	for i, n := range names {
		a, err := ParseSigningAlgorithm(n)
		if err != nil || a.String() != n || a != SigningAlgorithm(i+1) {
			t.Errorf("ParseSigningAlgorithm(%q) = %v, %v", n, a, err)
		}
	}
	for _, n := range []string{"", "rsassa_pss_sha_256", "SIGNING_ALGORITHM_UNSPECIFIED", "ED25519_SHA_512", strings.Repeat("X", 1000)} {
		_, err := ParseSigningAlgorithm(n)
		wantErr(t, err, ErrInvalidArgument)
		if len(err.Error()) > 400 {
			t.Errorf("message too long: %d bytes", len(err.Error()))
		}
	}
	if SigningAlgorithm(42).String() != "SIGNING_ALGORITHM_UNSPECIFIED" {
		t.Error("unknown algorithm name")
	}
	for _, mt := range []MessageType{MessageRaw, MessageDigest} {
		got, err := ParseMessageType(mt.String())
		if err != nil || got != mt {
			t.Errorf("ParseMessageType(%s) = %v, %v", mt, got, err)
		}
	}
	_, err := ParseMessageType("raw")
	wantErr(t, err, ErrInvalidArgument)
	if MessageType(5).String() != "UNKNOWN" {
		t.Error("unknown message type name")
	}
	if SpecAllowsUsage(fsmpb.KeySpec_KEY_SPEC_AES_256, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY) || !SpecAllowsUsage(fsmpb.KeySpec_KEY_SPEC_RSA_4096, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT) {
		t.Error("SpecAllowsUsage")
	}
	if IsAsymmetric(fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512) || !IsAsymmetric(fsmpb.KeySpec_KEY_SPEC_ED25519) || IsAsymmetric(fsmpb.KeySpec(99)) {
		t.Error("IsAsymmetric")
	}
	if SigningAlgorithms(fsmpb.KeySpec_KEY_SPEC_AES_256) != nil || len(SigningAlgorithms(fsmpb.KeySpec_KEY_SPEC_RSA_2048)) != 6 {
		t.Error("SigningAlgorithms")
	}
}
