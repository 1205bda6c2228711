package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// snapshotInspect is `operator snapshot inspect -o json`.
type snapshotInspect struct {
	ClusterID string `json:"cluster_id"`
	Index     uint64 `json:"index"`
	Term      uint64 `json:"term"`
	Size      int64  `json:"size"`
	Checksum  string `json:"sha256"`
	State     struct {
		Keys    int            `json:"keys"`
		ByState map[string]int `json:"keys_by_state"`
		BySpec  map[string]int `json:"keys_by_spec"`
		KEKs    []struct {
			Version uint32 `json:"version"`
			State   string `json:"state"`
		} `json:"kek_versions"`
		Nodes []string `json:"nodes"`
	} `json:"state"`
}

func (c *testCluster) inspectSnapshot(t *testing.T, path string) snapshotInspect {
	t.Helper()
	var r snapshotInspect
	if err := json.Unmarshal([]byte(c.mustCLI(nil, "operator", "snapshot", "inspect", path, "-o", "json")), &r); err != nil {
		t.Fatal(err)
	}
	return r
}

// follower returns a live node that is not the leader.
func (c *testCluster) follower(t *testing.T, live []*node) *node {
	t.Helper()
	var f *node
	waitFor(t, 20*time.Second, "a follower", func() error {
		leader, err := c.leader(live)
		if err != nil {
			return err
		}
		for _, nd := range live {
			if nd != leader {
				f = nd
				return nil
			}
		}
		return fmt.Errorf("no follower")
	})
	return f
}

// decryptCase decrypts cc through via; it must return cc's plaintext.
func (c *testCluster) mustDecryptCase(t *testing.T, via *node, cc ciphertextCase) {
	t.Helper()
	args := []string{"key", "decrypt", "--addr", via.apiAddr}
	for _, p := range cc.context {
		args = append(args, "--context", p)
	}
	var got []byte
	waitFor(t, 20*time.Second, "decrypt via "+via.id, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		out, errOut, err := c.cli(ctx, []byte(cc.ciphertext), args...)
		if err != nil {
			return fmt.Errorf("%v: %s", err, strings.TrimSpace(errOut))
		}
		got = []byte(out)
		return nil
	})
	if !bytes.Equal(got, cc.plaintext) {
		t.Fatalf("decrypt via %s returned a different plaintext", via.id)
	}
}

// TestSnapshotSaveInspectRestore: save streams from the leader through a
// follower, inspect validates offline, a corrupted or truncated file is
// refused with a clear error, restore needs --yes and rolls every node back
// (later keys gone, later state changes undone) while membership stays.
func TestSnapshotSaveInspectRestore(t *testing.T) {
	c := newTestCluster(t, 3)
	c.gossipPorts(t)
	c.startThree(t)
	n1 := c.nodes[0]
	dir := t.TempDir()
	snap := filepath.Join(dir, "state.snap")

	c.mustCLI(nil, "key", "create", "--alias", "snap-a", "--addr", n1.apiAddr)
	pt := randomBytes(t, 40)
	ct := ciphertextCase{plaintext: pt, context: []string{"app=snap"},
		ciphertext: strings.TrimSpace(c.mustCLI(pt, "key", "encrypt", "--key", "snap-a", "--context", "app=snap", "--addr", n1.apiAddr))}

	f := c.follower(t, c.nodes)
	out := c.mustCLI(nil, "operator", "snapshot", "save", snap, "--addr", f.apiAddr, "--progress", "always")
	if !strings.Contains(out, "Saved snapshot") {
		t.Fatalf("save output: %s", out)
	}
	if fi, err := os.Stat(snap); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("snapshot file: %v %v", fi, err)
	}
	r := c.inspectSnapshot(t, snap)
	if r.Index == 0 || r.Term == 0 || r.State.Keys != 1 || r.State.ByState["ACTIVE"] != 1 || r.State.BySpec["AES_256"] != 1 ||
		len(r.State.KEKs) != 1 || r.State.KEKs[0].Version != 1 || len(r.State.Nodes) != 3 || len(r.Checksum) != 64 {
		t.Fatalf("inspect: %+v", r)
	}
	table := c.mustCLI(nil, "operator", "snapshot", "inspect", snap)
	for _, want := range []string{"(valid)", "Index", "Term", "ACTIVE 1", "AES_256 1", "KEK v1"} {
		if !strings.Contains(table, want) {
			t.Errorf("inspect table lacks %q:\n%s", want, table)
		}
	}
	// Saving over an existing file needs --force.
	if _, errOut, err := c.cli(context.Background(), nil, "operator", "snapshot", "save", snap, "--addr", n1.apiAddr); err == nil || !strings.Contains(errOut, "--force") {
		t.Errorf("save over an existing file: %v %s", err, errOut)
	}

	// Changes after the snapshot.
	c.mustCLI(nil, "key", "create", "--alias", "snap-b", "--addr", n1.apiAddr)
	c.mustCLI(nil, "key", "disable", "snap-a", "--addr", n1.apiAddr)

	// Damaged files are refused by inspect and restore, and change nothing.
	good, err := os.ReadFile(snap)
	if err != nil {
		t.Fatal(err)
	}
	flipped := bytes.Clone(good)
	flipped[len(flipped)/2] ^= 0x20
	damaged := map[string][]byte{"flipped": flipped, "truncated": good[:len(good)-100], "empty": {}}
	for name, b := range damaged {
		p := filepath.Join(dir, name+".snap")
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		for _, args := range [][]string{{"operator", "snapshot", "inspect", p}, {"operator", "snapshot", "restore", p, "--yes", "--addr", f.apiAddr}} {
			_, errOut, err := c.cli(context.Background(), nil, args...)
			if err == nil || !strings.Contains(errOut, "corrupt snapshot file") {
				t.Errorf("%s: %s: err=%v stderr=%q, want a corrupt snapshot file error", name, args[2], err, errOut)
			}
		}
	}
	if _, errOut, _ := c.cli(context.Background(), nil, "operator", "snapshot", "inspect", filepath.Join(dir, "flipped.snap")); !strings.Contains(errOut, "checksum mismatch") {
		t.Errorf("flipped byte: %q, want a checksum mismatch", errOut)
	}
	if k, err := c.describe(n1, "snap-b"); err != nil || k.State != "ACTIVE" {
		t.Fatalf("a refused restore changed the state: %+v %v", k, err)
	}

	// Restore needs --yes.
	if _, errOut, err := c.cli(context.Background(), nil, "operator", "snapshot", "restore", snap, "--addr", f.apiAddr); err == nil || !strings.Contains(errOut, "--yes") {
		t.Fatalf("restore without --yes: %v %s", err, errOut)
	}
	out = c.mustCLI(nil, "operator", "snapshot", "restore", snap, "--yes", "--addr", f.apiAddr)
	if !strings.Contains(out, "Restored the snapshot") {
		t.Fatalf("restore output: %s", out)
	}
	for _, nd := range c.nodes {
		waitFor(t, 20*time.Second, nd.id+" rolled back", func() error {
			if k, err := c.describe(nd, "snap-b"); err == nil {
				return fmt.Errorf("snap-b still exists (%s)", k.State)
			} else if !strings.Contains(err.Error(), "NotFound") {
				return err
			}
			k, err := c.describe(nd, "snap-a")
			if err != nil {
				return err
			}
			if k.State != "ACTIVE" {
				return fmt.Errorf("snap-a is %s", k.State)
			}
			return nil
		})
		c.mustDecryptCase(t, nd, ct)
	}
	// Membership stayed; the cluster keeps taking writes.
	peers, err := c.peers(n1)
	if err != nil || len(peers) != 3 {
		t.Fatalf("peers after restore: %v %v", peers, err)
	}
	c.mustCLI(nil, "key", "create", "--alias", "snap-c", "--addr", f.apiAddr)
	for _, nd := range c.nodes {
		c.waitHealthy(nd, 20*time.Second)
	}
}
