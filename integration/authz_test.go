package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestAuthorizationOnRealCluster: a certificate issued through the CLI, a
// per-key grant with a context constraint, a cluster-wide denial that stops
// the principal on every node, and audit chains that verify on every node
// and detect tampering.
func TestAuthorizationOnRealCluster(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startThree(t)
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]
	svcDir := filepath.Join(c.root, "svc")
	c.mustCLI(nil, "operator", "cert", "issue", "--name", "svc", "--role", "client", "--out", svcDir, "--addr", n2.apiAddr)
	var k keyView
	if err := json.Unmarshal([]byte(c.mustCLI(nil, "key", "create", "--alias", "tenants", "-o", "json", "--addr", n1.apiAddr)), &k); err != nil {
		t.Fatal(err)
	}
	c.mustCLI(nil, "key", "grant", "tenants", "--principal", "svc", "--operations", "encrypt,decrypt", "--context-equals", "tenant=acme", "--addr", n3.apiAddr)

	as := func(via *node, stdin []byte, args ...string) (string, string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		return c.cliAs(ctx, svcDir, "svc", stdin, append(args, "--addr", via.apiAddr)...)
	}
	var ct string
	waitFor(t, 10*time.Second, "svc encrypts with its grant", func() error {
		out, errOut, err := as(n1, []byte("tenant data"), "key", "encrypt", "--key", k.KeyID, "--context", "tenant=acme")
		if err != nil {
			return fmt.Errorf("%v %s", err, errOut)
		}
		ct = strings.TrimSpace(out)
		return nil
	})
	if out, errOut, err := as(n3, []byte(ct), "key", "decrypt", "--context", "tenant=acme"); err != nil || out != "tenant data" {
		t.Fatalf("svc decrypt via node3: %v %s %q", err, errOut, out)
	}
	if _, errOut, err := as(n2, []byte("x"), "key", "encrypt", "--key", k.KeyID, "--context", "tenant=other"); err == nil || !strings.Contains(errOut, "PermissionDenied") {
		t.Fatalf("unmet context constraint: %v %s", err, errOut)
	}
	if _, errOut, err := as(n2, nil, "key", "create"); err == nil || !strings.Contains(errOut, "PermissionDenied") {
		t.Fatalf("plain principal creating a key: %v %s", err, errOut)
	}

	// Deny: refused on every node.
	c.mustCLI(nil, "operator", "deny", "svc", "--reason", "leaked", "--addr", n2.apiAddr)
	for _, nd := range c.nodes {
		// Each poll runs a CLI process: allow for a slow machine.
		waitFor(t, 30*time.Second, "svc refused on "+nd.id, func() error {
			_, errOut, err := as(nd, []byte("x"), "key", "encrypt", "--key", k.KeyID, "--context", "tenant=acme")
			if err == nil || !strings.Contains(errOut, "denied cluster-wide") {
				return fmt.Errorf("not refused: %v %s", err, errOut)
			}
			return nil
		})
	}

	// Every node's chain verifies and recorded svc's refusals.
	for _, nd := range c.nodes {
		out := c.mustCLI(nil, "operator", "audit", "verify", "-o", "json", "--addr", nd.apiAddr)
		// protojson varies its whitespace between builds: parse, do not grep.
		var report struct {
			OK bool `json:"ok"`
		}
		if err := json.Unmarshal([]byte(out), &report); err != nil || !report.OK {
			t.Fatalf("audit verify on %s: %s", nd.id, out)
		}
		tail := c.mustCLI(nil, "operator", "audit", "tail", "-n", "200", "-o", "json", "--addr", nd.apiAddr)
		if !strings.Contains(tail, `"svc"`) || !strings.Contains(tail, "PermissionDenied") {
			t.Fatalf("audit tail on %s lacks svc's refusal", nd.id)
		}
		if strings.Contains(tail, ct) || strings.Contains(tail, "tenant data") {
			t.Fatalf("audit records on %s carry a ciphertext or plaintext", nd.id)
		}
	}

	// Tamper with one record of node 3's file: verify names that record.
	c.stop(n3)
	path := filepath.Join(n3.dataDir, "audit", "audit.log")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) < 5 {
		t.Fatalf("node3 audit log has %d records", len(lines))
	}
	mid := len(lines) / 2
	var rec map[string]any
	if err := json.Unmarshal([]byte(lines[mid]), &rec); err != nil {
		t.Fatal(err)
	}
	lines[mid] = strings.Replace(lines[mid], `"outcome":"`, `"outcome":"X`, 1)
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out, _, err := c.cli(context.Background(), nil, "operator", "audit", "verify", "--file", path, "-o", "json")
	if err == nil {
		t.Fatalf("tampered audit log verified: %s", out)
	}
	// protojson varies its whitespace between builds: parse, don't grep.
	var rep map[string]any
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("verify output is not JSON: %v\n%s", err, out)
	}
	if fmt.Sprint(rep["firstBadSeq"]) != fmt.Sprint(rec["seq"]) {
		t.Fatalf("verify did not name record %v: %s", rec["seq"], out)
	}
}
