// Package fsm owns Cabinet's replicated state: the command types, the pure
// command processor (State) that applies them, the raft.FSM adapter (FSM)
// with snapshots, and the read-only queries every other package uses.
//
// Nothing here calls an HSM, reads the clock, touches the network or uses
// randomness: Apply is a pure function of the state and the command. See
// DESIGN.md in this folder.
package fsm

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/hashicorp/raft"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// Config configures an FSM.
type Config struct {
	// Logger receives error-level reports of log entries this node could not
	// apply (undecodable data, unknown non-ignorable command types, unknown
	// envelope formats) and of failed restores. Nil discards them.
	Logger *slog.Logger
}

// FSM adapts State to raft.FSM (and raft.BatchingFSM) and serves reads.
// All methods are safe for concurrent use.
//
// Records returned by read methods are the stored, immutable records: do not
// modify them (clone first with proto.CloneOf).
type FSM struct {
	log *slog.Logger

	mu        sync.RWMutex
	state     *State
	onApply   []func(index uint64, cmd *fsmpb.Command, res *fsmpb.Result)
	onRestore []func()
}

var _ raft.BatchingFSM = (*FSM)(nil)

// New returns an FSM holding an empty state.
func New(cfg Config) *FSM {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &FSM{log: log, state: NewState()}
}

// OnApply registers fn to be called after every decoded command entry, with
// the Result Apply returned (check res.Code: refused commands are reported
// too). It runs on Raft's apply goroutine after the lock is released, so it
// may call the read methods, but it must be quick and must not modify cmd or
// res. Register observers before handing the FSM to Raft.
func (f *FSM) OnApply(fn func(index uint64, cmd *fsmpb.Command, res *fsmpb.Result)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.onApply = append(f.onApply, fn)
}

// OnRestore registers fn to be called after Restore swapped in a new state
// (every cached view of the old state is stale then). Same rules as OnApply.
func (f *FSM) OnRestore(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.onRestore = append(f.onRestore, fn)
}

// Apply applies one committed log entry. It returns the *fsmpb.Result of a
// command (also for rejected commands: see Result.Code), or an error value if
// the entry's data is not a command envelope; either reaches the proposer
// through raft.ApplyFuture.Response().
//
// If this node meets a command type or envelope format it does not know and
// may not skip, it stops applying (see State.Apply), logs at error level for
// every entry it refuses, and reports it through Halted: this node is too old
// for the cluster's log and must be upgraded, after which it replays the log.
func (f *FSM) Apply(l *raft.Log) interface{} {
	return f.ApplyBatch([]*raft.Log{l})[0]
}

type appliedEntry struct {
	index      uint64
	cmd        *fsmpb.Command
	res        *fsmpb.Result
	decodeErr  error
	refused    error // non-nil if the state was or became halted
	justHalted bool
}

// ApplyBatch applies committed entries in one critical section (Raft calls it
// instead of Apply because FSM implements raft.BatchingFSM). Configuration
// entries only advance the applied index.
func (f *FSM) ApplyBatch(logs []*raft.Log) []interface{} {
	out := make([]interface{}, len(logs))
	entries := make([]appliedEntry, 0, len(logs))

	f.mu.Lock()
	for i, l := range logs {
		if l.Type != raft.LogCommand {
			f.state.advance(l.Index)
			continue
		}
		cmd, err := DecodeCommand(l.Data)
		if err != nil {
			f.state.advance(l.Index)
			err = fmt.Errorf("log entry %d: %w", l.Index, err)
			out[i] = err
			entries = append(entries, appliedEntry{index: l.Index, decodeErr: err})
			continue
		}
		wasHalted := f.state.halt != nil
		res := f.state.Apply(l.Index, cmd)
		out[i] = res
		entries = append(entries, appliedEntry{
			index: l.Index, cmd: cmd, res: res,
			refused: f.state.halt, justHalted: !wasHalted && f.state.halt != nil,
		})
	}
	observers := f.onApply
	f.mu.Unlock()

	for _, e := range entries {
		switch {
		case e.decodeErr != nil:
			f.log.Error("fsm: skipped a log entry that is not a command", "index", e.index, "error", e.decodeErr)
			continue
		case e.justHalted:
			f.log.Error("fsm: this node is too old for the cluster's log and has stopped applying; upgrade it",
				"index", e.index, "type", int32(e.cmd.GetType()), "format", e.cmd.GetFormat(), "error", e.refused)
		case e.refused != nil:
			f.log.Error("fsm: refused a log entry because this node stopped applying; upgrade it",
				"index", e.index, "error", e.refused)
		}
		for _, fn := range observers {
			fn(e.index, e.cmd, e.res)
		}
	}
	return out
}

// advance records that a log entry with nothing to apply was processed.
func (s *State) advance(index uint64) {
	if s.halt == nil {
		s.appliedIndex = index
	}
}

// Snapshot captures the state in O(nodes + join tokens) under the lock (the
// key and request trees are copy-on-write clones, records are immutable) and
// leaves sorting and marshalling to Persist, which runs concurrently with
// Apply. A halted FSM refuses to snapshot: its state lags the index Raft
// would label the snapshot with.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.state.halt; err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	return &fsmSnapshot{state: f.state.freeze()}, nil
}

type fsmSnapshot struct {
	state *frozenState
}

// Persist writes the snapshot format (see WriteSnapshot) to sink.
func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	w := bufio.NewWriterSize(sink, 256<<10)
	err := WriteSnapshot(w, s.state.proto())
	if err == nil {
		err = w.Flush()
	}
	if err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("persist snapshot: %w", err)
	}
	if err := sink.Close(); err != nil {
		return fmt.Errorf("persist snapshot: %w", err)
	}
	return nil
}

// Release is a no-op: the captured state is garbage collected.
func (s *fsmSnapshot) Release() {}

// Restore replaces the state with the snapshot read from rc. The snapshot is
// verified and a complete new State is built before it is swapped in under
// the lock, so readers see the old state or the new one, never a mix; on any
// error the old state stays. The applied index is 0 until the next entry
// (the snapshot format does not carry it).
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	st, err := ReadSnapshot(rc)
	if err == nil {
		var s *State
		if s, err = StateFromProto(st); err == nil {
			f.mu.Lock()
			f.state = s
			observers := f.onRestore
			f.mu.Unlock()
			for _, fn := range observers {
				fn()
			}
			return nil
		}
	}
	f.log.Error("fsm: snapshot restore failed; keeping the current state", "error", err)
	return fmt.Errorf("restore snapshot: %w", err)
}

// Halted returns nil, or an error wrapping ErrUnsupportedCommand once this
// node met a log entry it does not know and may not skip. A halted node must
// stop serving (its state is behind the log) and be upgraded.
func (f *FSM) Halted() error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.halt
}

// Key returns a key by id ("k-...") or alias. Do not modify the record.
func (f *FSM) Key(idOrAlias string) (*fsmpb.KeyRecord, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.key(idOrAlias)
}

// ListKeys returns up to limit keys with ids greater than afterID, in id
// order (afterID "" starts at the beginning; limit <= 0 means no limit).
// Do not modify the records.
func (f *FSM) ListKeys(afterID string, limit int) []*fsmpb.KeyRecord {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.listKeys(afterID, limit)
}

// KeyCount returns the number of keys (destroyed keys' tombstones included).
func (f *FSM) KeyCount() int {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return len(f.state.keys)
}

// Cluster returns the cluster info, or nil before INIT_CLUSTER.
// Do not modify it.
func (f *FSM) Cluster() *fsmpb.ClusterInfo {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.cluster
}

// Node returns a member node by id. Do not modify the record.
func (f *FSM) Node(id string) (*fsmpb.NodeRecord, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	n, ok := f.state.nodes[id]
	return n, ok
}

// Nodes returns every member node in id order. Do not modify the records.
func (f *FSM) Nodes() []*fsmpb.NodeRecord {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.sortedNodes()
}

// JoinToken returns a join token by id (including used and recently expired
// ones). Do not modify it.
func (f *FSM) JoinToken(id string) (*fsmpb.JoinToken, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	t, ok := f.state.tokens[id]
	return t, ok
}

// AppliedIndex returns the Raft index of the last log entry this FSM
// processed (commands, and configuration entries delivered in batches).
// Raft's own no-op and barrier entries never reach the FSM, so a read that
// must wait for a commit index should wait for an index of a command (the
// leader appends a COMMAND_TYPE_NOOP after winning an election for this).
func (f *FSM) AppliedIndex() uint64 {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.appliedIndex
}

// StateProto returns the whole state in its canonical snapshot form. It
// shares the stored records: do not modify it.
func (f *FSM) StateProto() *fsmpb.State {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.ToProto()
}

// Digest returns the SHA-256 of the deterministic state bytes, which is also
// the checksum stored in a snapshot of this state: equal digests mean equal
// states. It is all zeros only if the state cannot be marshalled, which a
// state built by Apply or StateFromProto never is.
func (f *FSM) Digest() [32]byte {
	b, err := MarshalState(f.StateProto())
	if err != nil {
		f.log.Error("fsm: cannot marshal state for digest", "error", err)
		return [32]byte{}
	}
	return sha256.Sum256(b)
}

// ImportToken returns a BYOK import token by id (including used and recently
// expired ones, whose private key is gone). Do not modify it.
func (f *FSM) ImportToken(id string) (*fsmpb.ImportToken, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.importToken(id)
}

// DueRotations returns up to limit (<= 0: no limit) ACTIVE keys with an
// automatic rotation period whose next rotation is due at now (next rotation
// <= now), ordered by next rotation time, then id. It reads a secondary
// index: O(log keys + result). The leader's scheduler proposes an automatic
// ROTATE_KEY for each; Apply refuses the ones no longer due. Do not modify
// the records.
func (f *FSM) DueRotations(now int64, limit int) []*fsmpb.KeyRecord {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.dueRotations(now, limit)
}

// DueDestructions returns up to limit (<= 0: no limit) PENDING_DESTRUCTION
// keys whose destroy-after time is <= now, ordered by that time, then id
// (indexed like DueRotations). Do not modify the records.
func (f *FSM) DueDestructions(now int64, limit int) []*fsmpb.KeyRecord {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.dueDestructions(now, limit)
}

// GrantsFor returns the grants that let principal use key keyID, sorted by
// grant id (nil if none): the per-request authorization lookup, one map
// read without allocation. The slice and the records are shared with the
// state and never change afterwards (a later grant or revocation replaces
// the slice): do not modify either.
func (f *FSM) GrantsFor(keyID, principal string) []*fsmpb.Grant {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.grantsFor[grantKey{keyID, principal}]
}

// Grants returns the grants on keyID to principal, sorted by grant id; an
// empty filter matches every key or every principal, so Grants("", "")
// lists all. The slice is the caller's; do not modify the records.
func (f *FSM) Grants(keyID, principal string) []*fsmpb.Grant {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.listGrants(keyID, principal)
}

// Grant returns a grant by id. Do not modify the record.
func (f *FSM) Grant(id string) (*fsmpb.Grant, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	g, ok := f.state.grants[id]
	return g, ok
}

// Denied reports whether principal is on the cluster-wide deny list, with
// its record (reason, time, by whom). It is checked on every request: one
// map read, no allocation. Do not modify the record.
func (f *FSM) Denied(principal string) (*fsmpb.DeniedPrincipal, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	d, ok := f.state.denied[principal]
	return d, ok
}

// DeniedPrincipals returns the deny list sorted by principal. The slice is
// the caller's; do not modify the records.
func (f *FSM) DeniedPrincipals() []*fsmpb.DeniedPrincipal {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.state.listDenied()
}
