package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

type createdKey struct {
	KeyID string `json:"keyId"`
	Alias string `json:"alias"`
	State string `json:"state"`
}

type ciphertextCase struct {
	keyID      string
	plaintext  []byte
	ciphertext string
	context    []string
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestThreeNodeCluster is the end-to-end scenario with real
// processes: init + join via the CLI, create through node 1, decrypt through
// node 3, kill -9 the leader, elect, create again, decrypt on survivors,
// restart and catch up; then scan every file for plaintext.
func TestThreeNodeCluster(t *testing.T) {
	c := newTestCluster(t, 3)
	n1, n2, n3 := c.nodes[0], c.nodes[1], c.nodes[2]

	// Servers may start before their node is initialised or joined: they wait.
	c.initNode(n1)
	for _, nd := range c.nodes {
		c.start(nd)
	}
	c.waitHealthy(n1, 60*time.Second)
	c.joinNode(n2, n1)
	c.joinNode(n3, n1)
	for _, nd := range c.nodes {
		c.waitHealthy(nd, 60*time.Second)
	}
	var peers struct {
		Peers []struct {
			NodeID   string `json:"nodeId"`
			Voter    bool   `json:"voter"`
			RaftRole string `json:"raftRole"`
			Healthy  bool   `json:"healthy"`
		} `json:"peers"`
	}
	waitFor(t, 30*time.Second, "three healthy voters in list-peers", func() error {
		out, errOut, err := c.cli(context.Background(), nil, "operator", "list-peers", "-o", "json", "--addr", n2.apiAddr)
		if err != nil {
			return fmt.Errorf("%v %s", err, errOut)
		}
		if err := json.Unmarshal([]byte(out), &peers); err != nil {
			return err
		}
		if len(peers.Peers) != 3 {
			return fmt.Errorf("%d peers", len(peers.Peers))
		}
		leaders := 0
		for _, p := range peers.Peers {
			if !p.Voter || !p.Healthy {
				return fmt.Errorf("peer %s voter=%v healthy=%v", p.NodeID, p.Voter, p.Healthy)
			}
			if p.RaftRole == "leader" {
				leaders++
			}
		}
		if leaders != 1 {
			return fmt.Errorf("%d leaders", leaders)
		}
		return nil
	})

	// A key created through node 1 (an alias too), used through every node.
	var k1 createdKey
	if err := json.Unmarshal([]byte(c.mustCLI(nil, "key", "create", "--spec", "AES_256", "--alias", "orders", "-o", "json", "--addr", n1.apiAddr)), &k1); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(k1.KeyID, "k-") || k1.Alias != "orders" || k1.State != "ACTIVE" {
		t.Fatalf("unexpected key: %+v", k1)
	}
	var cases []ciphertextCase
	encrypt := func(via *node, keyRef string, ctxPairs ...string) ciphertextCase {
		pt := randomBytes(t, 48)
		args := []string{"key", "encrypt", "--key", keyRef, "--addr", via.apiAddr}
		for _, p := range ctxPairs {
			args = append(args, "--context", p)
		}
		ct := strings.TrimSpace(c.mustCLI(pt, args...))
		cc := ciphertextCase{keyID: keyRef, plaintext: pt, ciphertext: ct, context: ctxPairs}
		cases = append(cases, cc)
		return cc
	}
	decrypt := func(via *node, cc ciphertextCase) ([]byte, string, error) {
		args := []string{"key", "decrypt", "--addr", via.apiAddr}
		for _, p := range cc.context {
			args = append(args, "--context", p)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, errOut, err := c.cli(ctx, []byte(cc.ciphertext), args...)
		return []byte(out), errOut, err
	}
	mustDecrypt := func(via *node, cc ciphertextCase) {
		t.Helper()
		var got []byte
		waitFor(t, 20*time.Second, "decrypt via "+via.id, func() error {
			out, errOut, err := decrypt(via, cc)
			if err != nil {
				return fmt.Errorf("%v: %s", err, errOut)
			}
			got = out
			return nil
		})
		if !bytes.Equal(got, cc.plaintext) {
			t.Fatalf("decrypt via %s returned different plaintext", via.id)
		}
	}
	c1 := encrypt(n1, k1.KeyID, "tenant=acme", "purpose=test")
	c2 := encrypt(n2, "orders")
	mustDecrypt(n3, c1)
	mustDecrypt(n3, c2)
	mustDecrypt(n1, c2)

	// Data keys: plaintext + ciphertext; the ciphertext decrypts elsewhere.
	var dk struct{ Plaintext, Ciphertext string }
	if err := json.Unmarshal([]byte(c.mustCLI(nil, "key", "data-key", "--key", "orders", "-o", "json", "--addr", n2.apiAddr)), &dk); err != nil {
		t.Fatal(err)
	}
	dkPlain, _ := base64.StdEncoding.DecodeString(dk.Plaintext)
	if len(dkPlain) != 32 {
		t.Fatalf("data key is %d bytes", len(dkPlain))
	}
	dkCase := ciphertextCase{plaintext: dkPlain, ciphertext: dk.Ciphertext}
	cases = append(cases, dkCase)
	mustDecrypt(n3, dkCase)

	// Errors carry the right code and an actionable message.
	t.Run("errors", func(t *testing.T) {
		ctx := context.Background()
		wrong := c1
		wrong.context = []string{"tenant=other"}
		if _, errOut, err := decrypt(n2, wrong); err == nil || !strings.Contains(errOut, "InvalidArgument") {
			t.Errorf("wrong context: err=%v stderr=%q", err, errOut)
		}
		tampered := c1
		raw, _ := base64.StdEncoding.DecodeString(c1.ciphertext)
		raw[len(raw)-1] ^= 1
		tampered.ciphertext = base64.StdEncoding.EncodeToString(raw)
		if _, errOut, err := decrypt(n2, tampered); err == nil || !strings.Contains(errOut, "InvalidArgument") {
			t.Errorf("tampered ciphertext: err=%v stderr=%q", err, errOut)
		}
		if _, errOut, err := c.cli(ctx, []byte("x"), "key", "encrypt", "--key", "no-such-key", "--addr", n1.apiAddr); err == nil || !strings.Contains(errOut, "NotFound") {
			t.Errorf("unknown key: err=%v stderr=%q", err, errOut)
		}
		if _, errOut, err := c.cli(ctx, nil, "key", "create", "--spec", "AES_256", "--alias", "orders", "--addr", n3.apiAddr); err == nil || !strings.Contains(errOut, "AlreadyExists") {
			t.Errorf("duplicate alias: err=%v stderr=%q", err, errOut)
		}
		// No client certificate at all: refused.
		cmd := []string{"key", "list", "--addr", n1.apiAddr, "--client-cert", "", "--client-key", ""}
		if _, errOut, err := c.cli(ctx, nil, cmd...); err == nil || !strings.Contains(errOut, "client certificate") {
			t.Errorf("no client cert: err=%v stderr=%q", err, errOut)
		}
		// A join token works once.
		token := strings.TrimSpace(c.mustCLI(nil, "operator", "join-token", "create", "--quiet", "--addr", n3.apiAddr))
		if !strings.HasPrefix(token, "cbj1.") {
			t.Errorf("token %q", token)
		}
	})

	// Idempotent creation: the same request id returns the same key.
	var r1, r2 createdKey
	json.Unmarshal([]byte(c.mustCLI(nil, "key", "create", "--request-id", "itest-1", "-o", "json", "--addr", n3.apiAddr)), &r1)
	json.Unmarshal([]byte(c.mustCLI(nil, "key", "create", "--request-id", "itest-1", "-o", "json", "--addr", n2.apiAddr)), &r2)
	if r1.KeyID == "" || r1.KeyID != r2.KeyID {
		t.Fatalf("retried CreateKey returned %q then %q", r1.KeyID, r2.KeyID)
	}

	// kill -9 the leader.
	var leader *node
	waitFor(t, 10*time.Second, "a leader", func() (err error) { leader, err = c.leader(c.nodes); return err })
	var survivors []*node
	for _, nd := range c.nodes {
		if nd != leader {
			survivors = append(survivors, nd)
		}
	}
	killedAt := time.Now()
	c.kill(leader)
	var newLeader *node
	waitFor(t, 30*time.Second, "a new leader among survivors", func() (err error) {
		newLeader, err = c.leader(survivors)
		return err
	})
	t.Logf("leader %s killed; %s elected after %v", leader.id, newLeader.id, time.Since(killedAt).Round(time.Millisecond))

	var k2 createdKey
	waitFor(t, 30*time.Second, "create a key after failover", func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		out, errOut, err := c.cli(ctx, nil, "key", "create", "--request-id", "after-failover", "-o", "json", "--addr", survivors[0].apiAddr)
		if err != nil {
			return fmt.Errorf("%v: %s", err, errOut)
		}
		return json.Unmarshal([]byte(out), &k2)
	})
	c3 := encrypt(survivors[1], k2.KeyID)
	for _, s := range survivors {
		for _, cc := range cases {
			mustDecrypt(s, cc)
		}
	}

	// The killed node restarts and catches up.
	c.start(leader)
	c.waitHealthy(leader, 60*time.Second)
	waitFor(t, 30*time.Second, leader.id+" catches up", func() error {
		lst, err := c.status(newLeader)
		if err != nil {
			return err
		}
		st, err := c.status(leader)
		if err != nil {
			return err
		}
		want, _ := strconv.ParseUint(lst.CommitIndex, 10, 64)
		got, _ := strconv.ParseUint(st.AppliedIndex, 10, 64)
		if got < want || st.KeyCount != lst.KeyCount {
			return fmt.Errorf("applied %d < leader commit %d (keys %s vs %s)", got, want, st.KeyCount, lst.KeyCount)
		}
		return nil
	})
	mustDecrypt(leader, c3)
	mustDecrypt(leader, c1)

	// Stop everything, then no file any node wrote holds plaintext.
	c.stopAll()
	scanForPlaintext(t, c, cases)
}

// scanForPlaintext reads every file under every node's dir (data dir, Raft
// log and snapshots, SoftHSM token dir, TLS, logs) and fails if any holds the
// material of a key created in the test (learnt through the test-hook build),
// a data key, or a plaintext that was encrypted: raw, hex or base64.
func scanForPlaintext(t *testing.T, c *testCluster, cases []ciphertextCase) {
	t.Helper()
	secrets := map[string][]byte{}
	for i, cc := range cases {
		secrets[fmt.Sprintf("plaintext #%d", i)] = cc.plaintext
	}
	entries, err := os.ReadDir(c.witness)
	if err != nil {
		t.Fatal(err)
	}
	materials := 0
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(c.witness, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			f := strings.Fields(line)
			if len(f) < 3 {
				continue
			}
			m, err := hex.DecodeString(f[2])
			if err != nil || len(m) == 0 {
				t.Fatalf("bad witness line in %s", e.Name())
			}
			secrets["material of "+f[0]+" v"+f[1]] = m
			materials++
		}
	}
	if materials < 3 {
		t.Fatalf("only %d key materials observed through the test hooks; the leak scan would prove nothing", materials)
	}
	needles := needlesFor(secrets)
	var dirs []string
	for _, nd := range c.nodes {
		dirs = append(dirs, nd.dir)
	}
	found, files, bytesScanned, err := findSecrets(dirs, needles)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range found {
		t.Error(f)
	}
	t.Logf("leak scan: %d secrets (%d key materials) x 3 encodings over %d files, %d bytes: clean unless reported", len(secrets), materials, files, bytesScanned)
	if files < 10 {
		t.Fatalf("scanned only %d files", files)
	}
}

type needle struct {
	name string
	b    []byte
}

// needlesFor turns each secret into the forms it could leak in: raw bytes,
// hex, and base64 (a prefix, so padding does not hide it).
func needlesFor(secrets map[string][]byte) []needle {
	var out []needle
	for name, s := range secrets {
		b64 := base64.StdEncoding.EncodeToString(s)
		if len(b64) > 40 {
			b64 = b64[:40]
		}
		out = append(out,
			needle{name + " (raw)", s},
			needle{name + " (hex)", []byte(hex.EncodeToString(s))},
			needle{name + " (base64)", []byte(b64)})
	}
	return out
}

// findSecrets reads every regular file under dirs and reports each needle
// found, with the file.
func findSecrets(dirs []string, needles []needle) (found []string, files, total int, err error) {
	for _, dir := range dirs {
		err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return err
			}
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			files++
			total += len(b)
			for _, n := range needles {
				if bytes.Contains(b, n.b) {
					found = append(found, fmt.Sprintf("%s found in %s", n.name, path))
				}
			}
			return nil
		})
		if err != nil {
			return nil, 0, 0, err
		}
	}
	return found, files, total, nil
}

// TestLeakScannerFindsPlantedSecrets proves the scanner would catch a leak
// in each encoding, so a clean scan means something.
func TestLeakScannerFindsPlantedSecrets(t *testing.T) {
	secret := randomBytes(t, 32)
	needles := needlesFor(map[string][]byte{"planted": secret})
	for _, n := range needles {
		dir := t.TempDir()
		blob := append(append(randomBytes(t, 1000), n.b...), randomBytes(t, 1000)...)
		if err := os.MkdirAll(filepath.Join(dir, "raft"), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "raft", "raft.db"), blob, 0o600); err != nil {
			t.Fatal(err)
		}
		found, _, _, err := findSecrets([]string{dir}, needles)
		if err != nil {
			t.Fatal(err)
		}
		if len(found) == 0 {
			t.Errorf("scanner missed %s", n.name)
		}
	}
}
