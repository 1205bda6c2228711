package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/boltdb/bolt"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// ErrNotMember: the named node is not in the Raft configuration.
var ErrNotMember = errors.New("node is not a member of the Raft configuration")

// AddNonvoter adds (or re-addresses) a non-voter: a read replica that
// receives the log but never votes nor counts for quorum. Leader only.
func (n *Node) AddNonvoter(ctx context.Context, id, raftAddr string) error {
	if !n.IsLeader() {
		return ErrNotLeader
	}
	if err := n.raft.AddNonvoter(raft.ServerID(id), raft.ServerAddress(raftAddr), 0, 10*time.Second).Error(); err != nil {
		return fmt.Errorf("add non-voter %s: %w", id, err)
	}
	return nil
}

// TransferLeadershipTo hands leadership to the voter `id` ("" lets Raft
// pick the most up-to-date follower) and waits until this node stepped
// down. Leader only.
func (n *Node) TransferLeadershipTo(ctx context.Context, id string) error {
	if !n.IsLeader() {
		return ErrNotLeader
	}
	if id == "" {
		return n.LeadershipTransfer()
	}
	if id == n.cfg.NodeID {
		return nil // already leader
	}
	servers, err := n.Servers()
	if err != nil {
		return err
	}
	for _, s := range servers {
		if s.ID != id {
			continue
		}
		if !s.Voter {
			return fmt.Errorf("node %s is a non-voter and cannot lead", id)
		}
		if err := n.raft.LeadershipTransferToServer(raft.ServerID(s.ID), raft.ServerAddress(s.RaftAddr)).Error(); err != nil {
			return fmt.Errorf("leadership transfer to %s: %w", id, err)
		}
		return nil
	}
	return fmt.Errorf("%w: %s", ErrNotMember, id)
}

// SafeToRemoveVoter reports whether the leader may remove the voter `id`
// without endangering quorum: it refuses to go below minVoters voters and
// requires that the voters left, minus those in `down`, still form a
// majority of the new configuration. Non-voters are always safe.
func SafeToRemoveVoter(servers []Server, id string, down map[string]bool, minVoters int) error {
	voters, isVoter, found := 0, false, false
	for _, s := range servers {
		if s.Voter {
			voters++
		}
		if s.ID == id {
			found, isVoter = true, s.Voter
		}
	}
	if !found {
		return fmt.Errorf("%w: %s", ErrNotMember, id)
	}
	if !isVoter {
		return nil
	}
	after := voters - 1
	if after < minVoters {
		return fmt.Errorf("removing voter %s would leave %d voters; the minimum is %d", id, after, minVoters)
	}
	alive := 0
	for _, s := range servers {
		if s.Voter && s.ID != id && !down[s.ID] {
			alive++
		}
	}
	if alive < after/2+1 {
		return fmt.Errorf("removing voter %s would leave %d reachable voters of %d, not a majority", id, alive, after)
	}
	return nil
}

// RecoverConfig drives RecoverCluster on a stopped node.
type RecoverConfig struct {
	NodeID string
	// Dir is the node's Raft directory (raft.db and snapshots/).
	Dir string
	// Servers is the new configuration; it must include NodeID and hold
	// at least one voter. Run RecoverCluster with the same Servers on
	// every survivor.
	Servers []Server
	Logger  *slog.Logger
}

// ReadNodeRecords replays a stopped node's Raft state (latest snapshot and
// the log after it) into a fresh FSM and returns the node records it holds.
// It opens raft.db with a short timeout, so it fails instead of blocking
// when a server still runs on the directory.
func ReadNodeRecords(dir string) ([]*fsmpb.NodeRecord, error) {
	st, err := openStopped(dir)
	if err != nil {
		return nil, err
	}
	defer st.close()
	f := fsm.New(fsm.Config{})
	snapIndex := uint64(0)
	if metas, err := st.snaps.List(); err == nil && len(metas) > 0 {
		_, rc, err := st.snaps.Open(metas[0].ID)
		if err != nil {
			return nil, fmt.Errorf("open snapshot %s: %w", metas[0].ID, err)
		}
		if err := f.Restore(rc); err != nil {
			return nil, fmt.Errorf("restore snapshot %s: %w", metas[0].ID, err)
		}
		snapIndex = metas[0].Index
	}
	first, _ := st.logs.FirstIndex()
	last, _ := st.logs.LastIndex()
	if first < snapIndex+1 {
		first = snapIndex + 1
	}
	for i := first; i <= last && i > 0; i++ {
		var l raft.Log
		if err := st.logs.GetLog(i, &l); err != nil {
			continue // compacted
		}
		if l.Type == raft.LogCommand {
			f.Apply(&l)
		}
	}
	return f.Nodes(), nil
}

// RecoverCluster forces a new Raft configuration on a stopped node after
// quorum was lost (raft.RecoverCluster): it replays the node's state,
// writes a snapshot carrying cfg.Servers and truncates the log. Entries
// that were appended but not committed become committed. Never run it on a
// node whose server is running (raft.db is locked: it fails).
func RecoverCluster(cfg RecoverConfig) error {
	if cfg.NodeID == "" || cfg.Dir == "" {
		return errors.New("recover: node id and raft dir are required")
	}
	var conf raft.Configuration
	self, voters := false, 0
	for _, s := range cfg.Servers {
		sf := raft.Nonvoter
		if s.Voter {
			sf = raft.Voter
			voters++
		}
		if s.ID == cfg.NodeID {
			self = true
		}
		conf.Servers = append(conf.Servers, raft.Server{Suffrage: sf, ID: raft.ServerID(s.ID), Address: raft.ServerAddress(s.RaftAddr)})
	}
	if !self {
		return fmt.Errorf("recover: the new configuration must include this node (%s)", cfg.NodeID)
	}
	if voters == 0 {
		return errors.New("recover: the new configuration has no voter")
	}
	st, err := openStopped(cfg.Dir)
	if err != nil {
		return err
	}
	defer st.close()
	logger := cfg.Logger
	if logger == nil {
		logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.NodeID)
	rc.Logger = newHclogAdapter(logger).Named("raft")
	_, trans := raft.NewInmemTransport(raft.ServerAddress(cfg.NodeID))
	if err := raft.RecoverCluster(rc, fsm.New(fsm.Config{}), st.logs, st.logs, st.snaps, trans, conf); err != nil {
		return fmt.Errorf("raft recover: %w", err)
	}
	return nil
}

type stoppedStores struct {
	logs  *raftboltdb.BoltStore
	snaps *raft.FileSnapshotStore
}

func (s *stoppedStores) close() { s.logs.Close() }

func openStopped(dir string) (*stoppedStores, error) {
	path := filepath.Join(dir, "raft.db")
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("no Raft state at %s: %w", path, err)
	}
	logs, err := raftboltdb.New(raftboltdb.Options{Path: path, BoltOptions: &bolt.Options{Timeout: 2 * time.Second}})
	if err != nil {
		return nil, fmt.Errorf("open %s (is the server still running? stop it first): %w", path, err)
	}
	snaps, err := raft.NewFileSnapshotStoreWithLogger(dir, 1, newHclogAdapter(slog.New(slog.NewTextHandler(io.Discard, nil))))
	if err != nil {
		logs.Close()
		return nil, fmt.Errorf("open snapshot store: %w", err)
	}
	return &stoppedStores{logs: logs, snaps: snaps}, nil
}

// EnsureStopped fails if a process holds the node's Raft store at dir open
// (a running server); a dir without Raft state passes.
func EnsureStopped(dir string) error {
	if _, err := os.Stat(filepath.Join(dir, "raft.db")); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	st, err := openStopped(dir)
	if err != nil {
		return err
	}
	st.close()
	return nil
}
