package cluster

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/hashicorp/raft"
)

// compactRun is one execution of the compaction; every CompactLog call that
// arrives before it starts shares it.
type compactRun struct {
	done    chan struct{}
	err     error
	joiners int // callers sharing this run (tests)
}

// CompactLog removes from this node's disk everything Raft no longer needs,
// so that material the FSM dropped (a destroyed key) is gone from every file
// the node wrote:
//
//  1. a Raft snapshot with TrailingLogs set to 0 for its duration, so Raft
//     deletes every log entry up to the snapshot (the configured value is
//     restored afterwards);
//  2. older snapshots are reaped by the snapshot store (it retains 1);
//  3. raft.db is rewritten into a fresh bolt file, so pages bolt freed when
//     the entries were deleted (which still hold their bytes) leave the disk.
//
// Call it after the command that dropped the material was applied on this
// node: the snapshot covers what the FSM has applied. Calls are serialised
// and coalesced: a call joins the next compaction that has not started yet,
// so a burst of N calls runs one or two compactions, and each call returns
// only after a compaction that started after the call finished. Raft keeps
// running meanwhile; its log store calls block only while raft.db is swapped.
//
// A side effect: followers lagging behind the snapshot (including one that
// is down) catch up by snapshot install instead of log replay.
func (n *Node) CompactLog(ctx context.Context) error {
	for {
		n.compactMu.Lock()
		run := n.compactPending
		if run == nil {
			run = &compactRun{done: make(chan struct{})}
			n.compactPending = run
		}
		run.joiners++
		n.compactMu.Unlock()

		err := n.awaitOrExecute(ctx, run)
		// The run failed only because the caller that executed it gave up:
		// try again with our own context.
		if err != nil && errors.Is(err, errExecutorCancelled) && ctx.Err() == nil {
			continue
		}
		return err
	}
}

var errExecutorCancelled = errors.New("compaction abandoned by the caller that ran it")

func (n *Node) awaitOrExecute(ctx context.Context, run *compactRun) error {
	select {
	case <-run.done:
		return run.err
	case n.compactSem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("compact log: %w", ctx.Err())
	case <-n.shutdownCh:
		return raft.ErrRaftShutdown
	}
	defer func() { <-n.compactSem }()
	select {
	case <-run.done: // another joiner ran it while we waited
		return run.err
	default:
	}
	n.compactMu.Lock()
	if n.compactPending == run {
		n.compactPending = nil // later callers start a new run
	}
	n.compactMu.Unlock()
	err := n.compactOnce(ctx)
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("%w: %w", errExecutorCancelled, err)
	}
	run.err = err
	close(run.done)
	return err
}

// compactOnce runs the three steps; the caller holds compactSem.
func (n *Node) compactOnce(ctx context.Context) error {
	n.compactions.Add(1)
	if n.compactHook != nil {
		n.compactHook()
	}
	if err := n.snapshotWithoutTrailingLogs(ctx); err != nil {
		return err
	}
	if n.compactSkipRewrite { // tests: show what step 3 is for
		return nil
	}
	select {
	case <-n.shutdownCh:
		return raft.ErrRaftShutdown
	default:
	}
	start := time.Now()
	if err := n.store.rewrite(); err != nil {
		return fmt.Errorf("compact log: rewrite raft.db: %w", err)
	}
	n.log.Info("raft log compacted", "last_snapshot_index", n.raft.Stats()["last_snapshot_index"], "rewrite", time.Since(start))
	return nil
}

// awaitQuiet waits until no kick arrived for CompactDelay, or for at most
// 10*CompactDelay; false on Shutdown.
func (n *Node) awaitQuiet() bool {
	delay := n.cfg.CompactDelay
	deadline := time.NewTimer(10 * delay)
	defer deadline.Stop()
	quiet := time.NewTimer(delay)
	defer quiet.Stop()
	for {
		select {
		case <-n.shutdownCh:
			return false
		case <-deadline.C:
			return true
		case <-quiet.C:
			return true
		case <-n.compactKick:
			quiet.Reset(delay)
		}
	}
}

// kickCompaction asks autoCompact for a run; it never blocks (a pending
// kick already covers this one: the run starts after it is taken).
func (n *Node) kickCompaction() {
	select {
	case n.compactKick <- struct{}{}:
	default:
	}
}

// autoCompact runs CompactLog when kicked (Config.CompactAfter) until
// Shutdown, once per burst of kicks (see Config.CompactDelay); a failed run
// is retried after a pause.
func (n *Node) autoCompact() {
	defer n.bg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-n.shutdownCh:
			cancel()
		case <-ctx.Done():
		}
	}()
	for {
		select {
		case <-n.shutdownCh:
			return
		case <-n.compactKick:
		}
		if !n.awaitQuiet() {
			return
		}
		if err := n.CompactLog(ctx); err != nil {
			if ctx.Err() != nil {
				return
			}
			n.log.Warn("automatic log compaction failed; retrying", "err", err)
			select {
			case <-n.shutdownCh:
				return
			case <-time.After(time.Second):
			}
			n.kickCompaction()
		}
	}
}

func (n *Node) snapshotWithoutTrailingLogs(ctx context.Context) error {
	n.reloadMu.Lock()
	defer n.reloadMu.Unlock()
	rc := n.raft.ReloadableConfig()
	rc.TrailingLogs = 0
	if err := n.raft.ReloadConfig(rc); err != nil {
		return fmt.Errorf("compact log: set TrailingLogs=0: %w", err)
	}
	defer func() {
		rc := n.raft.ReloadableConfig()
		rc.TrailingLogs = n.cfg.TrailingLogs
		if err := n.raft.ReloadConfig(rc); err != nil {
			n.log.Error("compact log: restore TrailingLogs", "err", err)
		}
	}()
	backoff := 10 * time.Millisecond
	for {
		err := n.raft.Snapshot().Error()
		switch {
		case err == nil:
			return nil
		case errors.Is(err, raft.ErrNothingNewToSnapshot):
			// The FSM has applied nothing yet: no entry holds state.
			return nil
		case strings.Contains(err.Error(), "wait until the configuration entry"):
			// Raft refuses while a configuration change is applied but not
			// yet covered by the FSM's index; it passes within an entry or two.
		default:
			return fmt.Errorf("compact log: snapshot: %w", err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("compact log: snapshot: %w (%v)", ctx.Err(), err)
		case <-n.shutdownCh:
			return raft.ErrRaftShutdown
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}
