package cluster

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// newMarker returns bytes that occur nowhere but where the test put them.
func newMarker(t testing.TB) []byte {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return []byte("CABINET-TEST-MARKER-" + hex.EncodeToString(b))
}

// filesContaining lists the files under dir (relative paths) whose bytes
// contain marker.
func filesContaining(t testing.TB, dir string, marker []byte) []string {
	t.Helper()
	// A live node renames and deletes files while we walk (a snapshot's
	// .tmp directory becomes its final name; compaction swaps the log
	// file). A file that vanished mid-scan may have reappeared under a name
	// already passed, so such a scan proves nothing: scan again.
	for attempt := 0; attempt < 20; attempt++ {
		out, vanished, err := scanForMarker(dir, marker)
		if err != nil {
			t.Fatal(err)
		}
		if !vanished {
			return out
		}
	}
	t.Fatalf("files under %s kept changing during 20 scans", dir)
	return nil
}

func scanForMarker(dir string, marker []byte) (out []string, vanished bool, err error) {
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			var b []byte
			if b, err = os.ReadFile(path); err == nil && bytes.Contains(b, marker) {
				rel, _ := filepath.Rel(dir, path)
				out = append(out, rel)
			}
		}
		if errors.Is(err, fs.ErrNotExist) {
			vanished = true
			return nil
		}
		return err
	})
	return out, vanished, err
}

// proposeRejectedMaterial appends n CREATE_KEY entries whose wrapped
// material is marker but which the FSM refuses (the key id exists), so the
// material is in the log and in no state: like a destroyed key's entries.
func (c *testCluster) proposeRejectedMaterial(marker []byte, existingKey int, n int) {
	c.t.Helper()
	for i := 0; i < n; i++ {
		via := c.live()[i%len(c.live())]
		ck := createKey(existingKey)
		ck.Material.Blob = bytes.Repeat(marker, 16)
		res, err := c.propose(via, fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, ck, "")
		if err != nil {
			c.t.Fatal(err)
		}
		if res.GetCode() != fsmpb.ResultCode_RESULT_CODE_ALREADY_EXISTS {
			c.t.Fatalf("duplicate create: %v %s", res.GetCode(), res.GetMessage())
		}
	}
}

// admitGhost records a node (never started) whose identity key is marker:
// state that a later REMOVE_NODE drops, as DESTROY_KEY drops material.
func (c *testCluster) admitGhost(via *testNode, id string, marker []byte) {
	c.t.Helper()
	secret := sha256.Sum256([]byte("secret-" + id))
	c.mustPropose(via, fsmpb.CommandType_COMMAND_TYPE_CREATE_JOIN_TOKEN, &fsmpb.CreateJoinToken{
		TokenId: "jt-" + id, SecretHash: secret[:], ExpiresUnixNano: time.Now().Add(time.Hour).UnixNano(),
	}, "")
	c.mustPropose(via, fsmpb.CommandType_COMMAND_TYPE_ADMIT_NODE, &fsmpb.AdmitNode{
		TokenId: "jt-" + id, SecretHash: secret[:],
		Node: &fsmpb.NodeRecord{NodeId: id, ApiAddr: "api-" + id, RaftAddr: "ghost.invalid:" + id, IdentityPublicKeyDer: marker},
	}, "")
}

func compactAll(t *testing.T, nodes []*testNode) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tn := range nodes {
		if err := tn.node.CompactLog(ctx); err != nil {
			t.Fatalf("CompactLog on %s: %v", tn.id, err)
		}
	}
}

func snapshotDirs(t testing.TB, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(dir, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// TestCompactLogRemovesDroppedMaterial: after CompactLog on every node, no
// file under any node's Dir holds bytes of entries the state dropped. The
// first sub-test runs steps 1-2 only and shows the bytes survive in bolt's
// freed pages, i.e. that step 3 (rewriting raft.db) is what removes them.
func TestCompactLogRemovesDroppedMaterial(t *testing.T) {
	c := newTestCluster(t, 3)
	leader := c.waitLeader()
	markLog, markState := newMarker(t), newMarker(t)

	c.admitGhost(leader, "ghost", markState)
	c.mustPropose(leader, fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(900), "")
	c.proposeRejectedMaterial(markLog, 900, 40)
	c.waitConverged()
	for _, tn := range c.live() { // these snapshots hold the ghost's record
		if err := tn.node.Snapshot(); err != nil {
			t.Fatal(err)
		}
	}
	c.mustPropose(leader, fsmpb.CommandType_COMMAND_TYPE_REMOVE_NODE, &fsmpb.RemoveNode{NodeId: "ghost"}, "")
	c.waitConverged()
	for _, tn := range c.live() {
		if got := filesContaining(t, tn.dir, markLog); !slices.Contains(got, "raft.db") {
			t.Fatalf("%s: log marker not in raft.db before compaction (found in %v): the scan is broken", tn.id, got)
		}
		if got := filesContaining(t, tn.dir, markState); !slices.ContainsFunc(got, func(p string) bool { return strings.HasPrefix(p, "snapshots") }) {
			t.Fatalf("%s: state marker not in a snapshot before compaction (found in %v)", tn.id, got)
		}
	}

	t.Run("without rewrite freed pages keep the entries", func(t *testing.T) {
		for _, tn := range c.live() {
			tn.node.compactSkipRewrite = true
		}
		compactAll(t, c.live())
		for _, tn := range c.live() {
			tn.node.compactSkipRewrite = false
			st := tn.node.Status()
			if st.LastSnapshotIndex == 0 || (st.FirstLogIndex != 0 && st.FirstLogIndex <= st.LastSnapshotIndex) {
				t.Fatalf("%s: log not truncated to the snapshot: first %d, snapshot %d", tn.id, st.FirstLogIndex, st.LastSnapshotIndex)
			}
			if dirs := snapshotDirs(t, tn.dir); len(dirs) != 1 {
				t.Fatalf("%s: snapshots %v, want only the newest", tn.id, dirs)
			}
			if got := filesContaining(t, tn.dir, markState); slices.ContainsFunc(got, func(p string) bool { return strings.HasPrefix(p, "snapshots") }) {
				t.Fatalf("%s: an old snapshot survived: %v", tn.id, got)
			}
			// The entries are deleted from the log, yet their bytes are
			// still in raft.db: bolt does not clear pages it frees.
			if got := filesContaining(t, tn.dir, markLog); !slices.Equal(got, []string{"raft.db"}) {
				t.Fatalf("%s: without the rewrite the log marker is in %v; want it left in raft.db's freed pages", tn.id, got)
			}
		}
	})

	t.Run("with rewrite nothing is left", func(t *testing.T) {
		compactAll(t, c.live())
		for _, tn := range c.live() {
			for _, m := range [][]byte{markLog, markState} {
				if got := filesContaining(t, tn.dir, m); len(got) != 0 {
					t.Fatalf("%s: dropped material still on disk in %v", tn.id, got)
				}
			}
			if got := tn.node.raft.ReloadableConfig().TrailingLogs; got != tn.node.cfg.TrailingLogs {
				t.Fatalf("%s: TrailingLogs %d after compaction, want %d restored", tn.id, got, tn.node.cfg.TrailingLogs)
			}
		}
		// The cluster still works.
		c.mustPropose(followers(c)[0], fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(901), "")
		c.waitConverged()
	})
}

// TestCompactLogWhileCommitting: proposals through every node succeed while
// every node compacts repeatedly; a full restart afterwards recovers the
// same state.
func TestCompactLogWhileCommitting(t *testing.T) {
	c := newTestCluster(t, 3)
	c.waitLeader()
	const writers, perWriter = 3, 15
	var wg sync.WaitGroup
	errs := make(chan error, writers*perWriter+10)
	stop := make(chan struct{})
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			via := c.nodes[w]
			for i := 0; i < perWriter; i++ {
				res, err := c.propose(via, fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(1000+w*100+i), "")
				if err == nil && res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
					err = fmt.Errorf("%v %s", res.GetCode(), res.GetMessage())
				}
				if err != nil {
					errs <- fmt.Errorf("writer %d proposal %d: %w", w, i, err)
				}
			}
		}(w)
	}
	var compactions atomic.Int64
	var cwg sync.WaitGroup
	for _, tn := range c.nodes {
		cwg.Add(1)
		go func(tn *testNode) {
			defer cwg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				// 20s for each call (not for the whole loop, which lasts as
				// long as the writers do).
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				err := tn.node.CompactLog(ctx)
				cancel()
				if err != nil {
					errs <- fmt.Errorf("CompactLog on %s: %w", tn.id, err)
					return
				}
				compactions.Add(1)
			}
		}(tn)
	}
	wg.Wait()
	close(stop)
	cwg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	if compactions.Load() < 3 {
		t.Fatalf("only %d compactions ran during the writes", compactions.Load())
	}
	t.Logf("%d compactions during %d proposals", compactions.Load(), writers*perWriter)
	c.waitConverged()
	digest := c.nodes[0].fsm.Digest()
	for _, tn := range c.nodes {
		if tn.fsm.KeyCount() != writers*perWriter {
			t.Fatalf("%s holds %d keys", tn.id, tn.fsm.KeyCount())
		}
	}

	// Full restart: every node rebuilds its state from its compacted disk.
	for _, tn := range c.nodes {
		c.stop(tn)
	}
	for _, tn := range c.nodes {
		c.restart(tn)
	}
	c.waitLeader()
	c.waitConverged()
	for _, tn := range c.nodes {
		if tn.fsm.Digest() != digest {
			t.Fatalf("%s: digest after restart differs", tn.id)
		}
	}
	c.mustPropose(c.nodes[1], fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(2000), "")
	c.waitConverged()
}

// TestCompactLogFollowerCatchesUpBySnapshot: a follower down while the
// others compact has no log to replay from; it catches up by snapshot
// install, and its own CompactLog then removes the entries it still held.
func TestCompactLogFollowerCatchesUpBySnapshot(t *testing.T) {
	c := newTestCluster(t, 3)
	leader := c.waitLeader()
	mark := newMarker(t)
	c.mustPropose(leader, fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(1), "")
	c.proposeRejectedMaterial(mark, 1, 10)
	c.waitConverged()
	f := followers(c)[0]
	fLast := f.node.Status().LastLogIndex
	c.stop(f)
	for i := 0; i < 10; i++ {
		c.mustPropose(c.live()[i%2], fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(10+i), "")
	}
	compactAll(t, c.live())
	lst := leader.node.Status()
	if lst.FirstLogIndex != 0 && lst.FirstLogIndex <= fLast+1 {
		t.Fatalf("leader log starts at %d; the follower's next entry %d should be compacted away", lst.FirstLogIndex, fLast+1)
	}
	c.restart(f)
	c.waitConverged()
	fst := f.node.Status()
	if fst.LastSnapshotIndex < lst.LastSnapshotIndex {
		t.Fatalf("follower's snapshot index %d < leader's %d: it did not install the leader's snapshot", fst.LastSnapshotIndex, lst.LastSnapshotIndex)
	}
	if f.fsm.KeyCount() != 11 || f.fsm.Digest() != leader.fsm.Digest() {
		t.Fatalf("follower holds %d keys", f.fsm.KeyCount())
	}
	if got := filesContaining(t, f.dir, mark); !slices.Contains(got, "raft.db") {
		t.Fatalf("expected the follower's own old entries in its raft.db before it compacts, found in %v", got)
	}
	compactAll(t, []*testNode{f})
	if got := filesContaining(t, f.dir, mark); len(got) != 0 {
		t.Fatalf("follower still holds dropped material in %v", got)
	}
	c.mustPropose(f, fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(99), "")
	c.waitConverged()
}

// TestCompactLogCoalesces: 100 calls made while one compaction runs share
// one more compaction.
func TestCompactLogCoalesces(t *testing.T) {
	c := newTestCluster(t, 1)
	n := c.nodes[0].node
	release := make(chan struct{})
	var entered atomic.Int32
	n.compactHook = func() {
		if entered.Add(1) == 1 {
			<-release
		}
	}
	before := n.compactions.Load()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	const calls = 100
	errs := make(chan error, calls)
	go func() { errs <- n.CompactLog(ctx) }()
	waitFor(t, 5*time.Second, "first compaction to start", func() error {
		if entered.Load() != 1 {
			return fmt.Errorf("entered %d", entered.Load())
		}
		return nil
	})
	for i := 1; i < calls; i++ {
		go func() { errs <- n.CompactLog(ctx) }()
	}
	waitFor(t, 5*time.Second, "callers to queue", func() error {
		n.compactMu.Lock()
		defer n.compactMu.Unlock()
		if n.compactPending == nil || n.compactPending.joiners != calls-1 {
			return fmt.Errorf("pending run: %+v", n.compactPending)
		}
		return nil
	})
	close(release)
	for i := 0; i < calls; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got := n.compactions.Load() - before; got != 2 {
		t.Fatalf("%d calls ran %d compactions, want 2", calls, got)
	}
}

// TestOpenRemovesCompactionLeftovers: a node that died mid-compaction (temp
// bolt file written, not renamed) or mid-snapshot reopens cleanly.
func TestOpenRemovesCompactionLeftovers(t *testing.T) {
	c := newTestCluster(t, 3)
	c.waitLeader()
	f := followers(c)[0]
	c.stop(f)
	tmpDB := filepath.Join(f.dir, "raft.db"+compactTmpSuffix)
	tmpSnap := filepath.Join(f.dir, "snapshots", "2-99-1.tmp")
	if err := os.WriteFile(tmpDB, []byte("half-written"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(tmpSnap, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tmpSnap, "state.bin"), []byte("partial"), 0o600); err != nil {
		t.Fatal(err)
	}
	c.restart(f)
	for _, p := range []string{tmpDB, tmpSnap} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Fatalf("%s survived Open: %v", p, err)
		}
	}
	c.mustPropose(f, fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(5), "")
	c.waitConverged()
}

// TestStoreRewrite checks the store alone: deleted entries stay in the
// bolt file's freed pages until rewrite, which keeps live entries and the
// stable keys, and the store works afterwards.
func TestStoreRewrite(t *testing.T) {
	path := filepath.Join(t.TempDir(), "raft.db")
	s, err := openCompactingStore(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	mark := newMarker(t)
	var logs []*raft.Log
	for i := uint64(1); i <= 100; i++ {
		data := []byte(fmt.Sprintf("live-%d", i))
		if i <= 90 {
			data = bytes.Repeat(mark, 8)
		}
		logs = append(logs, &raft.Log{Index: i, Term: 3, Type: raft.LogCommand, Data: data})
	}
	if err := s.StoreLogs(logs); err != nil {
		t.Fatal(err)
	}
	stable := map[string][]byte{}
	for i, k := range stableKeys {
		v := []byte(fmt.Sprintf("value-%d", i))
		stable[string(k)] = v
		if err := s.Set(k, v); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.DeleteRange(1, 90); err != nil {
		t.Fatal(err)
	}
	if got := filesContaining(t, filepath.Dir(path), mark); len(got) == 0 {
		t.Fatal("deleted entries vanished without a rewrite: this test no longer shows why rewrite exists")
	}
	if err := s.rewrite(); err != nil {
		t.Fatal(err)
	}
	if got := filesContaining(t, filepath.Dir(path), mark); len(got) != 0 {
		t.Fatalf("marker still in %v after rewrite", got)
	}
	if first, _ := s.FirstIndex(); first != 91 {
		t.Fatalf("first index %d", first)
	}
	if last, _ := s.LastIndex(); last != 100 {
		t.Fatalf("last index %d", last)
	}
	var l raft.Log
	if err := s.GetLog(95, &l); err != nil || string(l.Data) != "live-95" || l.Term != 3 {
		t.Fatalf("log 95: %+v %v", l, err)
	}
	for k, v := range stable {
		got, err := s.Get([]byte(k))
		if err != nil || !bytes.Equal(got, v) {
			t.Fatalf("stable %s = %q, %v", k, got, err)
		}
	}
	if err := s.StoreLog(&raft.Log{Index: 101, Term: 4, Data: []byte("after")}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path + compactTmpSuffix); !os.IsNotExist(err) {
		t.Fatalf("temp file left: %v", err)
	}
	// Reopen from disk.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := openCompactingStore(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if last, _ := s2.LastIndex(); last != 101 {
		t.Fatalf("last index after reopen %d", last)
	}
}

// TestCompactAfterRunsAutomatically: with Config.CompactAfter selecting
// REMOVE_NODE, a burst of removals leaves no trace on any node without
// anyone calling CompactLog. The number of runs is logged, not bounded:
// usually one or two, but on a loaded machine removals can arrive further
// apart than CompactDelay (that concurrent requests share a run is
// TestCompactLogCoalesces').
func TestCompactAfterRunsAutomatically(t *testing.T) {
	c := newTestClusterWith(t, 3, func(cfg *Config) {
		cfg.CompactAfter = func(cmd *fsmpb.Command, res *fsmpb.Result) bool {
			return cmd.GetType() == fsmpb.CommandType_COMMAND_TYPE_REMOVE_NODE && res.GetCode() == fsmpb.ResultCode_RESULT_CODE_OK
		}
	})
	leader := c.waitLeader()
	mark := newMarker(t)
	const ghosts = 20
	for i := 0; i < ghosts; i++ {
		c.admitGhost(leader, fmt.Sprintf("ghost%d", i), mark)
	}
	c.waitConverged()
	before := map[string]uint64{}
	for _, tn := range c.live() {
		before[tn.id] = tn.node.compactions.Load()
		if len(filesContaining(t, tn.dir, mark)) == 0 {
			t.Fatalf("%s: marker not on disk before the removals", tn.id)
		}
	}
	for i := 0; i < ghosts; i++ {
		c.mustPropose(c.live()[i%3], fsmpb.CommandType_COMMAND_TYPE_REMOVE_NODE, &fsmpb.RemoveNode{NodeId: fmt.Sprintf("ghost%d", i)}, "")
	}
	c.waitConverged()
	for _, tn := range c.live() {
		waitFor(t, 30*time.Second, tn.id+" to compact on its own", func() error {
			if got := filesContaining(t, tn.dir, mark); len(got) != 0 {
				return fmt.Errorf("marker in %v", got)
			}
			return nil
		})
		runs := tn.node.compactions.Load() - before[tn.id]
		t.Logf("%s: %d automatic compactions for %d removals", tn.id, runs, ghosts)
		if runs == 0 {
			t.Fatalf("%s: the marker is gone without an automatic compaction", tn.id)
		}
	}
}
