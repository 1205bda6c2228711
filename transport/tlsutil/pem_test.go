package tlsutil

import (
	"crypto/ecdsa"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestPEMRoundTrip(t *testing.T) {
	p := newTestPKI(t, "c1")
	dir := t.TempDir()
	key, csr, _ := NewNodeKey("n1")
	der, err := p.ca.IssueNode(csr, "n1", loopback, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := filepath.Join(dir, "node.crt"), filepath.Join(dir, "node.key")
	if err := WriteCertPEM(certFile, der, p.ca.CertDER); err != nil {
		t.Fatal(err)
	}
	if err := WriteKeyPEM(keyFile, key); err != nil {
		t.Fatal(err)
	}
	assertMode(t, certFile, 0o644)
	assertMode(t, keyFile, 0o600)

	certs, err := ReadCertPEM(certFile)
	if err != nil {
		t.Fatal(err)
	}
	if len(certs) != 2 || certs[0].Subject.CommonName != "n1" || !certs[1].IsCA {
		t.Fatalf("ReadCertPEM returned %d certificates", len(certs))
	}
	got, err := ReadKeyPEM(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Public().(*ecdsa.PublicKey).Equal(key.Public()) {
		t.Error("key read back differs")
	}
	kp, err := LoadKeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if len(kp.Certificate) != 2 || kp.Leaf == nil {
		t.Errorf("LoadKeyPair chain length %d, leaf %v", len(kp.Certificate), kp.Leaf)
	}
}

func TestWriteKeyPEMReplacesLooseFile(t *testing.T) {
	keyFile := filepath.Join(t.TempDir(), "k.pem")
	if err := os.WriteFile(keyFile, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	key, _, _ := NewNodeKey("n1")
	if err := WriteKeyPEM(keyFile, key); err != nil {
		t.Fatal(err)
	}
	assertMode(t, keyFile, 0o600)
	if _, err := ReadKeyPEM(keyFile); err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(filepath.Dir(keyFile))
	if len(entries) != 1 {
		t.Errorf("directory holds %d entries, want only the key (no temporary files)", len(entries))
	}
}

func TestKeyFilePerms(t *testing.T) {
	dir := t.TempDir()
	key, _, _ := NewNodeKey("n1")
	keyFile := filepath.Join(dir, "k.pem")
	if err := WriteKeyPEM(keyFile, key); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		mode os.FileMode
		ok   bool
	}{
		{0o600, true},
		{0o400, true},
		{0o640, false},
		{0o604, false},
		{0o644, false},
		{0o620, false},
	} {
		if err := os.Chmod(keyFile, tt.mode); err != nil {
			t.Fatal(err)
		}
		err := CheckKeyFilePerms(keyFile)
		if tt.ok != (err == nil) {
			t.Errorf("mode %04o: CheckKeyFilePerms = %v, want ok=%v", tt.mode, err, tt.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "chmod 600") {
			t.Errorf("mode %04o: error %q does not say chmod 600", tt.mode, err)
		}
		if _, rerr := ReadKeyPEM(keyFile); (rerr == nil) != tt.ok {
			t.Errorf("mode %04o: ReadKeyPEM = %v, want ok=%v", tt.mode, rerr, tt.ok)
		}
	}
	if err := CheckKeyFilePerms(dir); err == nil {
		t.Error("directory accepted as key file")
	}
	if err := CheckKeyFilePerms(filepath.Join(dir, "missing")); err == nil {
		t.Error("missing file accepted")
	}
}

func TestReadPEMRefusesWrongBlocks(t *testing.T) {
	dir := t.TempDir()
	key, _, _ := NewNodeKey("n1")
	keyFile := filepath.Join(dir, "k.pem")
	if err := WriteKeyPEM(keyFile, key); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadCertPEM(keyFile); err == nil || !strings.Contains(err.Error(), "PRIVATE KEY") {
		t.Errorf("ReadCertPEM of a key file = %v", err)
	}
	empty := filepath.Join(dir, "empty.pem")
	if err := os.WriteFile(empty, []byte("hello\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadCertPEM(empty); err == nil {
		t.Error("ReadCertPEM accepted a file without certificates")
	}
	if _, err := ReadKeyPEM(empty); err == nil {
		t.Error("ReadKeyPEM accepted a file without a key")
	}
}

func assertMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != want {
		t.Errorf("%s mode %04o, want %04o", filepath.Base(path), got, want)
	}
}
