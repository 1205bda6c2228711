package cluster

import (
	"errors"
	"testing"
	"time"
)

// TestElectionNudgeRestoresConfig: the nudge leaves Raft's reloadable
// configuration as it found it, and does nothing while a compaction holds
// the reload lock (whose TrailingLogs=0 it must not overwrite).
func TestElectionNudgeRestoresConfig(t *testing.T) {
	c := newTestCluster(t, 1)
	n := c.nodes[0].node
	before := n.raft.ReloadableConfig()
	n.nudgeElection()
	if after := n.raft.ReloadableConfig(); after != before {
		t.Fatalf("config after a nudge = %+v, want %+v", after, before)
	}

	n.reloadMu.Lock()
	rc := n.raft.ReloadableConfig()
	rc.TrailingLogs = 0
	if err := n.raft.ReloadConfig(rc); err != nil {
		t.Fatal(err)
	}
	n.nudgeElection() // must skip, not restore TrailingLogs
	if got := n.raft.ReloadableConfig().TrailingLogs; got != 0 {
		t.Fatalf("TrailingLogs = %d during a compaction after a nudge, want 0", got)
	}
	rc.TrailingLogs = before.TrailingLogs
	if err := n.raft.ReloadConfig(rc); err != nil {
		t.Fatal(err)
	}
	n.reloadMu.Unlock()
}

// TestElectionNudgeElectsPromptly: with long timeouts (Raft's own check of a
// dead leader comes 3-9 s after the kill here), the followers stand within
// about 1-1.5 heartbeat timeouts. The bound is loose (a split vote adds an
// election timeout); it fails when the nudge does nothing and Raft's timer
// happens to come late, which is what the nudge is for.
func TestElectionNudgeElectsPromptly(t *testing.T) {
	const hb = 3 * time.Second
	c := newTestClusterWith(t, 3, func(cfg *Config) {
		cfg.HeartbeatTimeout, cfg.ElectionTimeout = hb, hb
	})
	leader := c.waitLeader()
	c.stop(leader)
	start := time.Now()
	var elected time.Duration
	waitFor(t, 5*hb, "a new leader", func() error {
		for _, tn := range c.live() {
			if tn.node.IsLeader() {
				elected = time.Since(start)
				return nil
			}
		}
		return errors.New("no leader yet")
	})
	t.Logf("new leader %v after the old one stopped (HeartbeatTimeout %v)", elected, hb)
	if elected > 2*hb+hb/2 {
		t.Fatalf("new leader after %v, want within ~2 x HeartbeatTimeout (%v)", elected, 2*hb)
	}
}
