package cluster

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/raft"
)

// leaderPoll is the backstop re-check of leadership in RunLeaderLoop; state
// changes normally arrive at once through a Raft observer.
const leaderPoll = 250 * time.Millisecond

// RunLeaderLoop calls fn while this node is the Raft leader: once as soon as
// it has become leader (after a Barrier, so the FSM has applied everything
// the previous leader committed), then every `every`, never concurrently
// with itself. The ctx passed to fn belongs to one leadership term: it is
// cancelled as soon as this node stops being leader (or the term changes),
// when ctx is done, or when the node shuts down. On a node that is not the
// leader fn is not called. RunLeaderLoop returns when ctx is done or the node
// shuts down, after the last fn call returned. every must be positive.
//
// Leadership can be lost between the check and fn's proposals; proposals
// made by fn must therefore be safe to repeat (deterministic request ids,
// FSM-side "is it due" checks), as a new leader will redo them.
func (n *Node) RunLeaderLoop(ctx context.Context, every time.Duration, fn func(ctx context.Context)) {
	if every <= 0 {
		n.log.Error("RunLeaderLoop: every must be positive", "every", every)
		return
	}
	// raft.LeaderCh has a single consumer (and is not configured here), so
	// observe state and leader changes instead. The channel holds one
	// pending wake-up: raft sends after updating its state, so a dropped
	// send always has an undelivered one ahead of it.
	wake := make(chan raft.Observation, 1)
	obs := raft.NewObserver(wake, false, func(o *raft.Observation) bool {
		switch o.Data.(type) {
		case raft.RaftState, raft.LeaderObservation:
			return true
		}
		return false
	})
	n.raft.RegisterObserver(obs)
	defer n.raft.DeregisterObserver(obs)
	poll := time.NewTicker(leaderPoll)
	defer poll.Stop()

	wait := func() bool {
		select {
		case <-ctx.Done():
			return false
		case <-n.shutdownCh:
			return false
		case <-wake:
		case <-poll.C:
		}
		return true
	}
	for {
		for !n.IsLeader() {
			if !wait() {
				return
			}
		}
		term := n.raft.CurrentTerm()
		termCtx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			n.leaderTerm(termCtx, every, fn)
		}()
		for n.IsLeader() && n.raft.CurrentTerm() == term {
			if !wait() {
				break
			}
		}
		cancel()
		<-done
		select {
		case <-ctx.Done():
			return
		case <-n.shutdownCh:
			return
		default:
		}
	}
}

// leaderTerm runs fn for one leadership term until ctx is cancelled.
func (n *Node) leaderTerm(ctx context.Context, every time.Duration, fn func(ctx context.Context)) {
	// Apply everything earlier leaders committed before fn reads the state.
	barrier := max(every, n.cfg.ElectionTimeout)
	for {
		err := n.raft.Barrier(barrier).Error()
		if err == nil {
			break
		}
		n.log.Debug("leader loop: barrier", "err", err)
		if !n.IsLeader() {
			return // the watcher cancels ctx
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(min(every, 100*time.Millisecond)):
		}
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		if ctx.Err() != nil {
			return
		}
		fn(ctx)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// LeadershipTransfer asks Raft to hand leadership to the most up-to-date
// follower and waits for the outcome. Leader only.
func (n *Node) LeadershipTransfer() error {
	if !n.IsLeader() {
		return ErrNotLeader
	}
	if err := n.raft.LeadershipTransfer().Error(); err != nil {
		return fmt.Errorf("leadership transfer: %w", err)
	}
	return nil
}
