// Package softhsmtest creates throw-away SoftHSM2 tokens for tests, one per simulated node.
//
// Every token gets its own directory, softhsm2.conf and copy of libsofthsm2.so: a process
// loads one instance of a library per path and SoftHSM reads SOFTHSM2_CONF once, at
// C_Initialize, so two tokens in one test process need two library paths. The returned config
// carries ConfigPath, which hsm.OpenPKCS11 puts into SOFTHSM2_CONF just for C_Initialize.
package softhsmtest

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/cabinet-kms/cabinet/hsm"
)

const (
	// PIN and SOPIN are the user and security-officer PINs of every test token.
	PIN   = "1234-user"
	SOPIN = "5678-so"

	installHint = "SoftHSM2 is required for these tests: apt-get install -y softhsm2"
)

// NewToken initialises a fresh SoftHSM token labelled label in a temporary directory and
// returns a config for hsm.OpenPKCS11. It fails the test (never skips) when SoftHSM is missing.
func NewToken(t testing.TB, label string) hsm.PKCS11Config {
	t.Helper()
	util, err := exec.LookPath("softhsm2-util")
	if err != nil {
		t.Fatalf("softhsmtest: softhsm2-util not found (%v). %s", err, installHint)
	}
	if _, err := os.Stat(hsm.DefaultLibrary); err != nil {
		t.Fatalf("softhsmtest: %v. %s", err, installHint)
	}
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		t.Fatalf("softhsmtest: %v", err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	confText := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens)
	if err := os.WriteFile(conf, []byte(confText), 0o600); err != nil {
		t.Fatalf("softhsmtest: %v", err)
	}
	lib := filepath.Join(dir, "libsofthsm2.so")
	if err := copyFile(hsm.DefaultLibrary, lib); err != nil {
		t.Fatalf("softhsmtest: copy library: %v. %s", err, installHint)
	}
	cmd := exec.Command(util, "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SOPIN)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("softhsmtest: softhsm2-util --init-token: %v: %s", err, out)
	}
	return hsm.PKCS11Config{
		Library:    lib,
		TokenLabel: label,
		PIN:        PIN,
		SOPIN:      SOPIN,
		ConfigPath: conf,
	}
}

// TokenDir returns the SoftHSM token directory (directories.tokendir) of a config made by
// NewToken, e.g. to simulate an outage by moving it away.
func TokenDir(cfg hsm.PKCS11Config) string {
	return filepath.Join(filepath.Dir(cfg.ConfigPath), "tokens")
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
