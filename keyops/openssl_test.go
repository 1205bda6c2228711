package keyops

// Interoperability with the openssl CLI. These tests never skip: without
// openssl they fail and say how to install it.

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"fmt"
	"hash"
	"os/exec"
	"strings"
	"testing"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// opensslDigest is the openssl digest name of alg's hash.
func opensslDigest(alg SigningAlgorithm) string {
	return strings.ToLower(strings.ReplaceAll(alg.hash().String(), "-", ""))
}

// opensslVerifyArgs returns the openssl command that verifies sig (file
// "sig") over in (file "in", the message or its digest) with pub.pem.
func opensslVerifyArgs(alg SigningAlgorithm, mt MessageType) []string {
	var pss []string
	if alg.pss() {
		pss = []string{"rsa_padding_mode:pss", "rsa_pss_saltlen:digest"}
	}
	if alg == ED25519 {
		return []string{"pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin", "-in", "in", "-sigfile", "sig"}
	}
	if mt == MessageRaw {
		args := []string{"dgst", "-" + opensslDigest(alg), "-verify", "pub.pem", "-signature", "sig"}
		for _, o := range pss {
			args = append(args, "-sigopt", o)
		}
		return append(args, "in")
	}
	args := []string{"pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-in", "in", "-sigfile", "sig", "-pkeyopt", "digest:" + opensslDigest(alg)}
	for _, o := range pss {
		args = append(args, "-pkeyopt", o)
	}
	return args
}

// Every signature Cabinet makes verifies with openssl, from the public key
// GetPublicKey exports; an altered message does not.
func TestOpenSSLVerifiesSignatures(t *testing.T) {
	requireOpenSSL(t)
	ctx := context.Background()
	e, _ := newTestEngine(t, 0)
	msg := []byte("signed by cabinet, verified by openssl")
	for _, spec := range signSpecs {
		key := newSpecKey(t, e, spec, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, 1)
		der, err := PublicKey(key, 0)
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		writeFile(t, dir, "pub.pem", pemBytes("PUBLIC KEY", der))
		for _, alg := range SigningAlgorithms(spec) {
			for _, mt := range []MessageType{MessageRaw, MessageDigest} {
				if alg == ED25519 && mt == MessageDigest {
					continue
				}
				name := specName(spec) + "/" + alg.String() + "/" + mt.String()
				in := signInput(alg, mt, msg)
				sig, _, err := e.Sign(ctx, key, in, mt, alg)
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				writeFile(t, dir, "in", in)
				writeFile(t, dir, "sig", sig)
				out := openssl(t, dir, opensslVerifyArgs(alg, mt)...)
				if !bytes.Contains(out, []byte("Verified")) && !bytes.Contains(out, []byte("Verified OK")) {
					t.Fatalf("%s: openssl says %q", name, out)
				}
				// The same command rejects an altered message.
				writeFile(t, dir, "in", flip(in, 0))
				cmd := exec.Command(requireOpenSSL(t), opensslVerifyArgs(alg, mt)...)
				cmd.Dir = dir
				if out, err := cmd.CombinedOutput(); err == nil {
					t.Fatalf("%s: openssl verified an altered message: %s", name, out)
				}
			}
		}
	}
}

// Keys made by openssl are imported (wrapped client side by WrapForImport)
// and then sign for openssl and verify openssl's signatures; an openssl RSA
// key decrypts openssl's OAEP ciphertext and openssl decrypts
// EncryptAsymmetric's.
func TestOpenSSLKeysImportAndInteroperate(t *testing.T) {
	requireOpenSSL(t)
	ctx := context.Background()
	e, _ := newTestEngine(t, 0)
	pubWrap, sealedWrap, err := e.NewImportKeyPair(ctx, "tok-openssl", 1)
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte("openssl and cabinet agree")
	for _, tc := range []struct {
		spec    fsmpb.KeySpec
		usage   fsmpb.KeyUsage
		genpkey []string
		alg     SigningAlgorithm
		signArg []string
	}{
		{fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, []string{"-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"}, RSASSA_PSS_SHA_512, []string{"-sha512", "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest"}},
		{fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, []string{"-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"}, RSASSA_PKCS1_V1_5_SHA_384, []string{"-sha384"}},
		{fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, []string{"-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"}, 0, nil},
		{fsmpb.KeySpec_KEY_SPEC_EC_P256, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, []string{"-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"}, ECDSA_SHA_256, []string{"-sha256"}},
		{fsmpb.KeySpec_KEY_SPEC_EC_P384, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, []string{"-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"}, ECDSA_SHA_384, []string{"-sha384"}},
		{fsmpb.KeySpec_KEY_SPEC_ED25519, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, []string{"-algorithm", "ED25519"}, ED25519, nil},
	} {
		name := specName(tc.spec) + "/" + usageName(tc.usage) + "/" + tc.alg.String()
		dir := t.TempDir()
		openssl(t, dir, append(append([]string{"genpkey"}, tc.genpkey...), "-out", "priv.pem")...)
		openssl(t, dir, "pkcs8", "-topk8", "-nocrypt", "-in", "priv.pem", "-outform", "DER", "-out", "priv.der")
		openssl(t, dir, "pkey", "-in", "priv.pem", "-pubout", "-outform", "DER", "-out", "pub.der")
		wrapped, err := WrapForImport(pubWrap, readFile(t, dir, "priv.der"))
		if err != nil {
			t.Fatal(err)
		}
		material, err := e.UnwrapImportedMaterial(ctx, "tok-openssl", sealedWrap, wrapped)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		key := &fsmpb.KeyRecord{KeyId: "k-imported", Spec: tc.spec, Usage: tc.usage, State: fsmpb.KeyState_KEY_STATE_ACTIVE, PrimaryVersion: 1}
		blob, pub, err := e.SealImportedMaterial(ctx, key.KeyId, 1, tc.spec, 1, material)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !bytes.Equal(pub, readFile(t, dir, "pub.der")) {
			t.Fatalf("%s: public key differs from openssl's", name)
		}
		key.Versions = []*fsmpb.KeyVersion{{Version: 1, Material: blob, PublicKeyDer: pub, State: enabledV}}
		e.Forget(key.KeyId)
		writeFile(t, dir, "msg", msg)

		if tc.usage == fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT {
			// Cabinet encrypts, openssl decrypts with the private key.
			ct, _, err := e.EncryptAsymmetric(ctx, key, 0, msg)
			if err != nil {
				t.Fatal(err)
			}
			writeFile(t, dir, "ct", ct)
			pt := openssl(t, dir, "pkeyutl", "-decrypt", "-inkey", "priv.pem", "-in", "ct",
				"-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256")
			if !bytes.Equal(pt, msg) {
				t.Fatalf("%s: openssl decrypted %q", name, pt)
			}
			// openssl encrypts with the private key's public half, Cabinet decrypts.
			openssl(t, dir, "pkeyutl", "-encrypt", "-inkey", "priv.pem", "-in", "msg", "-out", "ct2",
				"-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256")
			got, err := e.DecryptAsymmetric(ctx, key, 1, readFile(t, dir, "ct2"), false)
			if err != nil || !bytes.Equal(got, msg) {
				t.Fatalf("%s: DecryptAsymmetric(openssl) = %q, %v", name, got, err)
			}
			continue
		}
		// openssl signs, Cabinet verifies.
		if tc.alg == ED25519 {
			openssl(t, dir, "pkeyutl", "-sign", "-inkey", "priv.pem", "-rawin", "-in", "msg", "-out", "osig")
		} else {
			openssl(t, dir, append(append([]string{"dgst"}, tc.signArg...), "-sign", "priv.pem", "-out", "osig", "msg")...)
		}
		ok, err := e.Verify(ctx, key, 1, msg, MessageRaw, tc.alg, readFile(t, dir, "osig"), false)
		if err != nil || !ok {
			t.Fatalf("%s: Verify(openssl signature) = %v, %v", name, ok, err)
		}
		// Cabinet signs with the imported key, openssl verifies.
		sig, _, err := e.Sign(ctx, key, msg, MessageRaw, tc.alg)
		if err != nil {
			t.Fatal(err)
		}
		writeFile(t, dir, "pub.pem", pemBytes("PUBLIC KEY", pub))
		writeFile(t, dir, "in", msg)
		writeFile(t, dir, "sig", sig)
		openssl(t, dir, opensslVerifyArgs(tc.alg, MessageRaw)...)
	}
}

// RSA-OAEP-SHA256 ciphertexts made by openssl with the exported public key
// decrypt with DecryptAsymmetric, for every RSA size.
func TestOpenSSLRSAOAEPDecrypts(t *testing.T) {
	requireOpenSSL(t)
	ctx := context.Background()
	e, _ := newTestEngine(t, 0)
	for _, spec := range []fsmpb.KeySpec{fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeySpec_KEY_SPEC_RSA_3072, fsmpb.KeySpec_KEY_SPEC_RSA_4096} {
		key := newSpecKey(t, e, spec, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, 1)
		der, err := PublicKey(key, 0)
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		writeFile(t, dir, "pub.pem", pemBytes("PUBLIC KEY", der))
		limit := specs[spec].rsaBits/8 - 66
		for _, n := range []int{1, 32, limit} {
			pt := bytes.Repeat([]byte{byte(n)}, n)
			writeFile(t, dir, "pt", pt)
			openssl(t, dir, "pkeyutl", "-encrypt", "-pubin", "-inkey", "pub.pem", "-in", "pt", "-out", "ct",
				"-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256")
			got, err := e.DecryptAsymmetric(ctx, key, 0, readFile(t, dir, "ct"), false)
			if err != nil || !bytes.Equal(got, pt) {
				t.Fatalf("%s, %d bytes: %v", specName(spec), n, err)
			}
		}
		// OAEP with SHA-1 (openssl's default) is refused with the one error.
		openssl(t, dir, "pkeyutl", "-encrypt", "-pubin", "-inkey", "pub.pem", "-in", "pt", "-out", "ct1", "-pkeyopt", "rsa_padding_mode:oaep")
		_, err = e.DecryptAsymmetric(ctx, key, 0, readFile(t, dir, "ct1"), false)
		if err == nil || err.Error() != errAsymDecryptFailed.Error() {
			t.Fatalf("%s: SHA-1 OAEP: %v", specName(spec), err)
		}
	}
}

// KeyWrapPad gives openssl's id-aes*-wrap-pad bytes and unwraps them.
func TestOpenSSLKeyWrapPad(t *testing.T) {
	requireOpenSSL(t)
	dir := t.TempDir()
	for _, kekLen := range []int{16, 24, 32} {
		kek := seq(byte(kekLen), kekLen)
		cipher := fmt.Sprintf("-id-aes%d-wrap-pad", kekLen*8)
		for _, n := range []int{1, 7, 8, 9, 16, 20, 33, 1218} {
			pt := seq(byte(n), n)
			writeFile(t, dir, "pt", pt)
			want := openssl(t, dir, "enc", cipher, "-K", hex.EncodeToString(kek), "-iv", "A65959A6", "-in", "pt")
			got, err := KeyWrapPad(kek, pt)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("%s, %d bytes: KeyWrapPad = %x, %v; openssl %x", cipher, n, got, err, want)
			}
			writeFile(t, dir, "ct", got)
			back := openssl(t, dir, "enc", "-d", cipher, "-K", hex.EncodeToString(kek), "-iv", "A65959A6", "-in", "ct")
			if !bytes.Equal(back, pt) {
				t.Fatalf("%s: openssl unwrapped %x", cipher, back)
			}
		}
	}
}

// BYOK done entirely with openssl on the client side, as AWS KMS documents
// for RSA_AES_KEY_WRAP_SHA_256: openssl rand for the AES key, pkeyutl
// RSA-OAEP-SHA256 for it, enc -id-aes256-wrap-pad for the material.
func TestOpenSSLWrapsForImport(t *testing.T) {
	requireOpenSSL(t)
	ctx := context.Background()
	e, _ := newTestEngine(t, 0)
	pub, sealed, err := e.NewImportKeyPair(ctx, "tok-1", 1)
	if err != nil {
		t.Fatal(err)
	}
	for _, spec := range []fsmpb.KeySpec{fsmpb.KeySpec_KEY_SPEC_AES_256, fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512, fsmpb.KeySpec_KEY_SPEC_EC_P384} {
		dir := t.TempDir()
		material := testMaterial(t, spec, 0)
		writeFile(t, dir, "wrap.pem", pemBytes("PUBLIC KEY", pub))
		writeFile(t, dir, "material", material)
		openssl(t, dir, "rand", "-out", "aes.key", "32")
		aesKey := readFile(t, dir, "aes.key")
		openssl(t, dir, "pkeyutl", "-encrypt", "-pubin", "-inkey", "wrap.pem", "-in", "aes.key", "-out", "wk",
			"-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256")
		openssl(t, dir, "enc", "-id-aes256-wrap-pad", "-K", hex.EncodeToString(aesKey), "-iv", "A65959A6", "-in", "material", "-out", "wm")
		wrapped := append(readFile(t, dir, "wk"), readFile(t, dir, "wm")...)
		got, err := e.UnwrapImportedMaterial(ctx, "tok-1", sealed, wrapped)
		if err != nil || !bytes.Equal(got, material) {
			t.Fatalf("%s: UnwrapImportedMaterial(openssl-wrapped) = %v", specName(spec), err)
		}
		if _, _, err := e.SealImportedMaterial(ctx, "k-x", 1, spec, 1, got); err != nil {
			t.Fatal(err)
		}
	}
}

// GenerateMac equals openssl's HMAC with the same (imported) key.
func TestOpenSSLHMAC(t *testing.T) {
	requireOpenSSL(t)
	ctx := context.Background()
	e, _ := newTestEngine(t, 0)
	dir := t.TempDir()
	msg := []byte("mac me")
	writeFile(t, dir, "msg", msg)
	for _, tc := range []struct {
		spec   fsmpb.KeySpec
		keyLen int
		digest string
	}{
		{fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, 32, "-sha256"}, {fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, 64, "-sha256"},
		{fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512, 64, "-sha512"}, {fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512, 128, "-sha512"},
	} {
		material := seq(7, tc.keyLen)
		key := importedKey(t, e, tc.spec, fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC, bytes.Clone(material))
		mac, _, err := e.GenerateMac(ctx, key, msg)
		if err != nil {
			t.Fatal(err)
		}
		want := openssl(t, dir, "dgst", tc.digest, "-mac", "HMAC", "-macopt", "hexkey:"+hex.EncodeToString(material), "-binary", "msg")
		if !bytes.Equal(mac, want) {
			t.Fatalf("%s/%d: GenerateMac %x, openssl %x", specName(tc.spec), tc.keyLen, mac, want)
		}
		h := hmac.New(map[bool]func() hash.Hash{true: sha256.New, false: sha512.New}[tc.spec == fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256], material)
		h.Write(msg)
		if !bytes.Equal(h.Sum(nil), mac) {
			t.Fatal("crypto/hmac disagrees")
		}
	}
}
