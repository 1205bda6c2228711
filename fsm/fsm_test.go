package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

func TestFSMApply(t *testing.T) {
	var logs bytes.Buffer
	f := New(Config{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	type seen struct {
		index uint64
		code  fsmpb.ResultCode
	}
	var observed []seen
	f.OnApply(func(index uint64, cmd *fsmpb.Command, res *fsmpb.Result) {
		observed = append(observed, seen{index, res.GetCode()})
		// Observers run outside the lock, so they may read.
		f.AppliedIndex()
	})
	a := newApplier(t)

	res := f.Apply(logOf(t, 1, a.command(typInit, initPayload(), env{})))
	if r, ok := res.(*fsmpb.Result); !ok || r.GetCode() != codeOK {
		t.Fatalf("init: %v", res)
	}
	// Undecodable data comes back as an error value and is logged.
	res = f.Apply(&raft.Log{Index: 2, Type: raft.LogCommand, Data: []byte{0xff}})
	if err, ok := res.(error); !ok || !errors.Is(err, ErrMalformedCommand) {
		t.Fatalf("garbage: got %v, want an ErrMalformedCommand error", res)
	}
	if !strings.Contains(logs.String(), "level=ERROR") {
		t.Fatalf("undecodable entry not logged: %s", logs.String())
	}
	// Non-command entries only advance the index.
	f.ApplyBatch([]*raft.Log{{Index: 3, Type: raft.LogConfiguration}})
	if f.AppliedIndex() != 3 {
		t.Fatalf("applied index %d, want 3", f.AppliedIndex())
	}
	out := f.ApplyBatch([]*raft.Log{
		logOf(t, 4, a.command(typCreate, createKeyPayload(keyID(1)), env{})),
		logOf(t, 5, a.command(typCreate, createKeyPayload(keyID(1)), env{})),
		logOf(t, 6, a.command(77, nil, env{ignorable: true})),
	})
	if len(out) != 3 || out[0].(*fsmpb.Result).GetCode() != codeOK ||
		out[1].(*fsmpb.Result).GetCode() != fsmpb.ResultCode_RESULT_CODE_ALREADY_EXISTS ||
		out[2].(*fsmpb.Result).GetMessage() != "ignored unknown command type 77" {
		t.Fatalf("batch results: %v", out)
	}
	want := []seen{{1, codeOK}, {4, codeOK}, {5, fsmpb.ResultCode_RESULT_CODE_ALREADY_EXISTS}, {6, codeOK}}
	if fmt.Sprint(observed) != fmt.Sprint(want) {
		t.Fatalf("observed %v, want %v", observed, want)
	}
	if f.AppliedIndex() != 6 || f.Halted() != nil {
		t.Fatalf("applied index %d halted %v", f.AppliedIndex(), f.Halted())
	}
}

// A non-ignorable unknown command stops the node loudly: error logs, Halted,
// no snapshots, no further applies.
func TestFSMUnknownCommandHalts(t *testing.T) {
	var logs bytes.Buffer
	f := New(Config{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	a := newApplier(t)
	f.Apply(logOf(t, 1, a.command(typInit, initPayload(), env{})))

	res := f.Apply(logOf(t, 2, a.command(77, nil, env{}))).(*fsmpb.Result)
	checkResult(t, res, fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION, "too old")
	if !errors.Is(f.Halted(), ErrUnsupportedCommand) {
		t.Fatalf("Halted() = %v", f.Halted())
	}
	if !strings.Contains(logs.String(), "level=ERROR") || !strings.Contains(logs.String(), "upgrade it") {
		t.Fatalf("halt not logged at error level: %s", logs.String())
	}
	if _, err := f.Snapshot(); !errors.Is(err, ErrUnsupportedCommand) {
		t.Fatalf("a halted FSM took a snapshot (err %v)", err)
	}
	res = f.Apply(logOf(t, 3, a.command(typCreate, createKeyPayload(keyID(1)), env{}))).(*fsmpb.Result)
	checkResult(t, res, fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION, "refused")
	if f.KeyCount() != 0 || f.AppliedIndex() != 1 {
		t.Fatalf("halted FSM applied: keys %d index %d", f.KeyCount(), f.AppliedIndex())
	}
	// A snapshot from the rest of the cluster un-halts it.
	healthy := populated(t)
	if err := f.Restore(io.NopCloser(bytes.NewReader(snapshotBytes(t, healthy)))); err != nil {
		t.Fatal(err)
	}
	if f.Halted() != nil || f.Digest() != healthy.Digest() {
		t.Fatalf("restore did not replace the halted state")
	}
}

func TestCommandCodec(t *testing.T) {
	cmd, err := NewCommand(typCreate, createKeyPayload(keyID(1)), "req", "alice")
	if err != nil {
		t.Fatal(err)
	}
	if cmd.GetFormat() != CommandFormat || cmd.GetRequestId() != "req" || cmd.GetPrincipal() != "alice" {
		t.Fatalf("command %v", cmd)
	}
	data, err := EncodeCommand(cmd)
	if err != nil {
		t.Fatal(err)
	}
	back, err := DecodeCommand(data)
	if err != nil || back.String() != cmd.String() {
		t.Fatalf("round trip: %v %v", back, err)
	}
	for _, bad := range [][]byte{nil, {}, {0xff}, {0x10, 0x02}} { // {0x10,0x02}: type 2 but no format
		if _, err := DecodeCommand(bad); !errors.Is(err, ErrMalformedCommand) {
			t.Errorf("DecodeCommand(%x) err = %v", bad, err)
		}
	}
	if _, err := EncodeCommand(nil); err == nil {
		t.Errorf("EncodeCommand(nil) succeeded")
	}

	res := &fsmpb.Result{Code: fsmpb.ResultCode_RESULT_CODE_NOT_FOUND, Message: "m", Node: nodeRecord("n1")}
	rb, err := EncodeResult(res)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := DecodeResult(rb); err != nil || got.String() != res.String() {
		t.Fatalf("result round trip: %v %v", got, err)
	}
	if _, err := DecodeResult([]byte{0xff}); err == nil {
		t.Errorf("DecodeResult(garbage) succeeded")
	}
}

// Readers run against a stream of applies, batches and snapshots; -race
// checks the locking, and the readers check what they see is consistent.
func TestConcurrentReadsDuringApply(t *testing.T) {
	f := New(Config{})
	var observed atomic.Int64
	f.OnApply(func(uint64, *fsmpb.Command, *fsmpb.Result) { observed.Add(1) })
	a := newApplier(t)
	const n = 600

	var done atomic.Bool
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	for r := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(int64(r)))
			var lastIndex uint64
			lastCount := 0
			for !done.Load() {
				idx := f.AppliedIndex()
				if idx < lastIndex {
					report(fmt.Errorf("applied index went back from %d to %d", lastIndex, idx))
				}
				lastIndex = idx
				c := f.KeyCount()
				if c < lastCount {
					report(fmt.Errorf("key count went back from %d to %d", lastCount, c))
				}
				lastCount = c
				if rec, ok := f.Key(keyID(rng.Intn(n))); ok && rec.GetPrimaryVersion() != 1 {
					report(fmt.Errorf("key %s has primary version %d", rec.GetKeyId(), rec.GetPrimaryVersion()))
				}
				page := f.ListKeys(keyID(rng.Intn(n)), 20)
				for i := 1; i < len(page); i++ {
					if page[i-1].GetKeyId() >= page[i].GetKeyId() {
						report(fmt.Errorf("ListKeys not in id order"))
					}
				}
				f.Nodes()
				f.Cluster()
				f.JoinToken("tok")
				if rng.Intn(50) == 0 {
					f.Digest()
					_ = f.StateProto()
				}
			}
		}()
	}

	var persists sync.WaitGroup
	var index uint64
	next := func(typ fsmpb.CommandType, payload proto.Message) *raft.Log {
		index++
		return logOf(t, index, a.command(typ, payload, env{requestID: fmt.Sprint("r", index)}))
	}
	f.Apply(next(typInit, initPayload()))
	for i := range n {
		a.now += int64(time.Second)
		if i%3 == 0 {
			f.ApplyBatch([]*raft.Log{
				next(typCreate, createKeyPayload(keyID(i))),
				next(typToken, joinTokenPayload(fmt.Sprint("tok", i), a.now+int64(time.Hour))),
				next(typAdmit, admitPayload(fmt.Sprint("tok", i), fmt.Sprint("node", i))),
			})
		} else {
			f.Apply(next(typCreate, createKeyPayload(keyID(i))))
			if i%7 == 0 {
				f.Apply(next(typRemove, &fsmpb.RemoveNode{NodeId: fmt.Sprint("node", i-1)}))
			}
		}
		if i%100 == 0 {
			// Snapshot runs on the apply goroutine (as in raft); Persist
			// runs concurrently with later applies.
			snap, err := f.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			persists.Add(1)
			go func() {
				defer persists.Done()
				defer snap.Release()
				if err := snap.Persist(&memSink{}); err != nil {
					report(err)
				}
			}()
		}
	}
	done.Store(true)
	wg.Wait()
	persists.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if f.KeyCount() != n || f.AppliedIndex() != index || observed.Load() != int64(index) {
		t.Fatalf("keys %d index %d/%d observed %d", f.KeyCount(), f.AppliedIndex(), index, observed.Load())
	}
}

// One bootstrapped in-memory Raft node: Apply results come back through
// ApplyFuture.Response(), and snapshot/restore work through Raft.
func TestWithRaft(t *testing.T) {
	f := New(Config{})
	var restores atomic.Int32
	f.OnRestore(func() { restores.Add(1) })

	conf := raft.DefaultConfig()
	conf.LocalID = "n1"
	conf.HeartbeatTimeout = 50 * time.Millisecond
	conf.ElectionTimeout = 50 * time.Millisecond
	conf.LeaderLeaseTimeout = 50 * time.Millisecond
	conf.CommitTimeout = 5 * time.Millisecond
	conf.LogOutput = io.Discard
	store := raft.NewInmemStore()
	snaps := raft.NewInmemSnapshotStore()
	addr, trans := raft.NewInmemTransport("")
	r, err := raft.NewRaft(conf, f, store, store, snaps, trans)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Shutdown().Error() })
	if err := r.BootstrapCluster(raft.Configuration{Servers: []raft.Server{{ID: conf.LocalID, Address: addr}}}).Error(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "leadership", func() bool { return r.State() == raft.Leader })

	a := newApplier(t)
	apply := func(data []byte) (interface{}, uint64) {
		t.Helper()
		fut := r.Apply(data, 5*time.Second)
		if err := fut.Error(); err != nil {
			t.Fatalf("raft apply: %v", err)
		}
		return fut.Response(), fut.Index()
	}
	applyCmd := func(typ fsmpb.CommandType, payload proto.Message, e env) (*fsmpb.Result, uint64) {
		t.Helper()
		data, err := EncodeCommand(a.command(typ, payload, e))
		if err != nil {
			t.Fatal(err)
		}
		resp, index := apply(data)
		res, ok := resp.(*fsmpb.Result)
		if !ok {
			t.Fatalf("response %T %v, want *fsmpb.Result", resp, resp)
		}
		return res, index
	}

	res, _ := applyCmd(typInit, initPayload(), env{})
	checkResult(t, res, codeOK, "")
	res, _ = applyCmd(typCreate, createKeyPayload(keyID(1)), env{requestID: "req-1"})
	checkResult(t, res, codeOK, "")
	again, _ := applyCmd(typCreate, createKeyPayload(keyID(9)), env{requestID: "req-1"})
	if again.GetKey().GetKeyId() != keyID(1) || f.KeyCount() != 1 {
		t.Fatalf("retry through raft created a key: %v", again)
	}
	res, _ = applyCmd(typInit, initPayload(), env{})
	checkResult(t, res, fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION, "already initialised")
	if resp, _ := apply([]byte("not a command")); resp == nil {
		t.Fatalf("garbage entry returned no error")
	} else if _, ok := resp.(error); !ok {
		t.Fatalf("garbage entry returned %T, want error", resp)
	}

	// Snapshot through raft; its bytes restore into a fresh FSM.
	snapFut := r.Snapshot()
	if err := snapFut.Error(); err != nil {
		t.Fatal(err)
	}
	meta, rc, err := snapFut.Open()
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	atSnapshot := f.Digest()
	fresh := New(Config{})
	if err := fresh.Restore(io.NopCloser(bytes.NewReader(data))); err != nil || fresh.Digest() != atSnapshot {
		t.Fatalf("raft's snapshot did not restore into a fresh FSM: %v", err)
	}

	// Move on, then restore the snapshot through raft (operator restore).
	applyCmd(typCreate, createKeyPayload(keyID(2)), env{})
	if f.KeyCount() != 2 {
		t.Fatalf("key count %d", f.KeyCount())
	}
	if err := r.Restore(meta, bytes.NewReader(data), 5*time.Second); err != nil {
		t.Fatalf("raft restore: %v", err)
	}
	if f.Digest() != atSnapshot || f.KeyCount() != 1 || restores.Load() != 1 {
		t.Fatalf("after raft restore: keys %d restores %d", f.KeyCount(), restores.Load())
	}
	res, index := applyCmd(typCreate, createKeyPayload(keyID(3)), env{})
	checkResult(t, res, codeOK, "")
	if f.AppliedIndex() != index || f.KeyCount() != 2 {
		t.Fatalf("applied index %d want %d, keys %d", f.AppliedIndex(), index, f.KeyCount())
	}
}
