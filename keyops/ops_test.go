package keyops

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/binary"
	"errors"
	"hash"
	"math/big"
	"strings"
	"sync"
	"testing"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

func TestMacRoundTrip(t *testing.T) {
	ctx := context.Background()
	e, _ := newTestEngine(t, 0)
	for _, tc := range []struct {
		spec fsmpb.KeySpec
		size int
	}{
		{fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, 32},
		{fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512, 64},
	} {
		key := newSpecKey(t, e, tc.spec, fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC, 1)
		msg := []byte("authenticate me")
		mac, v, err := e.GenerateMac(ctx, key, msg)
		if err != nil || v != 1 || len(mac) != tc.size {
			t.Fatalf("%s: %d bytes, v%d, %v", specName(tc.spec), len(mac), v, err)
		}
		// Known answer: HMAC with the spec's hash over the material.
		m := materialOf(t, e.sealer.(*testSealer), key, 1)
		h := hmac.New(map[bool]func() hash.Hash{true: sha256.New, false: sha512.New}[tc.size == 32], m)
		h.Write(msg)
		if !bytes.Equal(mac, h.Sum(nil)) {
			t.Fatalf("%s: MAC differs from crypto/hmac", specName(tc.spec))
		}
		for _, c := range []struct {
			name    string
			version uint32
			msg     []byte
			mac     []byte
			want    bool
		}{
			{"right", 0, msg, mac, true},
			{"explicit version", 1, msg, mac, true},
			{"other message", 1, []byte("authenticate mE"), mac, false},
			{"altered mac", 1, msg, flip(mac, 3), false},
			{"truncated mac", 1, msg, mac[:len(mac)-1], false},
			{"empty mac", 1, msg, nil, false},
			{"longer mac", 1, msg, append(bytes.Clone(mac), 0), false},
		} {
			ok, err := e.VerifyMac(ctx, key, c.version, c.msg, c.mac, false)
			if err != nil || ok != c.want {
				t.Errorf("%s %s: %v, %v", specName(tc.spec), c.name, ok, err)
			}
		}
		// Rotation: the old version still verifies its MACs, the new one
		// makes different ones.
		addSpecVersion(t, e, key)
		mac2, v2, _ := e.GenerateMac(ctx, key, msg)
		if v2 != 2 || bytes.Equal(mac, mac2) {
			t.Fatal("rotation did not change the MAC")
		}
		if ok, _ := e.VerifyMac(ctx, key, 1, msg, mac, false); !ok {
			t.Fatal("old version no longer verifies")
		}
		if ok, _ := e.VerifyMac(ctx, key, 0, msg, mac, false); ok {
			t.Fatal("primary verifies the old version's MAC")
		}
		_, _, err = e.GenerateMac(ctx, key, make([]byte, MaxMessageLen+1))
		wantErr(t, err, ErrInvalidArgument)
		_, err = e.VerifyMac(ctx, key, 0, make([]byte, MaxMessageLen+1), mac, false)
		wantErr(t, err, ErrInvalidArgument)
	}
}

func TestAsymmetricEncryption(t *testing.T) {
	ctx := context.Background()
	e, s := newTestEngine(t, 0)
	for _, spec := range []fsmpb.KeySpec{fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeySpec_KEY_SPEC_RSA_3072, fsmpb.KeySpec_KEY_SPEC_RSA_4096} {
		key := newSpecKey(t, e, spec, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, 1)
		limit := specs[spec].rsaBits/8 - 66
		for _, n := range []int{0, 1, limit} {
			pt := bytes.Repeat([]byte{0xA5}, n)
			seals, opens := s.seals.Load(), s.opens.Load()
			ct, v, err := e.EncryptAsymmetric(ctx, key, 0, pt)
			if err != nil || v != 1 || len(ct) != specs[spec].rsaBits/8 {
				t.Fatalf("%s %d: %v", specName(spec), n, err)
			}
			if s.seals.Load() != seals || s.opens.Load() != opens {
				t.Fatal("EncryptAsymmetric used the HSM")
			}
			got, err := e.DecryptAsymmetric(ctx, key, 1, ct, false)
			if err != nil || !bytes.Equal(got, pt) {
				t.Fatalf("%s %d: DecryptAsymmetric: %v", specName(spec), n, err)
			}
			// Same key from the stdlib.
			priv := testSigner(t, spec, 0).(*rsa.PrivateKey)
			if got, err := rsa.DecryptOAEP(sha256.New(), nil, priv, ct, nil); err != nil || !bytes.Equal(got, pt) {
				t.Fatal("crypto/rsa does not decrypt it")
			}
		}
		_, _, err := e.EncryptAsymmetric(ctx, key, 0, make([]byte, limit+1))
		wantErr(t, err, ErrInvalidArgument)
		ct, _, _ := e.EncryptAsymmetric(ctx, key, 0, []byte("x"))
		for _, bad := range [][]byte{flip(ct, 0), flip(ct, len(ct)-1), make([]byte, len(ct))} {
			_, err := e.DecryptAsymmetric(ctx, key, 0, bad, false)
			if err == nil || err.Error() != errAsymDecryptFailed.Error() {
				t.Fatalf("altered ciphertext: %v", err)
			}
		}
		for _, bad := range [][]byte{nil, ct[1:], append(bytes.Clone(ct), 0)} {
			_, err := e.DecryptAsymmetric(ctx, key, 0, bad, false)
			wantErr(t, err, ErrInvalidCiphertext)
		}
	}
	// Versions: a non-primary explicit version is refused for encryption,
	// any enabled version decrypts.
	key := newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, 2)
	ct1, v, err := e.EncryptAsymmetric(ctx, withPrimary(key, 1), 1, []byte("one"))
	if err != nil || v != 1 {
		t.Fatal(err)
	}
	_, _, err = e.EncryptAsymmetric(ctx, key, 1, []byte("one"))
	wantErr(t, err, ErrKeyState)
	if pt, err := e.DecryptAsymmetric(ctx, key, 1, ct1, false); err != nil || string(pt) != "one" {
		t.Fatal(err)
	}
	if _, err := e.DecryptAsymmetric(ctx, key, 2, ct1, false); err == nil {
		t.Fatal("version 2 decrypted version 1's ciphertext")
	}
	// Symmetric keys are pointed at Encrypt.
	aes := newTestKey(t, e, 1)
	_, _, err = e.EncryptAsymmetric(ctx, aes, 0, []byte("x"))
	wantErr(t, err, ErrInvalidArgument)
	_, err = e.DecryptAsymmetric(ctx, aes, 0, make([]byte, 256), false)
	wantErr(t, err, ErrInvalidArgument)
}

func TestReEncrypt(t *testing.T) {
	ctx := context.Background()
	e, s := newTestEngine(t, 0)
	src := newTestKey(t, e, 1)
	dst := newTestKey(t, e, 2)
	lookup := lookupOf(src, dst)
	srcCtx, dstCtx := map[string]string{"from": "a"}, map[string]string{"to": "b"}
	ct, _, _ := e.Encrypt(ctx, src, []byte("move me"), srcCtx)

	// Across keys, with a new context.
	out, sid, sv, dv, err := e.ReEncrypt(ctx, lookup, ct, srcCtx, dst, dstCtx, false)
	if err != nil || sid != src.KeyId || sv != 1 || dv != 2 {
		t.Fatalf("ReEncrypt = %q v%d -> v%d, %v", sid, sv, dv, err)
	}
	if pt, id, v, err := e.Decrypt(ctx, lookup, out, dstCtx, false); err != nil || string(pt) != "move me" || id != dst.KeyId || v != 2 {
		t.Fatalf("Decrypt(re-encrypted) = %q, %s, %d, %v", pt, id, v, err)
	}
	_, _, _, err = e.Decrypt(ctx, lookup, out, srcCtx, false)
	checkAuthFailure(t, err)

	// Within a key, from an old version to the primary after rotation.
	addTestVersion(t, e, src)
	out, _, sv, dv, err = e.ReEncrypt(ctx, lookup, ct, srcCtx, src, srcCtx, false)
	if err != nil || sv != 1 || dv != 2 {
		t.Fatalf("same-key ReEncrypt: v%d -> v%d, %v", sv, dv, err)
	}
	if h, _ := ParseCiphertext(out); h.KeyID != src.KeyId || h.Version != 2 {
		t.Fatalf("header %+v", h)
	}

	tests := []struct {
		name     string
		ct       []byte
		srcCtx   map[string]string
		dest     *fsmpb.KeyRecord
		override bool
		prep     func() func()
		want     error // nil: authentication failure
	}{
		{"wrong source context", ct, nil, dst, false, nil, nil},
		{"tampered", flip(ct, len(ct)-1), srcCtx, dst, false, nil, nil},
		{"bad dest context", ct, srcCtx, dst, false, nil, ErrInvalidArgument},
		{"nil dest", ct, srcCtx, nil, false, nil, ErrKeyNotFound},
		{"dest disabled", ct, srcCtx, dst, false, func() func() {
			dst.State = fsmpb.KeyState_KEY_STATE_DISABLED
			return func() { dst.State = fsmpb.KeyState_KEY_STATE_ACTIVE }
		}, ErrKeyState},
		{"dest deactivated", ct, srcCtx, dst, false, func() func() {
			dst.State = fsmpb.KeyState_KEY_STATE_DEACTIVATED
			return func() { dst.State = fsmpb.KeyState_KEY_STATE_ACTIVE }
		}, ErrKeyState},
		{"dest compromised with override", ct, srcCtx, dst, true, func() func() {
			dst.State = fsmpb.KeyState_KEY_STATE_COMPROMISED
			return func() { dst.State = fsmpb.KeyState_KEY_STATE_ACTIVE }
		}, ErrKeyState},
		{"dest HMAC", ct, srcCtx, newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC, 1), false, nil, ErrInvalidArgument},
		{"dest RSA", ct, srcCtx, newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, 1), false, nil, ErrInvalidArgument},
		{"source compromised", ct, srcCtx, dst, false, func() func() {
			src.State = fsmpb.KeyState_KEY_STATE_COMPROMISED
			return func() { src.State = fsmpb.KeyState_KEY_STATE_ACTIVE }
		}, ErrKeyState},
		{"source below min version", ct, srcCtx, dst, true, func() func() {
			src.MinDecryptionVersion = 2
			return func() { src.MinDecryptionVersion = 0 }
		}, ErrKeyState},
		{"source unknown", validCiphertext(t, e, newTestKey(t, e, 1)), nil, dst, false, nil, ErrKeyNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.prep != nil {
				defer tt.prep()()
			}
			destCtx := dstCtx
			if tt.name == "bad dest context" {
				destCtx = map[string]string{"": "x"}
			}
			opens := s.opens.Load()
			e.Purge()
			out, _, _, _, err := e.ReEncrypt(ctx, lookup, tt.ct, tt.srcCtx, tt.dest, destCtx, tt.override)
			if out != nil {
				t.Fatal("output on failure")
			}
			if tt.want == nil {
				checkAuthFailure(t, err)
				return
			}
			wantErr(t, err, tt.want)
			if s.opens.Load() != opens {
				t.Error("refused before decrypting, but the HSM was asked")
			}
		})
	}
	// A compromised source re-encrypts with the override (recovery).
	src.State = fsmpb.KeyState_KEY_STATE_COMPROMISED
	if _, _, _, _, err := e.ReEncrypt(ctx, lookup, ct, srcCtx, dst, dstCtx, true); err != nil {
		t.Fatalf("compromised source with override: %v", err)
	}
}

// The parsed private key is cached: warm Sign/DecryptAsymmetric never touch
// the HSM or parse PKCS#8 again, and dropping the entry zeroes the key.
func TestCacheHoldsParsedKeys(t *testing.T) {
	ctx := context.Background()
	for _, spec := range []fsmpb.KeySpec{fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeySpec_KEY_SPEC_EC_P256, fsmpb.KeySpec_KEY_SPEC_ED25519, fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512} {
		t.Run(specName(spec), func(t *testing.T) {
			e, s := newTestEngine(t, 0)
			usage := fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY
			if spec == fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512 {
				usage = fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC
			}
			key := newSpecKey(t, e, spec, usage, 1)
			use := func() {
				var err error
				if usage == fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY {
					_, _, err = e.Sign(ctx, key, []byte("m"), MessageRaw, firstAlg(spec))
				} else {
					_, _, err = e.GenerateMac(ctx, key, []byte("m"))
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			use()
			opens := s.opens.Load()
			for range 20 {
				use()
			}
			if s.opens.Load() != opens {
				t.Fatal("warm use unwrapped again")
			}
			ent, err := e.material(ctx, key, 1)
			if err != nil {
				t.Fatal(err)
			}
			sec := ent.secret
			ent.release()
			if (sec.signer == nil) != (spec == fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512) || (sec.material == nil) == (sec.signer == nil) {
				t.Fatalf("cached form: material %d bytes, signer %T", len(sec.material), sec.signer)
			}
			e.Forget(key.KeyId)
			switch k := sec.signer.(type) {
			case *rsa.PrivateKey:
				for _, x := range append([]*big.Int{k.D, k.Precomputed.Dp, k.Precomputed.Dq, k.Precomputed.Qinv}, k.Primes...) {
					if !allZeroWords(x) {
						t.Fatal("RSA secret not zeroed")
					}
				}
			case *ecdsa.PrivateKey:
				if !allZeroWords(k.D) {
					t.Fatal("ECDSA scalar not zeroed")
				}
			case ed25519.PrivateKey:
				if !bytes.Equal(k, make([]byte, len(k))) {
					t.Fatal("Ed25519 key not zeroed")
				}
			case nil:
				if !bytes.Equal(sec.material, make([]byte, len(sec.material))) {
					t.Fatal("HMAC key not zeroed")
				}
			}
			use() // unwraps again
			if s.opens.Load() != opens+1 {
				t.Fatal("use after Forget did not unwrap")
			}
		})
	}
}

func allZeroWords(x *big.Int) bool {
	for _, w := range x.Bits() {
		if w != 0 {
			return false
		}
	}
	return true
}

// Destroyed versions never reach the Sealer, even if a (corrupt) state
// still had material for them or the rules were bypassed.
func TestDestroyedVersionNeverUnwrapped(t *testing.T) {
	ctx := context.Background()
	e, s := newTestEngine(t, 0)
	key := newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_ED25519, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, 1)
	key.Versions[0].State = destroyedV
	opens := s.opens.Load()
	_, err := e.material(ctx, key, 1)
	wantErr(t, err, ErrKeyState)
	key.Versions[0].Material = nil
	key.Versions[0].State = enabledV
	_, err = e.material(ctx, key, 1)
	wantErr(t, err, ErrUnwrap)
	if s.opens.Load() != opens {
		t.Fatal("the Sealer was asked")
	}
}

// Unwrapped material that does not fit the spec (a corrupt or foreign
// blob sealed with the right AAD) is refused and not cached.
func TestUnwrappedMaterialValidated(t *testing.T) {
	ctx := context.Background()
	e, s := newTestEngine(t, 0)
	for _, tc := range []struct {
		spec     fsmpb.KeySpec
		usage    fsmpb.KeyUsage
		material []byte
	}{
		{fsmpb.KeySpec_KEY_SPEC_AES_256, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, make([]byte, 16)},
		{fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC, make([]byte, 16)},
		{fsmpb.KeySpec_KEY_SPEC_EC_P384, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, testMaterial(t, fsmpb.KeySpec_KEY_SPEC_EC_P256, 0)},
		{fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, []byte("not pkcs8")},
	} {
		blob, _ := s.Seal(ctx, 1, tc.material, MaterialAAD("k-bad", 1, tc.spec))
		key := &fsmpb.KeyRecord{KeyId: "k-bad", Spec: tc.spec, Usage: tc.usage, State: fsmpb.KeyState_KEY_STATE_ACTIVE, PrimaryVersion: 1,
			Versions: []*fsmpb.KeyVersion{{Version: 1, State: enabledV, Material: &fsmpb.WrappedBlob{KekVersion: 1, Blob: blob}}}}
		_, err := e.material(ctx, key, 1)
		wantErr(t, err, ErrUnwrap)
		if !strings.Contains(err.Error(), "not valid "+specName(tc.spec)) {
			t.Errorf("message %q", err)
		}
		if e.CacheStats().Size != 0 {
			t.Fatal("invalid material cached")
		}
	}
}

// Concurrent Sign/Verify/MAC/Decrypt with Forget under -race.
func TestConcurrentSpecsStress(t *testing.T) {
	ctx := context.Background()
	e, _ := newTestEngine(t, 3)
	keys := []*fsmpb.KeyRecord{
		newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_EC_P256, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, 1),
		newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_ED25519, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, 1),
		newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC, 1),
		newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, 1),
		newSpecKey(t, e, fsmpb.KeySpec_KEY_SPEC_AES_256, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, 1),
	}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 40 {
				k := keys[(g+i)%len(keys)]
				msg := binary.BigEndian.AppendUint32(nil, uint32(i))
				var err error
				switch k.Spec {
				case fsmpb.KeySpec_KEY_SPEC_EC_P256, fsmpb.KeySpec_KEY_SPEC_ED25519:
					var sig []byte
					if sig, _, err = e.Sign(ctx, k, msg, MessageRaw, firstAlg(k.Spec)); err == nil {
						var ok bool
						if ok, err = e.Verify(ctx, k, 0, msg, MessageRaw, firstAlg(k.Spec), sig, false); !ok && err == nil {
							err = errors.New("signature does not verify")
						}
					}
				case fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256:
					var mac []byte
					if mac, _, err = e.GenerateMac(ctx, k, msg); err == nil {
						var ok bool
						if ok, err = e.VerifyMac(ctx, k, 0, msg, mac, false); !ok && err == nil {
							err = errors.New("mac does not verify")
						}
					}
				case fsmpb.KeySpec_KEY_SPEC_RSA_2048:
					var ct []byte
					if ct, _, err = e.EncryptAsymmetric(ctx, k, 0, msg); err == nil {
						var pt []byte
						if pt, err = e.DecryptAsymmetric(ctx, k, 0, ct, false); err == nil && !bytes.Equal(pt, msg) {
							err = errors.New("wrong plaintext")
						}
					}
				default:
					var ct []byte
					if ct, _, err = e.Encrypt(ctx, k, msg, nil); err == nil {
						_, _, _, err = e.Decrypt(ctx, lookupOf(k), ct, nil, false)
					}
				}
				if err != nil {
					t.Error(err)
					return
				}
				if i%7 == 3 {
					e.Forget(k.KeyId)
				}
			}
		})
	}
	wg.Wait()
}
