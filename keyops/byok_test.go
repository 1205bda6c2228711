package keyops

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// One import key pair per test binary (RSA-3072 generation is slow under
// -race); tests that need their own make one.
var importPair struct {
	once   sync.Once
	e      *Engine
	s      *testSealer
	pub    []byte
	sealed *fsmpb.WrappedBlob
	err    error
}

const testToken = "imp-test-token"

func sharedImportPair(tb testing.TB) (*Engine, *testSealer, []byte, *fsmpb.WrappedBlob) {
	tb.Helper()
	importPair.once.Do(func() {
		importPair.s = newTestSealer()
		importPair.e, importPair.err = New(Config{Sealer: importPair.s})
		if importPair.err == nil {
			importPair.pub, importPair.sealed, importPair.err = importPair.e.NewImportKeyPair(context.Background(), testToken, 1)
		}
	})
	if importPair.err != nil {
		tb.Fatal(importPair.err)
	}
	return importPair.e, importPair.s, importPair.pub, importPair.sealed
}

func TestNewImportKeyPair(t *testing.T) {
	e, s, pub, sealed := sharedImportPair(t)
	p, err := x509.ParsePKIXPublicKey(pub)
	if err != nil || p.(*rsa.PublicKey).N.BitLen() != 3072 {
		t.Fatalf("public key: %v", err)
	}
	der, err := s.Open(context.Background(), sealed.KekVersion, sealed.Blob, ImportKeyAAD(testToken))
	if err != nil {
		t.Fatal(err)
	}
	priv, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil || !priv.(*rsa.PrivateKey).PublicKey.Equal(p) {
		t.Fatalf("sealed private key does not match: %v", err)
	}
	// The AAD binds the token and cannot pass for key material.
	if _, err := s.Open(context.Background(), 1, sealed.Blob, ImportKeyAAD(testToken+"x")); err == nil {
		t.Fatal("opened under another token id")
	}
	if _, err := s.Open(context.Background(), 1, sealed.Blob, MaterialAAD(testToken, 1, fsmpb.KeySpec_KEY_SPEC_RSA_3072)); err == nil {
		t.Fatal("opened as key material")
	}
	if want := "\x00\x00\x00\x15cabinet/import-key/v1\x00\x00\x00\x03tok"; string(ImportKeyAAD("tok")) != want {
		t.Fatalf("ImportKeyAAD = %q", ImportKeyAAD("tok"))
	}
	for _, bad := range []string{"", "a/b", strings.Repeat("t", 256)} {
		_, _, err := e.NewImportKeyPair(context.Background(), bad, 1)
		wantErr(t, err, ErrInvalidArgument)
	}
	_, _, err = e.NewImportKeyPair(context.Background(), "tok", 999)
	wantErr(t, err, ErrUnwrap)
}

// Import round trip for every spec: WrapForImport -> UnwrapImportedMaterial
// -> SealImportedMaterial -> use the key.
func TestImportRoundTripEverySpec(t *testing.T) {
	ctx := context.Background()
	e, _, pub, sealed := sharedImportPair(t)
	msg := []byte("imported key at work")
	for _, c := range validCombos {
		t.Run(c.String(), func(t *testing.T) {
			material := testMaterial(t, c.spec, 3)
			orig := bytes.Clone(material)
			wrapped, err := WrapForImport(pub, material)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(material, orig) {
				t.Fatal("WrapForImport changed the caller's material")
			}
			got, err := e.UnwrapImportedMaterial(ctx, testToken, sealed, wrapped)
			if err != nil || !bytes.Equal(got, orig) {
				t.Fatalf("UnwrapImportedMaterial: %v", err)
			}
			id, _ := NewKeyID()
			blob, pubDER, err := e.SealImportedMaterial(ctx, id, 1, c.spec, 1, got)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, make([]byte, len(got))) {
				t.Fatal("SealImportedMaterial did not zero the material")
			}
			key := &fsmpb.KeyRecord{KeyId: id, Spec: c.spec, Usage: c.usage, State: fsmpb.KeyState_KEY_STATE_ACTIVE, PrimaryVersion: 1,
				Origin:   fsmpb.KeyOrigin_KEY_ORIGIN_IMPORTED,
				Versions: []*fsmpb.KeyVersion{{Version: 1, Material: blob, PublicKeyDer: pubDER, State: enabledV}}}
			useImported(t, e, key, orig, msg)
		})
	}
}

// useImported checks that key works with exactly the imported material.
func useImported(t *testing.T, e *Engine, key *fsmpb.KeyRecord, material, msg []byte) {
	t.Helper()
	ctx := context.Background()
	s := specs[key.Spec]
	switch {
	case key.Spec == fsmpb.KeySpec_KEY_SPEC_AES_256:
		// A ciphertext made from the material directly (the vectors'
		// construction) decrypts.
		ref := keyWithMaterial(t, e.sealer.(*testSealer), key.KeyId, 1, material)
		ct, _, err := e.Encrypt(ctx, ref, msg, nil)
		if err != nil {
			t.Fatal(err)
		}
		e.Forget(key.KeyId)
		pt, _, _, err := e.Decrypt(ctx, lookupOf(key), ct, nil, false)
		if err != nil || !bytes.Equal(pt, msg) {
			t.Fatalf("Decrypt: %v", err)
		}
	case s.mac != nil:
		mac, _, err := e.GenerateMac(ctx, key, msg)
		h := hmac.New(s.mac, material)
		h.Write(msg)
		if err != nil || !bytes.Equal(mac, h.Sum(nil)) {
			t.Fatalf("GenerateMac: %v", err)
		}
	default:
		priv, err := x509.ParsePKCS8PrivateKey(material)
		if err != nil {
			t.Fatal(err)
		}
		wantPub, _ := x509.MarshalPKIXPublicKey(priv.(crypto.Signer).Public())
		if der, err := PublicKey(key, 1); err != nil || !bytes.Equal(der, wantPub) {
			t.Fatalf("PublicKey: %v", err)
		}
		if key.Usage == fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT {
			ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, &priv.(*rsa.PrivateKey).PublicKey, msg, nil)
			if err != nil {
				t.Fatal(err)
			}
			pt, err := e.DecryptAsymmetric(ctx, key, 0, ct, false)
			if err != nil || !bytes.Equal(pt, msg) {
				t.Fatalf("DecryptAsymmetric: %v", err)
			}
			return
		}
		alg := firstAlg(key.Spec)
		sig, _, err := e.Sign(ctx, key, msg, MessageRaw, alg)
		if err != nil || !stdlibVerify(t, wantPub, alg, msg, sig) {
			t.Fatalf("Sign: %v", err)
		}
	}
}

func TestUnwrapImportedMaterialErrors(t *testing.T) {
	ctx := context.Background()
	e, s, pub, sealed := sharedImportPair(t)
	material := testMaterial(t, fsmpb.KeySpec_KEY_SPEC_AES_256, 0)
	wrapped, err := WrapForImport(pub, material)
	if err != nil {
		t.Fatal(err)
	}
	otherPub, _ := x509.MarshalPKIXPublicKey(&testSigner(t, fsmpb.KeySpec_KEY_SPEC_RSA_3072, 0).(*rsa.PrivateKey).PublicKey)
	underOther, _ := WrapForImport(otherPub, material)
	// RSA-OAEP under the right key but of a 16-byte AES key.
	aes16 := seq(1, 16)
	wk, _ := rsa.EncryptOAEP(sha256.New(), rand.Reader, mustRSAPub(t, pub), aes16, nil)
	wm, _ := KeyWrapPad(aes16, material)
	shortAES := append(wk, wm...)
	tests := []struct {
		name    string
		token   string
		sealed  *fsmpb.WrappedBlob
		wrapped []byte
		want    error // nil: the one unwrap failure
	}{
		{"rsa part altered", testToken, sealed, flip(wrapped, 10), nil},
		{"kwp part altered", testToken, sealed, flip(wrapped, len(wrapped)-1), nil},
		{"wrapped for another key", testToken, sealed, underOther, nil},
		{"16-byte AES key", testToken, sealed, shortAES, nil},
		{"parts swapped", testToken, sealed, append(bytes.Clone(wrapped[384:]), wrapped[:384]...), nil},
		{"truncated", testToken, sealed, wrapped[:len(wrapped)-8], nil},
		{"no kwp part", testToken, sealed, wrapped[:384], ErrInvalidArgument},
		{"kwp part of 8 bytes", testToken, sealed, wrapped[:392], ErrInvalidArgument},
		{"kwp part not a multiple of 8", testToken, sealed, append(bytes.Clone(wrapped), 0), ErrInvalidArgument},
		{"empty", testToken, sealed, nil, ErrInvalidArgument},
		{"too long", testToken, sealed, make([]byte, 384+maxWrappedImportLen), ErrInvalidArgument},
		{"other token id", testToken + "2", sealed, wrapped, ErrUnwrap},
		{"bad token id", "bad/token", sealed, wrapped, ErrInvalidArgument},
		{"no sealed key", testToken, nil, wrapped, ErrInvalidArgument},
		{"sealed key altered", testToken, &fsmpb.WrappedBlob{KekVersion: 1, Blob: flip(sealed.Blob, 20)}, wrapped, ErrUnwrap},
		{"sealed key under another KEK", testToken, &fsmpb.WrappedBlob{KekVersion: 2, Blob: sealed.Blob}, wrapped, ErrUnwrap},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opens := s.opens.Load()
			got, err := e.UnwrapImportedMaterial(ctx, tt.token, tt.sealed, tt.wrapped)
			if got != nil {
				t.Fatal("returned material")
			}
			if tt.want == nil {
				if err == nil || err.Error() != errImportUnwrapFailed.Error() || !errors.Is(err, ErrInvalidArgument) {
					t.Fatalf("error = %v, want the one unwrap failure", err)
				}
			} else {
				wantErr(t, err, tt.want)
			}
			if errors.Is(err, ErrInvalidArgument) && tt.want != nil && s.opens.Load() != opens {
				t.Error("a malformed request reached the HSM")
			}
			checkNoLeak(t, err, material)
		})
	}
	// WrapForImport refuses bad public keys and empty material.
	ecPub, _ := x509.MarshalPKIXPublicKey(testSigner(t, fsmpb.KeySpec_KEY_SPEC_EC_P256, 0).Public())
	small, _ := rsa.GenerateKey(rand.Reader, 1024)
	smallPub, _ := x509.MarshalPKIXPublicKey(&small.PublicKey)
	for _, bad := range [][]byte{nil, []byte("junk"), ecPub, smallPub} {
		_, err := WrapForImport(bad, material)
		wantErr(t, err, ErrInvalidArgument)
	}
	_, err = WrapForImport(pub, nil)
	wantErr(t, err, ErrInvalidArgument)
}

func mustRSAPub(t *testing.T, der []byte) *rsa.PublicKey {
	t.Helper()
	p, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		t.Fatal(err)
	}
	return p.(*rsa.PublicKey)
}

func TestSealImportedMaterialValidation(t *testing.T) {
	ctx := context.Background()
	e, s := newTestEngine(t, 0)
	pkcs8 := func(k any) []byte {
		b, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	rsa2048 := testSigner(t, fsmpb.KeySpec_KEY_SPEC_RSA_2048, 0).(*rsa.PrivateKey)
	p256 := testSigner(t, fsmpb.KeySpec_KEY_SPEC_EC_P256, 0)
	p384 := testSigner(t, fsmpb.KeySpec_KEY_SPEC_EC_P384, 0)
	ed := testSigner(t, fsmpb.KeySpec_KEY_SPEC_ED25519, 0)
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	tests := []struct {
		name     string
		spec     fsmpb.KeySpec
		material []byte
		want     error
		say      string
	}{
		{"AES 32", fsmpb.KeySpec_KEY_SPEC_AES_256, make([]byte, 32), nil, ""},
		{"AES 31", fsmpb.KeySpec_KEY_SPEC_AES_256, make([]byte, 31), ErrInvalidArgument, "must be 32 bytes; got 31"},
		{"AES 33", fsmpb.KeySpec_KEY_SPEC_AES_256, make([]byte, 33), ErrInvalidArgument, "must be 32 bytes"},
		{"HMAC256 31", fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, make([]byte, 31), ErrInvalidArgument, "32..64 bytes"},
		{"HMAC256 32", fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, make([]byte, 32), nil, ""},
		{"HMAC256 48", fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, make([]byte, 48), nil, ""},
		{"HMAC256 64", fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, make([]byte, 64), nil, ""},
		{"HMAC256 65", fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, make([]byte, 65), ErrInvalidArgument, "32..64 bytes"},
		{"HMAC512 63", fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512, make([]byte, 63), ErrInvalidArgument, "64..128 bytes"},
		{"HMAC512 128", fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512, make([]byte, 128), nil, ""},
		{"HMAC512 129", fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512, make([]byte, 129), ErrInvalidArgument, "64..128 bytes"},
		{"RSA_2048 ok", fsmpb.KeySpec_KEY_SPEC_RSA_2048, pkcs8(rsa2048), nil, ""},
		{"RSA_3072 given 2048", fsmpb.KeySpec_KEY_SPEC_RSA_3072, pkcs8(rsa2048), ErrInvalidArgument, "exactly 3072 bits; it has 2048"},
		{"RSA_2048 given PKCS#1", fsmpb.KeySpec_KEY_SPEC_RSA_2048, x509.MarshalPKCS1PrivateKey(rsa2048), ErrInvalidArgument, "PKCS#8"},
		{"RSA_2048 given EC", fsmpb.KeySpec_KEY_SPEC_RSA_2048, pkcs8(p256), ErrInvalidArgument, "must be an RSA private key; it is a ECDSA P-256 key"},
		{"EC_P256 ok", fsmpb.KeySpec_KEY_SPEC_EC_P256, pkcs8(p256), nil, ""},
		{"EC_P256 given P-384", fsmpb.KeySpec_KEY_SPEC_EC_P256, pkcs8(p384), ErrInvalidArgument, "curve P-256; it is a ECDSA P-384 key"},
		{"EC_P384 given P-224", fsmpb.KeySpec_KEY_SPEC_EC_P384, pkcs8(p224), ErrInvalidArgument, "P-384"},
		{"EC_P384 given Ed25519", fsmpb.KeySpec_KEY_SPEC_EC_P384, pkcs8(ed), ErrInvalidArgument, "Ed25519"},
		{"ED25519 ok", fsmpb.KeySpec_KEY_SPEC_ED25519, pkcs8(ed), nil, ""},
		{"ED25519 given RSA", fsmpb.KeySpec_KEY_SPEC_ED25519, pkcs8(rsa2048), ErrInvalidArgument, "it is a RSA key"},
		{"ED25519 given raw seed", fsmpb.KeySpec_KEY_SPEC_ED25519, make([]byte, 32), ErrInvalidArgument, "PKCS#8"},
		{"ED25519 given garbage", fsmpb.KeySpec_KEY_SPEC_ED25519, []byte("garbage"), ErrInvalidArgument, "PKCS#8"},
		{"unspecified spec", fsmpb.KeySpec_KEY_SPEC_UNSPECIFIED, make([]byte, 32), ErrUnsupported, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			secretCopy := bytes.Clone(tt.material)
			seals := s.seals.Load()
			blob, pub, err := e.SealImportedMaterial(ctx, "k-imp", 2, tt.spec, 1, tt.material)
			wantErr(t, err, tt.want)
			if !bytes.Equal(tt.material, make([]byte, len(tt.material))) {
				t.Fatal("material not zeroed")
			}
			if err != nil {
				if !strings.Contains(err.Error(), tt.say) {
					t.Errorf("message %q does not say %q", err, tt.say)
				}
				if s.seals.Load() != seals {
					t.Error("refused material was sealed")
				}
				checkNoLeak(t, err, secretCopy)
				return
			}
			m, err := s.Open(ctx, blob.KekVersion, blob.Blob, MaterialAAD("k-imp", 2, tt.spec))
			if err != nil {
				t.Fatal(err)
			}
			if IsAsymmetric(tt.spec) {
				// Stored canonically as PKCS#8; the public key matches.
				k, err := x509.ParsePKCS8PrivateKey(m)
				if err != nil {
					t.Fatal(err)
				}
				want, _ := x509.MarshalPKIXPublicKey(k.(crypto.Signer).Public())
				if !bytes.Equal(pub, want) {
					t.Fatal("public key does not match")
				}
			} else if !bytes.Equal(m, secretCopy) || pub != nil {
				t.Fatal("symmetric material changed or got a public key")
			}
		})
	}
	_, _, err := e.SealImportedMaterial(ctx, "bad/id", 1, fsmpb.KeySpec_KEY_SPEC_AES_256, 1, make([]byte, 32))
	wantErr(t, err, ErrInvalidArgument)
	_, _, err = e.SealImportedMaterial(ctx, "k-imp", 0, fsmpb.KeySpec_KEY_SPEC_AES_256, 1, make([]byte, 32))
	wantErr(t, err, ErrInvalidArgument)
}

// WrapNewMaterial for every spec: the sealed material is what the spec
// says, the public key matches it, and generations differ.
func TestWrapNewMaterialEverySpec(t *testing.T) {
	ctx := context.Background()
	for _, spec := range allSpecs {
		t.Run(specName(spec), func(t *testing.T) {
			e, s := newTestEngine(t, 0)
			blob, pub, err := e.WrapNewMaterial(ctx, "k-gen", 7, spec, 2)
			if err != nil {
				t.Fatal(err)
			}
			m, err := s.Open(ctx, 2, blob.Blob, MaterialAAD("k-gen", 7, spec))
			if err != nil || blob.KekVersion != 2 {
				t.Fatalf("open: %v", err)
			}
			raw, signer, err := parseSecret(spec, m)
			if err != nil {
				t.Fatal(err)
			}
			sp := specs[spec]
			if sp.symmetric() {
				if len(raw) != sp.genLen || pub != nil || s.randoms.Load() != 1 {
					t.Fatalf("%d bytes, pub %v, %d HSM random calls", len(raw), pub != nil, s.randoms.Load())
				}
			} else {
				want, _ := x509.MarshalPKIXPublicKey(signer.Public())
				if !bytes.Equal(pub, want) {
					t.Fatal("public key does not match the material")
				}
				if _, ok := checkPublicKey(spec, pub); !ok {
					t.Fatal("public key does not fit the spec")
				}
				// EC and Ed25519 mix in the HSM's randomness; RSA cannot.
				if (sp.rsaBits > 0) != (s.randoms.Load() == 0) {
					t.Fatalf("%d HSM random calls", s.randoms.Load())
				}
			}
			if spec != fsmpb.KeySpec_KEY_SPEC_RSA_4096 && spec != fsmpb.KeySpec_KEY_SPEC_RSA_3072 {
				blob2, _, err := e.WrapNewMaterial(ctx, "k-gen", 7, spec, 2)
				if err != nil {
					t.Fatal(err)
				}
				m2, _ := s.Open(ctx, 2, blob2.Blob, MaterialAAD("k-gen", 7, spec))
				if bytes.Equal(m, m2) {
					t.Fatal("two generations gave the same material")
				}
			}
		})
	}
}

// fixedRandSealer returns fixed "HSM" random bytes.
type fixedRandSealer struct {
	*testSealer
	b byte
}

func (f fixedRandSealer) GenerateRandom(_ context.Context, n int) ([]byte, error) {
	return bytes.Repeat([]byte{f.b}, n), nil
}

// Ed25519 seeds and ECDSA scalars are HKDF(hsm || local) as documented: a
// known answer from fixed sources, and the HSM's bytes change the key.
func TestGeneratedKeysMixHSMRandomness(t *testing.T) {
	ctx := context.Background()
	gen := func(hsm byte, spec fsmpb.KeySpec) crypto.Signer {
		s := fixedRandSealer{newTestSealer(), hsm}
		e, err := New(Config{Sealer: s, Rand: zeroReader{}})
		if err != nil {
			t.Fatal(err)
		}
		blob, _, err := e.WrapNewMaterial(ctx, "k-mix", 1, spec, 1)
		if err != nil {
			t.Fatal(err)
		}
		m, err := s.Open(ctx, 1, blob.Blob, MaterialAAD("k-mix", 1, spec))
		if err != nil {
			t.Fatal(err)
		}
		_, signer, err := parseSecret(spec, m)
		if err != nil {
			t.Fatal(err)
		}
		return signer
	}
	seed, _ := hkdf.Key(sha256.New, append(bytes.Repeat([]byte{9}, 32), make([]byte, 32)...), nil, entropyInfo+"/ed25519-seed", 32)
	if !bytes.Equal(gen(9, fsmpb.KeySpec_KEY_SPEC_ED25519).(ed25519.PrivateKey), ed25519.NewKeyFromSeed(seed)) {
		t.Fatal("Ed25519 key is not HKDF(hsm || local)")
	}
	d, _ := hkdf.Key(sha256.New, append(bytes.Repeat([]byte{9}, 32), make([]byte, 32)...), nil, entropyInfo+"/ecdsa-scalar/a", 32)
	want, _ := ecdsa.ParseRawPrivateKey(elliptic.P256(), d)
	if !gen(9, fsmpb.KeySpec_KEY_SPEC_EC_P256).(*ecdsa.PrivateKey).Equal(want) {
		t.Fatal("P-256 key is not HKDF(hsm || local)")
	}
	for _, spec := range []fsmpb.KeySpec{fsmpb.KeySpec_KEY_SPEC_ED25519, fsmpb.KeySpec_KEY_SPEC_EC_P384} {
		a, b := gen(1, spec), gen(2, spec)
		if a.(interface{ Equal(crypto.PrivateKey) bool }).Equal(b) {
			t.Fatalf("%s: the HSM's randomness does not change the key", specName(spec))
		}
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) { clear(p); return len(p), nil }

var _ io.Reader = zeroReader{}
