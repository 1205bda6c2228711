package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"
)

type keyView struct {
	KeyID          string `json:"keyId"`
	Alias          string `json:"alias"`
	State          string `json:"state"`
	PrimaryVersion uint32 `json:"primaryVersion"`
	DestroyedAt    string `json:"destroyedAt"`
	Versions       []struct {
		Version     uint32 `json:"version"`
		State       string `json:"state"`
		CreatedAt   string `json:"createdAt"`
		DestroyedAt string `json:"destroyedAt"`
	} `json:"versions"`
}

func (c *testCluster) describe(via *node, ref string) (keyView, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, errOut, err := c.cli(ctx, nil, "key", "describe", ref, "-o", "json", "--addr", via.apiAddr)
	if err != nil {
		return keyView{}, fmt.Errorf("%v: %s", err, strings.TrimSpace(errOut))
	}
	var k keyView
	return k, json.Unmarshal([]byte(out), &k)
}

func (c *testCluster) startThree(t *testing.T) {
	t.Helper()
	n1 := c.nodes[0]
	c.initNode(n1)
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
}

// TestLifecycleOnRealCluster: automatic rotation survives a leader kill and
// never rotates twice for one due time; writes retried with the same request
// id after a leader change have one effect; scheduled destruction happens
// once, on every node, after which no node decrypts and no byte of the
// destroyed material (wrapped or plain) remains in any node's files.
func TestLifecycleOnRealCluster(t *testing.T) {
	c := newTestCluster(t, 3)
	c.serverArgs = []string{"--min-rotation-period", "1s", "--min-pending-window", "1s"}
	c.startThree(t)
	n1 := c.nodes[0]

	const period = 3 * time.Second
	var rot keyView
	if err := json.Unmarshal([]byte(c.mustCLI(nil, "key", "create", "--alias", "rotating", "--rotation-period", period.String(), "-o", "json", "--addr", n1.apiAddr)), &rot); err != nil {
		t.Fatal(err)
	}
	ct1 := strings.TrimSpace(c.mustCLI([]byte("before rotation"), "key", "encrypt", "--key", "rotating", "--addr", n1.apiAddr))
	waitFor(t, 20*time.Second, "first automatic rotation", func() error {
		k, err := c.describe(n1, "rotating")
		if err != nil {
			return err
		}
		if k.PrimaryVersion < 2 {
			return fmt.Errorf("primary version %d", k.PrimaryVersion)
		}
		return nil
	})

	// Idempotent manual write before the kill; retried after it.
	var k1, k2 keyView
	json.Unmarshal([]byte(c.mustCLI(nil, "key", "create", "--alias", "manual", "-o", "json", "--addr", n1.apiAddr)), &k1)
	json.Unmarshal([]byte(c.mustCLI(nil, "key", "rotate", "manual", "--request-id", "rot-once", "-o", "json", "--addr", c.nodes[1].apiAddr)), &k2)
	if k2.PrimaryVersion != 2 {
		t.Fatalf("manual rotate: primary %d", k2.PrimaryVersion)
	}
	c.mustCLI(nil, "key", "disable", "manual", "--request-id", "dis-once", "--addr", c.nodes[2].apiAddr)

	var leader *node
	waitFor(t, 10*time.Second, "a leader", func() (err error) { leader, err = c.leader(c.nodes); return err })
	before, err := c.describe(leader, "rotating")
	if err != nil {
		t.Fatal(err)
	}
	c.kill(leader)
	var survivors []*node
	for _, nd := range c.nodes {
		if nd != leader {
			survivors = append(survivors, nd)
		}
	}
	waitFor(t, 30*time.Second, "a new leader", func() error { _, err := c.leader(survivors); return err })
	waitFor(t, 30*time.Second, "rotation continues under the new leader", func() error {
		k, err := c.describe(survivors[0], "rotating")
		if err != nil {
			return err
		}
		if k.PrimaryVersion <= before.PrimaryVersion+1 {
			return fmt.Errorf("primary %d, before the kill %d", k.PrimaryVersion, before.PrimaryVersion)
		}
		return nil
	})
	// Retries with the same request ids after the leader change: one effect each.
	var again keyView
	json.Unmarshal([]byte(c.mustCLI(nil, "key", "rotate", "manual", "--request-id", "rot-once", "-o", "json", "--addr", survivors[0].apiAddr)), &again)
	c.mustCLI(nil, "key", "disable", "manual", "--request-id", "dis-once", "--addr", survivors[1].apiAddr)
	now, err := c.describe(survivors[1], "manual")
	if err != nil {
		t.Fatal(err)
	}
	if now.PrimaryVersion != 2 || len(now.Versions) != 2 || now.State != "DISABLED" {
		t.Fatalf("retried writes had more than one effect: primary %d, %d versions, %s", now.PrimaryVersion, len(now.Versions), now.State)
	}
	// No due time rotated twice: consecutive versions are at least ~period apart.
	k, _ := c.describe(survivors[0], "rotating")
	for i := 1; i < len(k.Versions); i++ {
		a, _ := time.Parse(time.RFC3339Nano, k.Versions[i-1].CreatedAt)
		b, _ := time.Parse(time.RFC3339Nano, k.Versions[i].CreatedAt)
		if b.Sub(a) < period-500*time.Millisecond {
			t.Fatalf("versions %d and %d created %v apart (period %v): a due rotation ran twice", i, i+1, b.Sub(a), period)
		}
	}
	for _, s := range survivors {
		if out := c.mustCLI([]byte(ct1), "key", "decrypt", "--addr", s.apiAddr); out != "before rotation" {
			t.Fatalf("old version decrypt via %s: %q", s.id, out)
		}
	}
	c.start(leader)
	c.waitHealthy(leader, 60*time.Second)

	// Scheduled destruction with a short window.
	var doomed keyView
	json.Unmarshal([]byte(c.mustCLI(nil, "key", "create", "--alias", "doomed", "-o", "json", "--addr", n1.apiAddr)), &doomed)
	ctD := strings.TrimSpace(c.mustCLI([]byte("shred me"), "key", "encrypt", "--key", "doomed", "--addr", n1.apiAddr))
	c.mustCLI(nil, "key", "rotate", "doomed", "--addr", n1.apiAddr)
	c.mustCLI(nil, "key", "schedule-destruction", "doomed", "--window", "2s", "--addr", c.nodes[1].apiAddr)
	// A STRONG read sees the new state at once on any node.
	if _, errOut, err := c.cli(context.Background(), []byte(ctD), "key", "decrypt", "--strong", "--addr", c.nodes[2].apiAddr); err == nil || !strings.Contains(errOut, "FailedPrecondition") {
		t.Fatalf("decrypt while PENDING_DESTRUCTION: %v %s", err, errOut)
	}
	destroyedAt := ""
	for _, nd := range c.nodes {
		waitFor(t, 30*time.Second, "destroyed on "+nd.id, func() error {
			k, err := c.describe(nd, doomed.KeyID)
			if err != nil {
				return err
			}
			if k.State != "DESTROYED" {
				return fmt.Errorf("state %s", k.State)
			}
			for _, v := range k.Versions {
				if v.State != "DESTROYED" {
					return fmt.Errorf("version %d %s", v.Version, v.State)
				}
			}
			if destroyedAt == "" {
				destroyedAt = k.DestroyedAt
			} else if k.DestroyedAt != destroyedAt {
				return fmt.Errorf("destroyed at %s here, %s elsewhere: not one destruction", k.DestroyedAt, destroyedAt)
			}
			return nil
		})
		if _, errOut, err := c.cli(context.Background(), []byte(ctD), "key", "decrypt", "--addr", nd.apiAddr); err == nil || !strings.Contains(errOut, "FailedPrecondition") {
			t.Fatalf("decrypt of a destroyed key via %s: %v %s", nd.id, err, errOut)
		}
	}
	// Each node compacts its log after the destruction; wait for all three,
	// then stop them and scan every file.
	waitFor(t, 30*time.Second, "every node compacted", func() error {
		for _, nd := range c.nodes {
			b, _ := readFile(nd.logPath)
			if !strings.Contains(b, "raft log compacted") {
				return fmt.Errorf("%s has not compacted", nd.id)
			}
		}
		return nil
	})
	c.stopAll()

	var doomedNeedles, liveNeedles []needle
	for _, w := range c.witnesses(t) {
		name := w.keyID + " v" + w.version
		switch w.keyID {
		case doomed.KeyID:
			doomedNeedles = append(doomedNeedles, needlesFor(map[string][]byte{name + " material": w.plaintext, name + " wrapped material": w.sealed})...)
		case k1.KeyID:
			liveNeedles = append(liveNeedles, needle{name + " wrapped", w.sealed})
		}
	}
	if len(doomedNeedles) < 2*3*2 {
		t.Fatalf("witnessed %d needles for the destroyed key's two versions", len(doomedNeedles))
	}
	found, files, _, err := findSecrets(c.dirsOf(), doomedNeedles)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range found {
		t.Error(f)
	}
	// Control: the wrapped material of a live key is on disk (so the scan
	// looks at the right bytes).
	live, _, _, err := findSecrets(c.dirsOf(), liveNeedles)
	if err != nil {
		t.Fatal(err)
	}
	if len(live) == 0 {
		t.Fatal("control failed: the live key's wrapped material is nowhere on disk, so the scan proves nothing")
	}
	t.Logf("destruction scan: %d needles over %d files clean; control found the live key's wrapped material %d times", len(doomedNeedles), files, len(live))
}
