package main

import (
	"bytes"
	"context"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cabinet-kms/cabinet/client"
	"github.com/cabinet-kms/cabinet/internal/testcluster"
	"github.com/cabinet-kms/cabinet/internal/testport"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

func TestCheckDevAddr(t *testing.T) {
	for addr, ok := range map[string]bool{
		"127.0.0.1:8200": true, "127.0.0.2:1": true, "[::1]:8200": true,
		"0.0.0.0:8200": false, "10.1.2.3:8200": false, "[::]:8200": false, "localhost:8200": false, "8200": false, "": false,
	} {
		if err := checkDevAddr(addr); (err == nil) != ok {
			t.Errorf("checkDevAddr(%q) = %v, want ok=%v", addr, err, ok)
		}
	}
}

// TestDevServer: `server --dev` serves keys on the loopback address it was
// given with the credentials it prints, and removes its data at exit.
func TestDevServer(t *testing.T) {
	addr := freeLoopbackAddr(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr syncBuffer
	done := make(chan error, 1)
	go func() {
		done <- runDevServer(ctx, &stdout, &stderr, &serverFlags{devAddr: addr, logLevel: "warn", logFormat: "text"})
	}()
	env := map[string]string{}
	deadline := time.Now().Add(60 * time.Second)
	for len(env) < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("no environment printed; stderr:\n%s", stderr.String())
		}
		select {
		case err := <-done:
			t.Fatalf("dev server exited: %v\n%s", err, stderr.String())
		case <-time.After(50 * time.Millisecond):
		}
		for _, line := range strings.Split(stdout.String(), "\n") {
			if k, v, ok := strings.Cut(strings.TrimPrefix(line, "export "), "="); ok {
				env[k] = v
			}
		}
	}
	if env["CABINET_ADDR"] != addr {
		t.Fatalf("CABINET_ADDR = %q, want %q", env["CABINET_ADDR"], addr)
	}
	c, err := client.New([]string{addr}, client.WithTLSFiles(env["CABINET_CACERT"], env["CABINET_CLIENT_CERT"], env["CABINET_CLIENT_KEY"]))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
	defer ccancel()
	k, err := c.CreateKey(cctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256})
	if err != nil {
		t.Fatal(err)
	}
	ct, err := c.Encrypt(cctx, k.GetKeyId(), []byte("hello"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if pt, err := c.Decrypt(cctx, ct, nil); err != nil || string(pt) != "hello" {
		t.Fatalf("decrypt: %q %v", pt, err)
	}
	dir := env["CABINET_CACERT"][:strings.Index(env["CABINET_CACERT"], "/admin/")]
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("dev server did not stop")
	}
	if _, err := os.Stat(dir); err == nil {
		t.Fatalf("dev data dir %s left behind", dir)
	}
	if !bytes.Contains([]byte(stderr.String()), []byte("in-memory HSM")) {
		t.Fatalf("no dev banner on stderr:\n%s", stderr.String())
	}
}

// freeLoopbackAddr returns a 127.0.0.1 address to bind later
// (internal/testport).
func freeLoopbackAddr(t *testing.T) string { return testport.Addr(t) }

// syncBuffer is a bytes.Buffer safe for one writer and concurrent readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestCLIAddrList: with a comma-separated --addr, ordinary commands fail
// over past a node that does not answer; alone, that node's address fails
// with a clear Unavailable.
func TestCLIAddrList(t *testing.T) {
	tc := testcluster.Start(t, testcluster.Config{Nodes: 1})
	dead := freeLoopbackAddr(t)
	creds := []string{"--ca-cert", tc.CAFile(), "--client-cert", tc.AdminCertFile(), "--client-key", tc.AdminKeyFile(), "--timeout", "20s"}
	out, stderr, err := runCabinet(t, nil, append([]string{"key", "create", "--spec", "AES_256", "--alias", "via-list", "--addr", dead + "," + tc.Endpoint(0)}, creds...)...)
	if err != nil || !strings.Contains(out, "via-list") {
		t.Fatalf("key create through [dead, live]: %v\n%s%s", err, out, stderr)
	}
	out, stderr, err = runCabinet(t, nil, append([]string{"operator", "kek", "status", "--addr", dead + "," + tc.Endpoint(0)}, creds...)...)
	if err != nil || !strings.Contains(out, "Current KEK version: 1") {
		t.Fatalf("kek status through [dead, live]: %v\n%s%s", err, out, stderr)
	}
	_, _, err = runCabinet(t, nil, append([]string{"key", "list", "--addr", dead, "--timeout", "2s"}, creds...)...)
	if err == nil || !strings.Contains(err.Error(), "Unavailable") {
		t.Fatalf("key list through a dead node alone: %v, want Unavailable", err)
	}
}

func TestParseMemoryLimit(t *testing.T) {
	cg := func(v string) func(string) ([]byte, error) {
		return func(string) ([]byte, error) { return []byte(v), nil }
	}
	noCG := func(string) ([]byte, error) { return nil, os.ErrNotExist }
	for _, c := range []struct {
		in   string
		read func(string) ([]byte, error)
		want int64
		bad  bool
	}{
		{"", noCG, 0, false},
		{"1200MiB", noCG, 1200 << 20, false},
		{"1.5GiB", noCG, 3 << 29, false},
		{"2GB", noCG, 2e9, false},
		{"134217728", noCG, 128 << 20, false},
		{"auto", noCG, 0, false},
		{"auto", cg("max\n"), 0, false},
		{"auto", cg("2147483648\n"), 2147483648 / 10 * 9, false},
		{"auto", cg("lots"), 0, true},
		{"10MiB", noCG, 0, true},
		{"-1GiB", noCG, 0, true},
		{"1.2 TB", noCG, 0, true},
		{"many", noCG, 0, true},
	} {
		got, err := parseMemoryLimit(c.in, c.read)
		if (err != nil) != c.bad || got != c.want {
			t.Errorf("parseMemoryLimit(%q) = %d, %v; want %d, error %v", c.in, got, err, c.want, c.bad)
		}
	}
}
