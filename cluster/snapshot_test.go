package cluster

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

func openSnapshotBytes(t *testing.T, n *Node) (SnapshotInfo, []byte) {
	t.Helper()
	info, data, err := tryOpenSnapshotBytes(t, n)
	if err != nil {
		t.Fatalf("OpenSnapshot: %v", err)
	}
	return info, data
}

// openLeaderSnapshotBytes is openSnapshotBytes on the current leader, again
// on the next one if leadership moves in the middle.
func openLeaderSnapshotBytes(t *testing.T, c *testCluster) (SnapshotInfo, []byte) {
	t.Helper()
	var info SnapshotInfo
	var data []byte
	c.onLeader("OpenSnapshot", func(l *testNode) (err error) {
		info, data, err = tryOpenSnapshotBytes(t, l.node)
		return err
	})
	return info, data
}

func tryOpenSnapshotBytes(t *testing.T, n *Node) (SnapshotInfo, []byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, rc, err := n.OpenSnapshot(ctx)
	if err != nil {
		return info, nil, err
	}
	defer rc.Close()
	data, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(data)) != info.Size {
		t.Fatalf("snapshot is %d bytes, info says %d", len(data), info.Size)
	}
	return info, data, nil
}

// TestSnapshotSaveRestore: a snapshot opened on the leader covers every
// committed write; restoring it on the leader rolls every node back to it
// while the Raft membership stays; followers refuse both.
func TestSnapshotSaveRestore(t *testing.T) {
	c := newTestCluster(t, 3)
	leader := c.waitLeader()
	c.mustPropose(followers(c)[0], fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(1), "")
	// Leader-only calls below go to whichever node leads at the time: on a
	// loaded machine leadership can move during the test. A new leader's
	// snapshot also covers every entry committed before.
	before := leader.node.Status().CommitIndex
	info, data := openLeaderSnapshotBytes(t, c)
	if info.Index <= before || info.Term == 0 {
		t.Fatalf("snapshot at index %d term %d; commit index before was %d", info.Index, info.Term, before)
	}
	st, err := fsm.ReadSnapshot(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	if len(st.GetKeys()) != 1 || st.GetKeys()[0].GetKeyId() != keyID(1) {
		t.Fatalf("snapshot keys: %v", st.GetKeys())
	}
	// Twice in a row works (the NOOP gives each call something new).
	if info2, _ := openLeaderSnapshotBytes(t, c); info2.Index <= info.Index {
		t.Fatalf("second snapshot at %d, first at %d", info2.Index, info.Index)
	}

	c.mustPropose(leader, fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(2), "")
	c.waitConverged()
	for _, f := range followers(c) {
		if _, _, err := f.node.OpenSnapshot(context.Background()); !errors.Is(err, ErrNotLeader) {
			t.Fatalf("OpenSnapshot on a follower: %v", err)
		}
		if _, err := f.node.RestoreSnapshot(context.Background(), data); !errors.Is(err, ErrNotLeader) {
			t.Fatalf("RestoreSnapshot on a follower: %v", err)
		}
	}
	corrupt := bytes.Clone(data)
	corrupt[len(corrupt)/2] ^= 1
	// RestoreSnapshot checks the data before leadership, so a corrupt
	// snapshot is refused on any node.
	if _, err := c.waitLeader().node.RestoreSnapshot(context.Background(), corrupt); !errors.Is(err, fsm.ErrCorruptSnapshot) {
		t.Fatalf("corrupt snapshot: %v", err)
	}
	var idx uint64
	leader = c.onLeader("RestoreSnapshot", func(l *testNode) (err error) {
		idx, err = l.node.RestoreSnapshot(context.Background(), data)
		return err
	})
	c.waitConverged()
	for _, tn := range c.live() {
		if _, ok := tn.fsm.Key(keyID(1)); !ok {
			t.Errorf("%s lost key 1", tn.id)
		}
		if _, ok := tn.fsm.Key(keyID(2)); ok {
			t.Errorf("%s still has key 2, created after the snapshot", tn.id)
		}
		if got := tn.node.Status().AppliedIndex; got < idx {
			t.Errorf("%s applied %d < restore index %d", tn.id, got, idx)
		}
	}
	if servers, err := leader.node.Servers(); err != nil || len(servers) != 3 {
		t.Fatalf("membership after restore: %v %v", servers, err)
	}
	// The cluster keeps working.
	c.mustPropose(followers(c)[1], fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(3), "")
	c.waitConverged()
}

// TestSeedFromSnapshot: a node whose empty Raft dir was seeded from a
// snapshot starts as the single voter of a new cluster holding that state
// (with its own node record swapped in), and keeps committing.
func TestSeedFromSnapshot(t *testing.T) {
	src := newTestCluster(t, 1)
	leader := src.waitLeader()
	src.mustPropose(leader, fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(7), "")
	_, data := openSnapshotBytes(t, leader.node)
	src.stop(leader)

	// A port below the ephemeral range, free again just before the node
	// binds it.
	ln := listenLoopback(t)
	addr := ln.Addr().String()
	st, err := fsm.ReadSnapshot(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	seeded, err := ReplaceMembership(st, []*fsmpb.NodeRecord{{NodeId: "restored", ApiAddr: "api-restored", RaftAddr: addr, Voter: true}}, true)
	if err != nil {
		t.Fatal(err)
	}
	tn := &testNode{id: "restored", apiAddr: "api-restored", dir: t.TempDir(), raftLn: ln}
	if err := SeedFromSnapshot(tn.dir, tn.id, addr, seeded); err != nil {
		t.Fatalf("SeedFromSnapshot: %v", err)
	}
	if err := SeedFromSnapshot(tn.dir, tn.id, addr, seeded); err == nil {
		t.Fatal("seeding a dir with Raft state again was accepted")
	}
	if err := SeedFromSnapshot(t.TempDir(), tn.id, addr, data[:len(data)-1]); !errors.Is(err, fsm.ErrCorruptSnapshot) {
		t.Fatalf("seeding a truncated snapshot: %v", err)
	}
	c := &testCluster{t: t, ca: src.ca, maxStaleness: time.Second}
	c.fwd = &directForwarder{c: c, cut: map[string]bool{}}
	c.nodes = []*testNode{tn}
	ln.Close()
	c.open(tn)
	t.Cleanup(func() { c.stop(tn) })
	if !tn.node.HasState() {
		t.Fatal("seeded node reports no Raft state")
	}
	c.waitLeader()
	if _, ok := tn.fsm.Key(keyID(7)); !ok {
		t.Fatal("seeded node lacks the snapshot's key")
	}
	if n := tn.fsm.Nodes(); len(n) != 1 || n[0].GetNodeId() != "restored" {
		t.Fatalf("seeded node records: %v", n)
	}
	if tn.fsm.Cluster().GetClusterId() != "c-test" {
		t.Fatalf("cluster id %q", tn.fsm.Cluster().GetClusterId())
	}
	c.mustPropose(tn, fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(8), "")
	if servers, err := tn.node.Servers(); err != nil || len(servers) != 1 || servers[0].ID != "restored" {
		t.Fatalf("configuration: %v %v", servers, err)
	}
}

func backupBytes(t testing.TB, hdr BackupHeader, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	bw, err := NewBackupWriter(&buf, hdr)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bw.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := bw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func sampleSnapshot(t testing.TB) []byte {
	t.Helper()
	s := fsm.NewState()
	cmd, err := fsm.NewCommand(fsmpb.CommandType_COMMAND_TYPE_INIT_CLUSTER, &fsmpb.InitCluster{
		ClusterId: "c-sample", CaCertDer: []byte("ca"), CaKey: &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte("sealed-ca")},
		Kek:       &fsmpb.KEKVersion{Version: 1, CheckValue: []byte("kcv"), State: fsmpb.KEKState_KEK_STATE_ACTIVE},
		FirstNode: &fsmpb.NodeRecord{NodeId: "n1", ApiAddr: "127.0.0.1:1", RaftAddr: "127.0.0.1:2", IdentityPublicKeyDer: []byte("pub")},
	}, "init", "admin:test")
	if err != nil {
		t.Fatal(err)
	}
	cmd.LeaderTimeUnixNano = 1
	if res := s.Apply(1, cmd); res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
		t.Fatal(res.GetMessage())
	}
	ck, err := fsm.NewCommand(fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKey(1), "", "admin:test")
	if err != nil {
		t.Fatal(err)
	}
	ck.LeaderTimeUnixNano = 2
	if res := s.Apply(2, ck); res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
		t.Fatal(res.GetMessage())
	}
	var buf bytes.Buffer
	if err := fsm.WriteSnapshot(&buf, s.ToProto()); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestReadBackup: a snapshot file round-trips, and every kind of damage is
// refused with ErrCorruptBackup and a message saying what is wrong.
func TestReadBackup(t *testing.T) {
	data := sampleSnapshot(t)
	hdr := BackupHeader{ClusterID: "c-sample", Index: 42, Term: 3, TakenAt: time.Unix(1700000000, 0).UTC(), Size: int64(len(data))}
	file := backupBytes(t, hdr, data)
	b, err := ReadBackup(bytes.NewReader(file))
	if err != nil {
		t.Fatalf("ReadBackup: %v", err)
	}
	if b.Header.Index != 42 || b.Header.Term != 3 || !bytes.Equal(b.Data, data) || len(b.State.GetKeys()) != 1 || b.StateDigest() == "" {
		t.Fatalf("round trip: %+v", b.Header)
	}
	sum := Summarize(b.State)
	if sum.Keys != 1 || sum.ByState["ACTIVE"] != 1 || sum.BySpec["AES_256"] != 1 || len(sum.KEKs) != 1 || sum.KEKs[0].Keys != 1 {
		t.Fatalf("summary: %+v", sum)
	}

	flip := func(i int) []byte { c := bytes.Clone(file); c[i] ^= 0x01; return c }
	otherCluster := hdr
	otherCluster.ClusterID = "c-other"
	badState := bytes.Clone(data)
	badState[20] ^= 1 // inner checksum no longer matches; outer one recomputed
	cases := map[string]struct {
		in   []byte
		want string
	}{
		"empty":              {nil, "truncated"},
		"raw raft snapshot":  {data, "raw Raft snapshot"},
		"bad magic":          {flip(0), "bad magic"},
		"header length":      {flip(8), "header"},
		"header byte":        {flip(14), "header"},
		"data byte":          {flip(len(file) - 60), "checksum mismatch"},
		"checksum byte":      {flip(len(file) - 1), "checksum mismatch"},
		"truncated data":     {file[:len(file)-40], "truncated"},
		"truncated checksum": {file[:len(file)-10], "truncated"},
		"trailing bytes":     {append(bytes.Clone(file), 0), "after the checksum"},
		"wrong cluster":      {backupBytes(t, otherCluster, data), "header names cluster"},
		"inner snapshot":     {backupBytes(t, hdr, badState), "corrupt snapshot"},
	}
	for name, tc := range cases {
		_, err := ReadBackup(bytes.NewReader(tc.in))
		if !errors.Is(err, ErrCorruptBackup) || !bytes.Contains([]byte(err.Error()), []byte(tc.want)) {
			t.Errorf("%s: %v, want ErrCorruptBackup mentioning %q", name, err, tc.want)
		}
	}

	// The writer refuses short or long data.
	var buf bytes.Buffer
	bw, _ := NewBackupWriter(&buf, hdr)
	if _, err := bw.Write(append(bytes.Clone(data), 0)); err == nil {
		t.Error("writer accepted more data than announced")
	}
	if err := bw.Close(); err == nil {
		t.Error("writer closed with less data than announced")
	}
}

// FuzzReadBackup: no input makes the snapshot-file reader panic, and what it
// accepts round-trips.
func FuzzReadBackup(f *testing.F) {
	data := sampleSnapshot(f)
	file := backupBytes(f, BackupHeader{ClusterID: "c-sample", Index: 1, Term: 1, Size: int64(len(data))}, data)
	f.Add(file)
	f.Add(file[:len(file)/2])
	f.Add(data)
	f.Add([]byte(backupMagic + "\x00\x00\x00\x02{}"))
	f.Fuzz(func(t *testing.T, in []byte) {
		b, err := ReadBackup(bytes.NewReader(in))
		if err != nil {
			if !errors.Is(err, ErrCorruptBackup) {
				t.Fatalf("error does not wrap ErrCorruptBackup: %v", err)
			}
			return
		}
		again := backupBytes(t, b.Header, b.Data)
		if _, err := ReadBackup(bytes.NewReader(again)); err != nil {
			t.Fatalf("accepted file does not round-trip: %v", err)
		}
	})
}
