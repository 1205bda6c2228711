package cluster

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb"
)

// compactTmpSuffix names the fresh bolt file a rewrite builds next to
// raft.db. A leftover one (the process died mid-rewrite, before the rename)
// is deleted by openCompactingStore.
const compactTmpSuffix = ".compact"

// stableKeys are the StableStore keys hashicorp/raft v1.8.0 uses (raft.go:
// keyCurrentTerm, keyLastVoteTerm, keyLastVoteCand; nothing else calls
// stable.Set/SetUint64). A rewrite copies exactly these. Re-check them when
// upgrading raft (grep 'stable\.\(Set\|Get\)' in its source).
var stableKeys = [][]byte{[]byte("CurrentTerm"), []byte("LastVoteTerm"), []byte("LastVoteCand")}

var errStoreClosed = errors.New("raft store is closed")

// compactingStore is the raft.LogStore and raft.StableStore Raft uses. It
// wraps a raft-boltdb BoltStore and can rewrite the bolt file from scratch
// (rewrite), so that pages bolt freed when Raft deleted log entries — which
// still hold those entries' bytes — leave the disk. Every call takes a read
// lock; rewrite takes the write lock, so Raft's calls block for the duration
// of a swap and never see a half-swapped store.
type compactingStore struct {
	path string

	mu sync.RWMutex
	db *raftboltdb.BoltStore // nil once closed or after a failed reopen
	// err is why db is nil when the store is not closed on purpose.
	err    error
	closed bool
}

var (
	_ raft.LogStore    = (*compactingStore)(nil)
	_ raft.StableStore = (*compactingStore)(nil)
)

func openCompactingStore(path string) (*compactingStore, error) {
	if err := os.Remove(path + compactTmpSuffix); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove leftover %s: %w", path+compactTmpSuffix, err)
	}
	db, err := raftboltdb.NewBoltStore(path)
	if err != nil {
		return nil, err
	}
	return &compactingStore{path: path, db: db}, nil
}

// get returns the open store; the caller holds s.mu (read or write).
func (s *compactingStore) get() (*raftboltdb.BoltStore, error) {
	if s.db == nil {
		if s.closed {
			return nil, errStoreClosed
		}
		return nil, fmt.Errorf("raft store %s is unavailable after a failed compaction: %w", s.path, s.err)
	}
	return s.db, nil
}

func (s *compactingStore) FirstIndex() (uint64, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	db, err := s.get()
	if err != nil {
		return 0, err
	}
	return db.FirstIndex()
}

func (s *compactingStore) LastIndex() (uint64, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	db, err := s.get()
	if err != nil {
		return 0, err
	}
	return db.LastIndex()
}

func (s *compactingStore) GetLog(index uint64, log *raft.Log) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	db, err := s.get()
	if err != nil {
		return err
	}
	return db.GetLog(index, log)
}

func (s *compactingStore) StoreLog(log *raft.Log) error {
	return s.StoreLogs([]*raft.Log{log})
}

func (s *compactingStore) StoreLogs(logs []*raft.Log) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	db, err := s.get()
	if err != nil {
		return err
	}
	return db.StoreLogs(logs)
}

func (s *compactingStore) DeleteRange(min, max uint64) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	db, err := s.get()
	if err != nil {
		return err
	}
	return db.DeleteRange(min, max)
}

func (s *compactingStore) Set(key, val []byte) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	db, err := s.get()
	if err != nil {
		return err
	}
	return db.Set(key, val)
}

func (s *compactingStore) Get(key []byte) ([]byte, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	db, err := s.get()
	if err != nil {
		return nil, err
	}
	return db.Get(key)
}

func (s *compactingStore) SetUint64(key []byte, val uint64) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	db, err := s.get()
	if err != nil {
		return err
	}
	return db.SetUint64(key, val)
}

func (s *compactingStore) GetUint64(key []byte) (uint64, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	db, err := s.get()
	if err != nil {
		return 0, err
	}
	return db.GetUint64(key)
}

// Close closes the bolt file; later calls fail with errStoreClosed.
func (s *compactingStore) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	if s.db == nil {
		return nil
	}
	err := s.db.Close()
	s.db = nil
	return err
}

// rewrite replaces the bolt file with a fresh one holding only the live
// log entries and the stable keys, so nothing deleted before survives in
// freed pages. Under the write lock:
//
//  1. copy logs FirstIndex..LastIndex and stableKeys into path+".compact"
//     (written without per-commit fsync, then fsynced once), close it;
//  2. close the current file, rename the fresh one over it (atomic), fsync
//     the directory, reopen.
//
// A crash before the rename leaves the old raft.db intact and a temp file
// that the next open deletes; after the rename the new file is complete.
func (s *compactingStore) rewrite() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	old, err := s.get()
	if err != nil {
		return err
	}
	tmp := s.path + compactTmpSuffix
	if err := os.Remove(tmp); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale %s: %w", tmp, err)
	}
	if err := copyStore(old, tmp); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	err = old.Close()
	s.db = nil
	if err != nil {
		_ = os.Remove(tmp)
		// Keep using the old file if it can be reopened.
		return errors.Join(fmt.Errorf("close raft store: %w", err), s.reopen())
	}
	if err := os.Rename(tmp, s.path); err != nil {
		_ = os.Remove(tmp)
		return errors.Join(fmt.Errorf("replace raft store: %w", err), s.reopen())
	}
	// The rename is done; a failure to make it durable is reported, but
	// the new file is what we (and a restart) use either way.
	dirErr := syncDir(filepath.Dir(s.path))
	if err := s.reopen(); err != nil {
		return err
	}
	if dirErr != nil {
		return fmt.Errorf("sync raft dir after compaction: %w", dirErr)
	}
	return nil
}

// reopen opens s.path into s.db; the caller holds the write lock.
func (s *compactingStore) reopen() error {
	db, err := raftboltdb.NewBoltStore(s.path)
	if err != nil {
		s.err = err
		return fmt.Errorf("reopen raft store %s: %w", s.path, err)
	}
	s.db, s.err = db, nil
	return nil
}

// copyStore writes src's live logs and stable keys into a new bolt file at
// dst and fsyncs it.
func copyStore(src *raftboltdb.BoltStore, dst string) error {
	fresh, err := raftboltdb.New(raftboltdb.Options{Path: dst, NoSync: true})
	if err != nil {
		return fmt.Errorf("create %s: %w", dst, err)
	}
	closeFresh := func(err error) error {
		if cerr := fresh.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("close %s: %w", dst, cerr)
		}
		return err
	}
	first, err := src.FirstIndex()
	if err != nil {
		return closeFresh(fmt.Errorf("first log index: %w", err))
	}
	last, err := src.LastIndex()
	if err != nil {
		return closeFresh(fmt.Errorf("last log index: %w", err))
	}
	const batch = 256
	if first > 0 {
		for lo := first; lo <= last; lo += batch {
			hi := min(lo+batch-1, last)
			logs := make([]*raft.Log, 0, hi-lo+1)
			for i := lo; i <= hi; i++ {
				l := new(raft.Log)
				if err := src.GetLog(i, l); err != nil {
					return closeFresh(fmt.Errorf("copy log %d: %w", i, err))
				}
				logs = append(logs, l)
			}
			if err := fresh.StoreLogs(logs); err != nil {
				return closeFresh(fmt.Errorf("copy logs %d-%d: %w", lo, hi, err))
			}
		}
	}
	for _, k := range stableKeys {
		v, err := src.Get(k)
		if errors.Is(err, raftboltdb.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return closeFresh(fmt.Errorf("copy %s: %w", k, err))
		}
		if err := fresh.Set(k, v); err != nil {
			return closeFresh(fmt.Errorf("copy %s: %w", k, err))
		}
	}
	if err := fresh.Sync(); err != nil {
		return closeFresh(fmt.Errorf("sync %s: %w", dst, err))
	}
	return closeFresh(nil)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	serr := d.Sync()
	if cerr := d.Close(); serr == nil {
		serr = cerr
	}
	return serr
}

// removeSnapshotTemps deletes "<id>.tmp" snapshot directories a crash left
// behind (raft's FileSnapshotStore neither lists nor reaps them, and they
// may hold state that was since destroyed). Only called before Raft starts,
// when no snapshot can be in progress.
func removeSnapshotTemps(dir string) error {
	entries, err := os.ReadDir(filepath.Join(dir, "snapshots"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.IsDir() && filepath.Ext(e.Name()) == ".tmp" {
			if err := os.RemoveAll(filepath.Join(dir, "snapshots", e.Name())); err != nil {
				return err
			}
		}
	}
	return nil
}
