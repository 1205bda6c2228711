package integration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestMakeCluster runs the README's first command the way a new user does
// (scripts/cluster.sh, what `make cluster` runs) in a private run dir and
// port range: up, use it with the printed environment, down, up again (the
// same keys), clean.
func TestMakeCluster(t *testing.T) {
	requireSoftHSM(t)
	runDir := t.TempDir()
	base := 20000 + 1000*rand.IntN(10) // below the ephemeral range; ports base+1..3, +101..103, +201..203
	script := filepath.Join("..", "scripts", "cluster.sh")
	env := append(os.Environ(), "CABINET_RUN_DIR="+runDir, fmt.Sprintf("CABINET_BASE_PORT=%d", base))
	run := func(args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, script, args...)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("cluster.sh %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	t.Cleanup(func() {
		cmd := exec.Command(script, "clean")
		cmd.Env = env
		_ = cmd.Run()
	})
	out := run("up")
	if !strings.Contains(out, "Cabinet is running") || !strings.Contains(out, "export CABINET_CLIENT_CERT=") {
		t.Fatalf("up did not print the environment:\n%s", out)
	}
	// The printed environment (also in RUN/env) is all a user needs.
	userEnv := os.Environ()
	b, err := os.ReadFile(filepath.Join(runDir, "env"))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if kv, ok := strings.CutPrefix(line, "export "); ok && strings.HasPrefix(kv, "CABINET_") {
			userEnv = append(userEnv, kv)
		}
	}
	bin := filepath.Join("..", ".run", "bin", "cabinet")
	cli := func(stdin string, args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Env = userEnv
		cmd.Stdin = strings.NewReader(stdin)
		o, err := cmd.CombinedOutput()
		return string(o), err
	}
	if o, err := cli("", "key", "create", "--spec", "AES_256", "--alias", "demo"); err != nil {
		t.Fatalf("key create: %v\n%s", err, o)
	}
	ct, err := cli("hello", "key", "encrypt", "--key", "demo", "--context", "app=demo")
	if err != nil {
		t.Fatalf("encrypt: %v\n%s", err, ct)
	}
	third := fmt.Sprintf("127.0.0.1:%d", base+3)
	if pt, err := cli(ct, "key", "decrypt", "--context", "app=demo", "--addr", third); err != nil || pt != "hello" {
		t.Fatalf("decrypt via node 3: %v %q", err, pt)
	}
	run("down")
	if _, err := cli(ct, "key", "decrypt", "--context", "app=demo", "--timeout", "2s"); err == nil {
		t.Fatal("decrypt succeeded with the cluster down")
	}
	run("up")
	waitFor(t, 30*time.Second, "the resumed cluster decrypts the old ciphertext", func() error {
		pt, err := cli(ct, "key", "decrypt", "--context", "app=demo", "--addr", third)
		if err != nil || pt != "hello" {
			return fmt.Errorf("%v %q", err, pt)
		}
		return nil
	})
}
