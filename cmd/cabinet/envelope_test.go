package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cabinet-kms/cabinet/client"
	"github.com/cabinet-kms/cabinet/internal/testcluster"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// runCabinet runs the CLI in-process with the given stdin.
func runCabinet(t *testing.T, stdin []byte, args ...string) (string, string, error) {
	t.Helper()
	root := newRootCmd()
	var out, errb bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errb)
	root.SetIn(bytes.NewReader(stdin))
	root.SetArgs(args)
	err := root.ExecuteContext(context.Background())
	return out.String(), errb.String(), err
}

func TestEncryptDecryptFile(t *testing.T) {
	tc := testcluster.Start(t, testcluster.Config{})
	conn := []string{"--addr", strings.Join(tc.Endpoints(), ","), "--ca-cert", tc.CAFile(),
		"--client-cert", tc.AdminCertFile(), "--client-key", tc.AdminKeyFile()}
	c, err := client.New(tc.Endpoints(), client.WithTLSFiles(tc.CAFile(), tc.AdminCertFile(), tc.AdminKeyFile()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	key, err := c.CreateKey(context.Background(), &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, Alias: "files"})
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	plain := filepath.Join(dir, "data.bin")
	sealed := filepath.Join(dir, "data.cab")
	opened := filepath.Join(dir, "data.out")
	data := make([]byte, 9<<20+5)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(plain, data, 0o600); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	stdout, stderr, err := runCabinet(t, nil, append([]string{"encrypt-file", "--key", "files", "--context", "app=test", "--progress", "always", plain, sealed}, conn...)...)
	elapsed := time.Since(start)
	if err != nil {
		t.Fatalf("encrypt-file: %v\n%s", err, stderr)
	}
	if !strings.Contains(stdout, "encrypted "+plain+" (9.0 MiB) to "+sealed) {
		t.Errorf("encrypt-file printed %q", stdout)
	}
	if !strings.Contains(stderr, "/ 9.0 MiB (100%) done") {
		t.Errorf("no final progress line on stderr: %q", stderr)
	}
	// At most ~10 redraws a second (plus the first and the final one).
	if redraws, limit := strings.Count(stderr, "\r"), int(elapsed/progressInterval)+2; redraws > limit {
		t.Errorf("%d progress redraws in %v, want at most %d", redraws, elapsed, limit)
	}
	if st, err := os.Stat(sealed); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("sealed file: %v, %v", st, err)
	}

	// OUT exists: refused without --force, replaced with it.
	if err := os.WriteFile(opened, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := runCabinet(t, nil, append([]string{"decrypt-file", "--context", "app=test", sealed, opened}, conn...)...); err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("decrypt-file over an existing file: %v", err)
	}
	if b, _ := os.ReadFile(opened); string(b) != "keep me" {
		t.Fatal("existing OUT was changed without --force")
	}
	if _, stderr, err := runCabinet(t, nil, append([]string{"decrypt-file", "--force", "--context", "app=test", sealed, opened}, conn...)...); err != nil {
		t.Fatalf("decrypt-file --force: %v\n%s", err, stderr)
	}
	if b, err := os.ReadFile(opened); err != nil || !bytes.Equal(b, data) {
		t.Fatalf("decrypted file differs: %v", err)
	}

	// Failures leave no OUT and no temporary file behind.
	tampered := filepath.Join(dir, "tampered.cab")
	b, err := os.ReadFile(sealed)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 1
	if err := os.WriteFile(tampered, b, 0o600); err != nil {
		t.Fatal(err)
	}
	for name, args := range map[string][]string{
		"tampered":        {"decrypt-file", "--context", "app=test", tampered, filepath.Join(dir, "t.out")},
		"wrong context":   {"decrypt-file", "--context", "app=other", sealed, filepath.Join(dir, "w.out")},
		"missing context": {"decrypt-file", sealed, filepath.Join(dir, "m.out")},
		"unknown key":     {"encrypt-file", "--key", "nope", plain, filepath.Join(dir, "u.cab")},
		"no key":          {"encrypt-file", plain, filepath.Join(dir, "n.cab")},
		"not an envelope": {"decrypt-file", plain, filepath.Join(dir, "p.out")},
	} {
		if _, _, err := runCabinet(t, nil, append(args, conn...)...); err == nil {
			t.Errorf("%s: succeeded", name)
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if got := strings.Join(names, " "); got != "data.bin data.cab data.out tampered.cab" {
		t.Errorf("directory holds %s", got)
	}

	// - is stdin/stdout; no summary is printed then.
	sealedOut, _, err := runCabinet(t, []byte("small secret"), append([]string{"encrypt-file", "-k", key.GetKeyId(), "-", "-"}, conn...)...)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(sealedOut, "CABENV") {
		t.Fatalf("stdout is not an envelope: %q", sealedOut)
	}
	plainOut, _, err := runCabinet(t, []byte(sealedOut), append([]string{"decrypt-file", "-", "-"}, conn...)...)
	if err != nil || plainOut != "small secret" {
		t.Fatalf("decrypt-file - -: %q, %v", plainOut, err)
	}
}

func TestProgressBarRateLimited(t *testing.T) {
	var buf bytes.Buffer
	clock := time.Unix(0, 0)
	p := newProgressBar(&buf, "encrypting", 1000)
	p.now = func() time.Time { return clock }
	for range 1000 { // one second of 1-byte reads, 1ms apart
		clock = clock.Add(time.Millisecond)
		p.add(1)
	}
	p.finish(true)
	if n := strings.Count(buf.String(), "\r"); n < 9 || n > 12 {
		t.Errorf("%d redraws in one second, want about 10", n)
	}
	if !strings.HasSuffix(buf.String(), "1000 B / 1000 B (100%) done\n") {
		t.Errorf("final line %q", buf.String()[strings.LastIndex(buf.String(), "\r"):])
	}
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 9<<20 + 5: "9.0 MiB", 3 << 30: "3.0 GiB"} {
		if got := humanBytes(n); got != want {
			t.Errorf("humanBytes(%d) = %q, want %q", n, got, want)
		}
	}
}
