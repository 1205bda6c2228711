package integration

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDisasterRecoveryDrill is the DR drill on real processes (scripts/dr-drill.sh does
// the same for `make dr-drill`): a 3-node cluster with keys (one rotated) and ciphertexts;
// snapshot save, recovery keygen + export; every node killed and its data dir and SoftHSM
// token deleted; `recovery restore` into a new node with a new token, two more new nodes
// join as usual; every ciphertext decrypts through every new node, and the old cluster's
// nodes are not members.
func TestDisasterRecoveryDrill(t *testing.T) {
	old := newTestCluster(t, 3)
	old.gossipPorts(t)
	old.startThree(t)
	o1, o2 := old.nodes[0], old.nodes[1]
	backup := t.TempDir()
	offline := filepath.Join(t.TempDir(), "offline")

	var cases []ciphertextCase
	for k := 1; k <= 3; k++ {
		alias := fmt.Sprintf("dr-%d", k)
		old.mustCLI(nil, "key", "create", "--alias", alias, "--addr", old.nodes[k%3].apiAddr)
		for i := 0; i < 2; i++ {
			if k == 1 && i == 1 {
				old.mustCLI(nil, "key", "rotate", alias, "--addr", o1.apiAddr) // a version-2 ciphertext too
			}
			pt := randomBytes(t, 24+i)
			ctxPair := fmt.Sprintf("tenant=%d", k)
			ct := strings.TrimSpace(old.mustCLI(pt, "key", "encrypt", "--key", alias, "--context", ctxPair, "--addr", old.nodes[i%3].apiAddr))
			cases = append(cases, ciphertextCase{keyID: alias, plaintext: pt, ciphertext: ct, context: []string{ctxPair}})
		}
	}
	var dk struct{ Plaintext, Ciphertext string }
	if err := json.Unmarshal([]byte(old.mustCLI(nil, "key", "data-key", "--key", "dr-2", "-o", "json", "--addr", o2.apiAddr)), &dk); err != nil {
		t.Fatal(err)
	}
	dkPlain, _ := base64.StdEncoding.DecodeString(dk.Plaintext)
	cases = append(cases, ciphertextCase{plaintext: dkPlain, ciphertext: dk.Ciphertext})

	snap, bundle := filepath.Join(backup, "state.snap"), filepath.Join(backup, "kek.bundle")
	old.mustCLI(nil, "operator", "snapshot", "save", snap, "--addr", old.follower(t, old.nodes).apiAddr)
	old.mustCLI(nil, "operator", "recovery", "keygen", "--out", offline)
	keyFile := filepath.Join(offline, "recovery-key.pem")
	if fi, err := os.Stat(keyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("recovery private key file: %v %v", fi, err)
	}
	if b, _ := os.ReadFile(keyFile); !strings.Contains(string(b), "BEGIN PRIVATE KEY") {
		t.Fatal("recovery private key is not PKCS#8 PEM")
	}
	// A key below 4096 bits is refused.
	if _, errOut, err := old.cli(t.Context(), nil, "operator", "recovery", "keygen", "--out", t.TempDir(), "--bits", "2048"); err == nil || !strings.Contains(errOut, "4096") {
		t.Errorf("2048-bit recovery key: %v %s", err, errOut)
	}
	old.mustCLI(nil, "operator", "recovery", "export", "--recovery-pubkey", filepath.Join(offline, "recovery-pub.pem"), "--out", bundle, "--addr", o2.apiAddr)
	keysBefore := old.mustCLI(nil, "key", "list", "-o", "json", "--addr", o1.apiAddr)

	// The disaster: every node and token gone.
	oldAddrs := map[string]bool{}
	for _, nd := range old.nodes {
		old.kill(nd)
		oldAddrs[nd.apiAddr] = true
		if err := os.RemoveAll(nd.dir); err != nil {
			t.Fatal(err)
		}
	}

	// Restore into brand-new nodes (new data dirs, new tokens, new addresses).
	start := time.Now()
	c := newTestCluster(t, 3)
	c.gossipPorts(t)
	n1 := c.nodes[0]
	// Restore refuses a bundle made for another recovery key before touching the HSM.
	otherKeys := filepath.Join(t.TempDir(), "other")
	c.mustCLI(nil, "operator", "recovery", "keygen", "--out", otherKeys)
	args := append([]string{"operator", "recovery", "restore", "--snapshot", snap, "--bundle", bundle,
		"--data-dir", n1.dataDir, "--node-id", n1.id, "--api-addr", n1.apiAddr, "--raft-addr", n1.raftAddr,
		"--admin-out", c.adminDir}, c.hsmFlags(n1)...)
	if _, errOut, err := c.cli(t.Context(), nil, append(args, "--recovery-key", filepath.Join(otherKeys, "recovery-key.pem"))...); err == nil || !strings.Contains(errOut, "not the recovery key") {
		t.Fatalf("restore with the wrong recovery key: %v %s", err, errOut)
	}
	out := c.mustCLI(nil, append(args, "--recovery-key", keyFile)...)
	if !strings.Contains(out, "Restored cluster") || !strings.Contains(out, "KEK version 1 unwrapped") {
		t.Fatalf("restore output: %s", out)
	}
	for _, nd := range c.nodes {
		c.start(nd)
	}
	c.waitHealthy(n1, 60*time.Second)
	for _, nd := range c.nodes[1:] {
		c.joinNode(nd, n1)
	}
	for _, nd := range c.nodes {
		c.waitHealthy(nd, 60*time.Second)
	}
	peers, err := c.peers(c.nodes[2])
	if err != nil {
		t.Fatal(err)
	}
	if len(peers) != 3 {
		t.Fatalf("%d peers after the restore: %v", len(peers), peers)
	}
	var raw struct {
		Peers []struct {
			APIAddr string `json:"apiAddr"`
		} `json:"peers"`
	}
	if err := json.Unmarshal([]byte(c.mustCLI(nil, "operator", "list-peers", "-o", "json", "--addr", n1.apiAddr)), &raw); err != nil {
		t.Fatal(err)
	}
	for _, p := range raw.Peers {
		if oldAddrs[p.APIAddr] || p.APIAddr == "" {
			t.Errorf("peer at %q: an old cluster's node (or unknown) is a member", p.APIAddr)
		}
	}

	for i, cc := range cases {
		c.mustDecryptCase(t, c.nodes[i%3], cc)
	}
	for _, nd := range c.nodes {
		c.mustDecryptCase(t, nd, cases[1]) // key 1, version 2
	}
	if keysAfter := c.mustCLI(nil, "key", "list", "-o", "json", "--addr", c.nodes[1].apiAddr); strings.Count(keysAfter, `"keyId"`) != strings.Count(keysBefore, `"keyId"`) {
		t.Fatalf("keys before the disaster:\n%s\nafter the restore:\n%s", keysBefore, keysAfter)
	}
	// The snapshot's gossip key was known to the lost nodes: the new leader
	// replaced it (generation 1 -> 2) and every new node dropped the old one.
	c.waitGossipKey(c.nodes, 2)
	// The restored cluster keeps working: new keys, and the old admin's certificate
	// (same cluster CA) still authenticates.
	c.mustCLI(nil, "key", "create", "--alias", "after-dr", "--addr", c.nodes[2].apiAddr)
	if _, errOut, err := c.cliAs(t.Context(), old.adminDir, "admin", nil, "key", "describe", "after-dr", "--addr", n1.apiAddr); err != nil {
		t.Errorf("the old admin certificate does not work on the restored cluster: %v %s", err, errOut)
	}
	t.Logf("DR drill: %d ciphertexts verified on a restored cluster %v after the disaster", len(cases), time.Since(start).Round(time.Millisecond))
}
