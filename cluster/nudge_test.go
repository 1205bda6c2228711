package cluster

import (
	"errors"
	"slices"
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

// TestElectionNudgeElectsPromptly: with the nudge, the followers stand about
// 1-1.5 heartbeat timeouts after the leader stops (without it, Raft's own
// check comes 1-3 timeouts later on each follower, and a vote needs both).
// One kill can still take longer (a split vote adds an election timeout),
// so the test takes the median of three kills and bounds it loosely; it is
// there to fail when the nudge stops working, not to time elections.
func TestElectionNudgeElectsPromptly(t *testing.T) {
	const hb = 2 * time.Second
	c := newTestClusterWith(t, 3, func(cfg *Config) {
		cfg.HeartbeatTimeout, cfg.ElectionTimeout = hb, hb
	})
	var took []time.Duration
	for round := range 3 {
		leader := c.waitLeader()
		c.stop(leader)
		start := time.Now()
		waitFor(t, 8*hb, "a new leader", func() error {
			for _, tn := range c.live() {
				if tn.node.IsLeader() {
					return nil
				}
			}
			return errors.New("no leader yet")
		})
		took = append(took, time.Since(start))
		t.Logf("round %d: new leader %v after the old one stopped (HeartbeatTimeout %v)", round+1, took[round], hb)
		c.restart(leader)
		c.waitConverged()
	}
	slices.Sort(took)
	if median := took[1]; median > 2*hb+hb/4 {
		t.Fatalf("median time to a new leader %v over %v, want about 1-1.5 x HeartbeatTimeout (%v)", median, took, hb)
	}
}
