package cluster

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

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
	leader := c.waitLeader()
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
	waitCalls(t, rec, leader.id, 4, 5*time.Second)
	for _, f := range followers(c) {
		if n, _ := rec.get(f.id); n != 0 {
			t.Fatalf("follower %s ran fn %d times", f.id, n)
		}
	}

	// Leadership moves: the old leader's ctx is cancelled at once and the
	// new leader takes over.
	_, oldCtx := rec.get(leader.id)
	if oldCtx.Err() != nil {
		t.Fatal("leader's ctx cancelled while it leads")
	}
	if err := leader.node.LeadershipTransfer(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, "old leader's fn ctx to be cancelled", func() error { return oldCtxErr(oldCtx) })
	second := c.waitLeader()
	if second == leader {
		t.Fatal("leadership did not move")
	}
	waitCalls(t, rec, second.id, 2, 5*time.Second)
	if err := followers(c)[0].node.LeadershipTransfer(); err != ErrNotLeader {
		t.Fatalf("LeadershipTransfer on a follower: %v", err)
	}

	// The leader stops: a new one runs fn within a couple of election
	// timeouts (the loop on the stopped node returns).
	before := map[string]int{}
	for _, tn := range c.nodes {
		before[tn.id], _ = rec.get(tn.id)
	}
	stoppedAt := time.Now()
	c.stop(second)
	select {
	case <-exited[second.id]:
	case <-time.After(5 * time.Second):
		t.Fatal("RunLeaderLoop did not return after Shutdown")
	}
	election := second.node.cfg.ElectionTimeout
	var third *testNode
	waitFor(t, 10*election, "a new leader's fn", func() error {
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
	// Measured 0.4-0.75s (1.3-2.5 election timeouts: heartbeat timeout,
	// election, barrier); the bound leaves room for a loaded machine.
	if took > 4*election {
		t.Fatalf("new leader's fn ran %v after the leader stopped; want within ~2 election timeouts (%v)", took, 2*election)
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
