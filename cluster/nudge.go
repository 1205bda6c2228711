package cluster

import (
	"math/rand/v2"
	"time"

	"github.com/hashicorp/raft"
)

// Election nudge: start the election as soon as the leader is overdue.
//
// hashicorp/raft's follower checks for leader contact on a timer that
// re-arms at a random 1-2 x HeartbeatTimeout after each check, not after the
// last contact; a leader that dies just after a check is noticed up to
// ~3 x HeartbeatTimeout later (measured: writes resumed 1.3-2.7 x after a
// kill -9). Here a voter follower whose last contact is older than
// HeartbeatTimeout plus a random 0-50 % (so followers rarely stand at the
// same moment, which would split the vote) pokes that timer once: Raft re-arms
// it at once when the heartbeat timeout is lowered (ReloadConfig), so the
// check runs now, sees the stale contact and starts the election (with
// pre-vote, so a node that merely lost its own link cannot disrupt a healthy
// leader). The timeout is restored right after; nothing else changes.

// nudgePoll is how often the nudge looks at the last contact, as a
// fraction of HeartbeatTimeout.
const nudgePoll = 10

func (n *Node) runElectionNudge() {
	defer n.bg.Done()
	hb := n.cfg.HeartbeatTimeout
	t := time.NewTicker(max(hb/nudgePoll, 10*time.Millisecond))
	defer t.Stop()
	var episode time.Time // the last contact the current wait belongs to
	var due time.Time
	for {
		select {
		case <-n.shutdownCh:
			return
		case <-t.C:
		}
		if n.raft.State() != raft.Follower {
			episode = time.Time{}
			continue
		}
		lc := n.raft.LastContact()
		if lc.IsZero() {
			continue
		}
		if !lc.Equal(episode) { // contact since: a new wait
			episode = lc
			due = lc.Add(hb + rand.N(hb/2+1))
			continue
		}
		if due.IsZero() || time.Now().Before(due) {
			continue
		}
		due = time.Time{} // once per episode; Raft's own timer covers the rest
		n.nudgeElection()
	}
}

// nudgeElection lowers HeartbeatTimeout by a millisecond and restores it,
// which makes a follower check its leader contact at once.
func (n *Node) nudgeElection() {
	if !n.reloadMu.TryLock() {
		return // a compaction holds it; Raft's timer will do
	}
	defer n.reloadMu.Unlock()
	rc := n.raft.ReloadableConfig()
	orig := rc.HeartbeatTimeout
	if orig <= 2*time.Millisecond {
		return
	}
	rc.HeartbeatTimeout = orig - time.Millisecond
	if err := n.raft.ReloadConfig(rc); err != nil {
		n.log.Debug("election nudge", "err", err)
		return
	}
	rc.HeartbeatTimeout = orig
	if err := n.raft.ReloadConfig(rc); err != nil {
		n.log.Error("election nudge: restore HeartbeatTimeout", "err", err)
		return
	}
	n.log.Info("leader overdue; checking for an election now", "last_contact", n.raft.LastContact())
}
