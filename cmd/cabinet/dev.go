package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strings"

	"github.com/cabinet-kms/cabinet/internal/testcluster"
)

// devDefaultAddr is where `cabinet server --dev` listens by default.
const devDefaultAddr = "127.0.0.1:8200"

// checkDevAddr accepts only IP:port on a loopback address: a dev server
// holds its keys in process memory and must never be reachable from
// another machine.
func checkDevAddr(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--dev-addr %q: want IP:port on a loopback address, e.g. %s", addr, devDefaultAddr)
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("--dev-addr %q: a dev server binds only loopback addresses (127.0.0.0/8 or ::1); for anything reachable from elsewhere run a real cluster (make cluster, docs/GETTING-STARTED.md)", addr)
	}
	return nil
}

// runDevServer runs a single-node cluster in this process with an in-memory
// HSM and a throw-away data directory, prints the client environment, and
// serves until ctx ends; then everything is gone. It keeps mutual TLS and the
// roles: it writes an admin certificate and prints where it is, so there is
// no unauthenticated code path in the server (a departure from
// ../shared/DESIGN.md's "no TLS", see README).
func runDevServer(ctx context.Context, stdout, stderr io.Writer, f *serverFlags) error {
	if err := checkDevAddr(f.devAddr); err != nil {
		return err
	}
	if f.dataDir != "" {
		return fmt.Errorf("--dev uses a temporary data dir and an in-memory HSM and keeps nothing; drop --data-dir (or drop --dev to run a real node)")
	}
	log, err := newLogger(f.logLevel, f.logFormat)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "cabinet-dev-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	c, err := testcluster.New(testcluster.Config{Nodes: 1, Dir: dir, APIAddr: f.devAddr, Logger: log, Audit: true})
	if err != nil {
		return fmt.Errorf("start the dev server: %w", err)
	}
	defer c.Close()
	fmt.Fprintf(stderr, `
==> Cabinet DEV server: one node, in-memory HSM, data in %s.
    Every key is lost when it stops. Never use it for real keys.
    In another shell, paste the lines below, then try:
      cabinet key create --spec AES_256 --alias demo
      echo -n hello | cabinet key encrypt --key demo > ct.b64
      cabinet key decrypt --in ct.b64
    Stop with Ctrl-C.

`, dir)
	for _, kv := range c.Env() {
		k, v, _ := strings.Cut(kv, "=")
		fmt.Fprintf(stdout, "export %s=%s\n", k, v)
	}
	<-ctx.Done()
	fmt.Fprintln(stderr, "==> dev server stopping; its keys are gone")
	return nil
}
