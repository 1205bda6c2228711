package cluster

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// loopRecorder counts fn calls per node and keeps the ctx of each node's
// latest call.
type loopRecorder struct {
	mu      sync.Mutex
	calls   map[string]int
	lastCtx map[string]context.Context
}

func (r *loopRecorder) fn(id string) func(context.Context) {
	return func(ctx context.Context) {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.calls[id]++
		r.lastCtx[id] = ctx
	}
}

func (r *loopRecorder) get(id string) (int, context.Context) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.calls[id], r.lastCtx[id]
}

func waitCalls(t *testing.T, r *loopRecorder, id string, atLeast int, timeout time.Duration) {
	t.Helper()
	waitFor(t, timeout, id+"'s leader fn", func() error {
		if n, _ := r.get(id); n < atLeast {
			return fmt.Errorf("%d calls", n)
		}
		return nil
	})
}

func TestRunLeaderLoop(t *testing.T) {
	c := newTestCluster(t, 3)
	c.waitLeader()
	// Every node that leads from here on, as its own Raft reports it (on a
	// loaded machine leadership can move on its own): fn must never run on
	// a node that is not in this set.
	var ledMu sync.Mutex
	led := map[string]bool{}
	for _, tn := range c.nodes {
		obsCh := make(chan raft.Observation, 64)
		obs := raft.NewObserver(obsCh, false, func(o *raft.Observation) bool {
			_, ok := o.Data.(raft.LeaderObservation)
			return ok
		})
		tn.node.raft.RegisterObserver(obs)
		stopObs := make(chan struct{})
		obsDone := make(chan struct{})
		go func() {
			defer close(obsDone)
			for {
				select {
				case o := <-obsCh:
					if lo := o.Data.(raft.LeaderObservation); lo.LeaderID != "" {
						ledMu.Lock()
						led[string(lo.LeaderID)] = true
						ledMu.Unlock()
					}
				case <-stopObs:
					return
				}
			}
		}()
		t.Cleanup(func() {
			tn.node.raft.DeregisterObserver(obs)
			close(stopObs)
			<-obsDone
		})
	}
	// A node leading since before the observers were registered led too
	// (the loops start after this; one that stops leading meanwhile must be
	// elected again, which the observers see, before it can run fn).
	for _, tn := range c.nodes {
		if tn.node.IsLeader() {
			ledMu.Lock()
			led[tn.id] = true
			ledMu.Unlock()
		}
	}
	everLed := func(id string) bool {
		ledMu.Lock()
		defer ledMu.Unlock()
		return led[id]
	}

	rec := &loopRecorder{calls: map[string]int{}, lastCtx: map[string]context.Context{}}
	ctx, cancel := context.WithCancel(context.Background())
	const every = 50 * time.Millisecond
	exited := map[string]chan struct{}{}
	for _, tn := range c.nodes {
		done := make(chan struct{})
		exited[tn.id] = done
		go func(tn *testNode) {
			defer close(done)
			tn.node.RunLeaderLoop(ctx, every, rec.fn(tn.id))
		}(tn)
	}
	t.Cleanup(func() {
		cancel()
		for _, done := range exited {
			<-done
		}
	})

	// Only the leader runs fn, repeatedly.
	waitFor(t, 10*time.Second, "the leader's fn to run 4 times", func() error {
		l := c.waitLeader()
		if n, _ := rec.get(l.id); n < 4 {
			return fmt.Errorf("%s (leader) ran fn %d times", l.id, n)
		}
		return nil
	})
	for _, tn := range c.nodes {
		if n, _ := rec.get(tn.id); n != 0 && !everLed(tn.id) {
			t.Fatalf("%s, never the leader, ran fn %d times", tn.id, n)
		}
	}
	ledMu.Lock()
	t.Logf("nodes that led since the loops started: %v", led)
	ledMu.Unlock()

	// Leadership moves: the old leader's ctx is cancelled at once and the
	// new leader takes over. The transfer is asked of whichever node leads
	// now, whose latest fn ctx must be live while it leads.
	var leader *testNode
	var oldCtx context.Context
	waitFor(t, 15*time.Second, "a leadership transfer", func() error {
		l := c.waitLeader()
		n, lctx := rec.get(l.id)
		if n == 0 {
			return fmt.Errorf("%s leads but has not run fn yet", l.id)
		}
		if lctx.Err() != nil {
			if l.node.IsLeader() {
				return fmt.Errorf("%s's fn ctx cancelled while it leads", l.id)
			}
			return fmt.Errorf("%s stopped leading", l.id)
		}
		if err := l.node.LeadershipTransfer(); err != nil {
			return err // not (or no longer) the leader, or the transfer timed out
		}
		leader, oldCtx = l, lctx
		return nil
	})
	waitFor(t, 2*time.Second, "old leader's fn ctx to be cancelled", func() error { return oldCtxErr(oldCtx) })
	second := c.waitLeader()
	if second == leader {
		t.Fatal("leadership did not move")
	}
	waitCalls(t, rec, second.id, 2, 5*time.Second)
	if err := followers(c)[0].node.LeadershipTransfer(); err != ErrNotLeader {
		t.Fatalf("LeadershipTransfer on a follower: %v", err)
	}

	// The leader stops: a new one runs fn within a few election timeouts
	// (the loop on the stopped node returns).
	before := map[string]int{}
	for _, tn := range c.nodes {
		before[tn.id], _ = rec.get(tn.id)
	}
	c.stop(second)
	select {
	case <-exited[second.id]:
	case <-time.After(5 * time.Second):
		t.Fatal("RunLeaderLoop did not return after Shutdown")
	}
	// The clock starts once the old leader has shut down (Shutdown itself
	// takes long under load, and the followers' timers run meanwhile).
	stoppedAt := time.Now()
	election := second.node.cfg.ElectionTimeout
	var third *testNode
	waitFor(t, 20*election, "a new leader's fn", func() error {
		for _, tn := range c.live() {
			if n, _ := rec.get(tn.id); n > before[tn.id] {
				third = tn
				return nil
			}
		}
		return fmt.Errorf("no fn call since the leader stopped")
	})
	took := time.Since(stoppedAt)
	t.Logf("new leader %s ran fn %v after the leader stopped (election timeout %v)", third.id, took, election)
	// Measured 1.3-2.5 election timeouts (heartbeat timeout, election,
	// barrier). The bound leaves room for a loaded machine and a
	// split vote or two (each costs up to two more election timeouts).
	if took > 10*election {
		t.Fatalf("new leader's fn ran %v after the leader stopped; want within 10 election timeouts (%v)", took, 10*election)
	}
	if !third.node.IsLeader() && c.waitLeader() != third {
		t.Fatalf("%s ran fn but is not the leader", third.id)
	}
	// The scheduler's proposals still go through.
	c.mustPropose(third, fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(1), "")
}

func oldCtxErr(ctx context.Context) error {
	if ctx.Err() == nil {
		return fmt.Errorf("still live")
	}
	return nil
}
