package keyops

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"google.golang.org/protobuf/proto"
)

// allSpecs lists every supported key spec.
var allSpecs = []fsmpb.KeySpec{
	fsmpb.KeySpec_KEY_SPEC_AES_256,
	fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512,
	fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeySpec_KEY_SPEC_RSA_3072, fsmpb.KeySpec_KEY_SPEC_RSA_4096,
	fsmpb.KeySpec_KEY_SPEC_EC_P256, fsmpb.KeySpec_KEY_SPEC_EC_P384,
	fsmpb.KeySpec_KEY_SPEC_ED25519,
}

// specUsage is a valid (spec, usage) combination.
type specUsage struct {
	spec  fsmpb.KeySpec
	usage fsmpb.KeyUsage
}

func (c specUsage) String() string { return specName(c.spec) + "/" + usageName(c.usage) }

// validCombos lists every valid (spec, usage), written out (not derived
// from the package's table).
var validCombos = []specUsage{
	{fsmpb.KeySpec_KEY_SPEC_AES_256, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT},
	{fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC},
	{fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512, fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC},
	{fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT},
	{fsmpb.KeySpec_KEY_SPEC_RSA_2048, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY},
	{fsmpb.KeySpec_KEY_SPEC_RSA_3072, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT},
	{fsmpb.KeySpec_KEY_SPEC_RSA_3072, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY},
	{fsmpb.KeySpec_KEY_SPEC_RSA_4096, fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT},
	{fsmpb.KeySpec_KEY_SPEC_RSA_4096, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY},
	{fsmpb.KeySpec_KEY_SPEC_EC_P256, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY},
	{fsmpb.KeySpec_KEY_SPEC_EC_P384, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY},
	{fsmpb.KeySpec_KEY_SPEC_ED25519, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY},
}

var (
	enabledV   = fsmpb.KeyVersionState_KEY_VERSION_STATE_ENABLED
	disabledV  = fsmpb.KeyVersionState_KEY_VERSION_STATE_DISABLED
	destroyedV = fsmpb.KeyVersionState_KEY_VERSION_STATE_DESTROYED
)

// Test private keys are generated once per test binary (RSA-4096 takes
// about a second under -race) and handed out as fresh PKCS#8 copies.
var keyPool struct {
	mu sync.Mutex
	m  map[string][]byte
}

// poolSize is how many distinct keys tests use per spec: RSA-3072/4096
// keys are shared by all versions (the AAD still makes each blob distinct).
func poolSize(spec fsmpb.KeySpec) int {
	switch spec {
	case fsmpb.KeySpec_KEY_SPEC_RSA_3072, fsmpb.KeySpec_KEY_SPEC_RSA_4096:
		return 1
	}
	return 8
}

// testMaterial returns a copy of the i-th test material of spec: random
// bytes of the generated length for symmetric specs, PKCS#8 for
// asymmetric ones.
func testMaterial(tb testing.TB, spec fsmpb.KeySpec, i int) []byte {
	tb.Helper()
	i %= poolSize(spec)
	keyPool.mu.Lock()
	defer keyPool.mu.Unlock()
	if keyPool.m == nil {
		keyPool.m = map[string][]byte{}
	}
	name := fmt.Sprintf("%s/%d", spec, i)
	if m, ok := keyPool.m[name]; ok {
		return bytes.Clone(m)
	}
	s := specs[spec]
	var m []byte
	var priv any
	var err error
	switch {
	case s.symmetric():
		m = make([]byte, s.genLen)
		rand.Read(m)
	case s.rsaBits > 0:
		priv, err = rsa.GenerateKey(rand.Reader, s.rsaBits)
	case s.curve != nil:
		priv, err = ecdsa.GenerateKey(s.curve, rand.Reader)
	default:
		_, priv, err = ed25519.GenerateKey(rand.Reader)
	}
	if err != nil {
		tb.Fatal(err)
	}
	if priv != nil {
		if m, err = x509.MarshalPKCS8PrivateKey(priv); err != nil {
			tb.Fatal(err)
		}
	}
	keyPool.m[name] = m
	return bytes.Clone(m)
}

// testSigner parses test material i of an asymmetric spec.
func testSigner(tb testing.TB, spec fsmpb.KeySpec, i int) crypto.Signer {
	tb.Helper()
	k, err := x509.ParsePKCS8PrivateKey(testMaterial(tb, spec, i))
	if err != nil {
		tb.Fatal(err)
	}
	return k.(crypto.Signer)
}

// newSpecKey builds an ACTIVE key of spec and usage with n enabled
// versions 1..n (version v holds test material v-1), the last primary,
// sealed under KEK version 1 through SealImportedMaterial.
func newSpecKey(tb testing.TB, e *Engine, spec fsmpb.KeySpec, usage fsmpb.KeyUsage, n int) *fsmpb.KeyRecord {
	tb.Helper()
	id, err := NewKeyID()
	if err != nil {
		tb.Fatal(err)
	}
	k := &fsmpb.KeyRecord{KeyId: id, Spec: spec, Usage: usage, State: fsmpb.KeyState_KEY_STATE_ACTIVE}
	for range n {
		addSpecVersion(tb, e, k)
	}
	return k
}

// addSpecVersion rotates k with the next test material.
func addSpecVersion(tb testing.TB, e *Engine, k *fsmpb.KeyRecord) uint32 {
	tb.Helper()
	v := uint32(len(k.Versions) + 1)
	blob, pub, err := e.SealImportedMaterial(context.Background(), k.KeyId, v, k.Spec, 1, testMaterial(tb, k.Spec, int(v-1)))
	if err != nil {
		tb.Fatalf("SealImportedMaterial(%s): %v", specName(k.Spec), err)
	}
	k.Versions = append(k.Versions, &fsmpb.KeyVersion{Version: v, Material: blob, PublicKeyDer: pub, State: enabledV})
	k.PrimaryVersion = v
	return v
}

func cloneKey(k *fsmpb.KeyRecord) *fsmpb.KeyRecord { return proto.Clone(k).(*fsmpb.KeyRecord) }

// withPrimary returns a copy of k whose primary version is v.
func withPrimary(k *fsmpb.KeyRecord, v uint32) *fsmpb.KeyRecord {
	c := cloneKey(k)
	c.PrimaryVersion = v
	return c
}

// firstAlg is a signing algorithm the spec signs with.
func firstAlg(spec fsmpb.KeySpec) SigningAlgorithm {
	if a := SigningAlgorithms(spec); len(a) > 0 {
		return a[0]
	}
	return RSASSA_PSS_SHA_256
}

// requireOpenSSL returns the path of the openssl CLI; the interop tests
// must run, so a missing openssl fails them.
func requireOpenSSL(tb testing.TB) string {
	tb.Helper()
	p, err := exec.LookPath("openssl")
	if err != nil {
		tb.Fatalf("openssl CLI not found (%v); the interop tests need it: apt-get install -y openssl", err)
	}
	return p
}

// openssl runs the openssl CLI in dir and returns stdout.
func openssl(tb testing.TB, dir string, args ...string) []byte {
	tb.Helper()
	cmd := exec.Command(requireOpenSSL(tb), args...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		tb.Fatalf("openssl %v: %v\n%s%s", args, err, stdout.String(), stderr.String())
	}
	return stdout.Bytes()
}

// writeFile writes b to dir/name and returns name.
func writeFile(tb testing.TB, dir, name string, b []byte) string {
	tb.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
		tb.Fatal(err)
	}
	return name
}

func readFile(tb testing.TB, dir, name string) []byte {
	tb.Helper()
	b, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

func pemBytes(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// importedKey builds an ACTIVE key with one version holding material
// (sealed by SealImportedMaterial, which zeroes it).
func importedKey(tb testing.TB, e *Engine, spec fsmpb.KeySpec, usage fsmpb.KeyUsage, material []byte) *fsmpb.KeyRecord {
	tb.Helper()
	id, err := NewKeyID()
	if err != nil {
		tb.Fatal(err)
	}
	blob, pub, err := e.SealImportedMaterial(context.Background(), id, 1, spec, 1, material)
	if err != nil {
		tb.Fatalf("SealImportedMaterial(%s): %v", specName(spec), err)
	}
	return &fsmpb.KeyRecord{KeyId: id, Spec: spec, Usage: usage, State: fsmpb.KeyState_KEY_STATE_ACTIVE, PrimaryVersion: 1,
		Versions: []*fsmpb.KeyVersion{{Version: 1, Material: blob, PublicKeyDer: pub, State: enabledV}}}
}
