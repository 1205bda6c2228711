package cluster

import (
	"context"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// Bounded-staleness reads on a follower.
//
// Hearing from the leader recently is not enough: after a partition heals,
// the leader's first heartbeats refresh LastContact while the follower's log
// is still behind, and the follower would serve a key it has not yet seen
// disabled. So every follower asks the leader for its commit index (read
// index) every MaxStaleness/4 and records when it *sent* each request. It
// serves a read at time T only if some record sent at or after
// T - MaxStaleness has an index it has already applied. Any write
// acknowledged before that send time has an index at or below the record's,
// so every write acknowledged more than MaxStaleness ago is visible: the
// revocation bound holds even across partitions.

// freshMark is one read-index answer: the leader's commit index as of sent.
type freshMark struct {
	sent  time.Time
	index uint64
}

type freshness struct {
	mu    sync.Mutex
	marks []freshMark // oldest first, at most maxMarks
	// refreshing serialises on-demand refreshes so a burst of requests on a
	// stale node costs one read-index round trip, not one each.
	refreshing sync.Mutex
}

const maxMarks = 16

func (f *freshness) add(m freshMark) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.marks = append(f.marks, m)
	if len(f.marks) > maxMarks {
		f.marks = f.marks[len(f.marks)-maxMarks:]
	}
}

// fresh reports whether a mark sent within maxAge is covered by applied.
func (f *freshness) fresh(now time.Time, maxAge time.Duration, applied uint64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := len(f.marks) - 1; i >= 0; i-- {
		m := f.marks[i]
		if now.Sub(m.sent) > maxAge {
			return false
		}
		if m.index <= applied {
			return true
		}
	}
	return false
}

func (f *freshness) reset() {
	f.mu.Lock()
	f.marks = nil
	f.mu.Unlock()
}

// runFreshness keeps read-index marks while this node is a follower.
func (n *Node) runFreshness() {
	defer n.bg.Done()
	every := n.cfg.MaxStaleness / 4
	if every < 20*time.Millisecond {
		every = 20 * time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-n.shutdownCh:
			return
		case <-t.C:
		}
		if n.raft.State() != raft.Follower || n.cfg.Forwarder == nil {
			continue
		}
		_, addr := n.Leader()
		if addr == "" {
			continue
		}
		sent := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), n.cfg.MaxStaleness)
		idx, err := n.cfg.Forwarder.ReadIndex(ctx, addr)
		cancel()
		if err == nil {
			n.fresh.add(freshMark{sent: sent, index: idx})
		}
	}
}

// refreshNow is the on-demand path of a bounded-staleness read on a follower
// whose marks are too old (e.g. right after a leader change): one read-index
// round trip to the leader, then wait to apply it. Concurrent callers share
// the round trip.
func (n *Node) refreshNow(ctx context.Context) error {
	n.fresh.refreshing.Lock()
	defer n.fresh.refreshing.Unlock()
	if n.isFresh() {
		return nil
	}
	_, addr := n.Leader()
	if addr == "" || n.cfg.Forwarder == nil {
		return ErrStale
	}
	rctx, cancel := context.WithTimeout(ctx, n.cfg.MaxStaleness)
	defer cancel()
	sent := time.Now()
	idx, err := n.cfg.Forwarder.ReadIndex(rctx, addr)
	if err != nil {
		return ErrStale
	}
	n.fresh.add(freshMark{sent: sent, index: idx})
	if err := n.applied.wait(rctx, idx); err != nil {
		return ErrStale
	}
	return nil
}

func (n *Node) isFresh() bool {
	now := time.Now()
	return n.fresh.fresh(now, n.cfg.MaxStaleness, n.cfg.FSM.AppliedIndex()) ||
		n.fresh.fresh(now, n.cfg.MaxStaleness, n.raft.AppliedIndex())
}
