package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// Snapshot save and restore (operator snapshot save/restore) and seeding a
// brand-new node's Raft state from a backup (disaster-recovery restore).
// See DESIGN.md, "Snapshots and disaster recovery".

// SnapshotInfo describes a snapshot taken on the leader.
type SnapshotInfo struct {
	Index uint64
	Term  uint64
	// Size is the number of bytes the reader yields (the fsm snapshot
	// format: see fsm.WriteSnapshot).
	Size int64
}

// OpenSnapshot (leader only) takes a fresh Raft snapshot and opens it: the
// bytes are exactly the FSM state at Index, in fsm's snapshot format. It
// first appends a NOOP command so there is always something new to
// snapshot: the result covers every entry committed before the call.
// The caller must close the reader.
func (n *Node) OpenSnapshot(ctx context.Context) (SnapshotInfo, io.ReadCloser, error) {
	backoff := 10 * time.Millisecond
	for attempt := 0; ; attempt++ {
		if !n.IsLeader() {
			return SnapshotInfo{}, nil, ErrNotLeader
		}
		noop, err := fsm.NewCommand(fsmpb.CommandType_COMMAND_TYPE_NOOP, &fsmpb.Noop{}, "", "node:"+n.cfg.NodeID)
		if err != nil {
			return SnapshotInfo{}, nil, err
		}
		if _, _, err := n.applyAsLeader(ctx, noop); err != nil {
			return SnapshotInfo{}, nil, fmt.Errorf("snapshot: %w", err)
		}
		f := n.raft.Snapshot()
		err = f.Error()
		if err == nil {
			meta, rc, err := f.Open()
			if err != nil {
				return SnapshotInfo{}, nil, fmt.Errorf("snapshot: open: %w", err)
			}
			return SnapshotInfo{Index: meta.Index, Term: meta.Term, Size: meta.Size}, rc, nil
		}
		// A concurrent compaction took the snapshot first, or a configuration
		// change is not covered by the FSM yet: both pass within an entry.
		retry := errors.Is(err, raft.ErrNothingNewToSnapshot) || strings.Contains(err.Error(), "wait until the configuration entry")
		if !retry || attempt >= 20 {
			return SnapshotInfo{}, nil, fmt.Errorf("snapshot: %w", err)
		}
		select {
		case <-ctx.Done():
			return SnapshotInfo{}, nil, fmt.Errorf("snapshot: %w (%v)", ctx.Err(), err)
		case <-n.shutdownCh:
			return SnapshotInfo{}, nil, raft.ErrRaftShutdown
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 250*time.Millisecond)
	}
}

// RestoreSnapshot (leader only) replaces the cluster's state with data, a
// snapshot in fsm's format. The Raft configuration stays the running one
// (raft.Restore); every follower installs the snapshot. The caller must have
// validated data with fsm.ReadSnapshot and fsm.StateFromProto: raft panics
// the leader if the FSM then refuses it. RestoreSnapshot checks again so a
// bad snapshot is an error here, never a panic.
func (n *Node) RestoreSnapshot(ctx context.Context, data []byte) (uint64, error) {
	st, err := fsm.ReadSnapshot(bytes.NewReader(data))
	if err != nil {
		return 0, err
	}
	if _, err := fsm.StateFromProto(st); err != nil {
		return 0, fmt.Errorf("%w: %v", fsm.ErrCorruptSnapshot, err)
	}
	if !n.IsLeader() {
		return 0, ErrNotLeader
	}
	timeout := time.Minute
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < timeout {
		timeout = time.Until(dl)
	}
	meta := &raft.SnapshotMeta{Version: raft.SnapshotVersionMax, Size: int64(len(data))}
	if err := n.raft.Restore(meta, bytes.NewReader(data), timeout); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) {
			return 0, fmt.Errorf("%w: %v", ErrNotLeader, err)
		}
		return 0, fmt.Errorf("raft restore: %w", err)
	}
	// The FSM's applied index is 0 after a restore until the next entry:
	// append one, so reads waiting for an index move on at once.
	noop, err := fsm.NewCommand(fsmpb.CommandType_COMMAND_TYPE_NOOP, &fsmpb.Noop{}, "", "node:"+n.cfg.NodeID)
	if err != nil {
		return 0, err
	}
	_, idx, err := n.applyAsLeader(ctx, noop)
	if err != nil {
		return 0, fmt.Errorf("restored, but the next entry failed: %w", err)
	}
	return idx, nil
}

// SeedFromSnapshot prepares an empty Raft directory (Config.Dir) so that the
// node's first Open starts from data, a snapshot in fsm's format, as the
// single voter of a new cluster: it writes data as the latest snapshot at
// index 1, term 1 with a configuration of just (nodeID, raftAddr), and
// records term 1 in raft.db. This is what a bootstrap would have done, with
// the first log entry already compacted into the restored state. It refuses a
// directory that already holds Raft state.
func SeedFromSnapshot(dir, nodeID, raftAddr string, data []byte) error {
	st, err := fsm.ReadSnapshot(bytes.NewReader(data))
	if err != nil {
		return err
	}
	if _, err := fsm.StateFromProto(st); err != nil {
		return fmt.Errorf("%w: %v", fsm.ErrCorruptSnapshot, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create raft dir: %w", err)
	}
	for _, p := range []string{filepath.Join(dir, "raft.db"), filepath.Join(dir, "snapshots")} {
		if _, err := os.Stat(p); err == nil {
			return fmt.Errorf("%s already holds Raft state (%s exists); use a fresh data dir", dir, p)
		}
	}
	snaps, err := raft.NewFileSnapshotStoreWithLogger(dir, 1, newHclogAdapter(slog.New(slog.DiscardHandler)).Named("snapshot"))
	if err != nil {
		return fmt.Errorf("open snapshot store: %w", err)
	}
	_, trans := raft.NewInmemTransport(raft.ServerAddress(raftAddr))
	defer trans.Close()
	conf := raft.Configuration{Servers: []raft.Server{{
		Suffrage: raft.Voter, ID: raft.ServerID(nodeID), Address: raft.ServerAddress(raftAddr),
	}}}
	sink, err := snaps.Create(raft.SnapshotVersionMax, 1, 1, conf, 1, trans)
	if err != nil {
		return fmt.Errorf("create snapshot: %w", err)
	}
	if _, err := sink.Write(data); err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("write snapshot: %w", err)
	}
	if err := sink.Close(); err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	store, err := raftboltdb.NewBoltStore(filepath.Join(dir, "raft.db"))
	if err != nil {
		return fmt.Errorf("create raft.db: %w", err)
	}
	if err := store.SetUint64([]byte("CurrentTerm"), 1); err != nil {
		store.Close()
		return fmt.Errorf("write term: %w", err)
	}
	return store.Close()
}
