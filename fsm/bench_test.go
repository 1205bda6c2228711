package fsm

import (
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/raft"
)

func benchFSM(b *testing.B, keys int) (*FSM, *applier, uint64) {
	b.Helper()
	f := New(Config{})
	a := newApplier(b)
	f.Apply(logOf(b, 1, a.command(typInit, initPayload(), env{})))
	index := uint64(1)
	for i := range keys {
		index++
		f.Apply(logOf(b, index, a.command(typCreate, createKeyPayload(keyID(i)), env{requestID: fmt.Sprint("r", i)})))
	}
	return f, a, index
}

func BenchmarkApplyCreateKey(b *testing.B) {
	f, a, index := benchFSM(b, 10_000)
	logs := make([]*raft.Log, b.N)
	for i := range logs {
		index++
		logs[i] = logOf(b, index, a.command(typCreate, createKeyPayload(keyID(1_000_000+i)), env{requestID: fmt.Sprint("b", i)}))
	}
	b.ResetTimer()
	for _, l := range logs {
		f.Apply(l)
	}
}

func BenchmarkKeyParallel(b *testing.B) {
	f, _, _ := benchFSM(b, 10_000)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			f.Key(keyID(i % 10_000))
			i++
		}
	})
}

func BenchmarkSnapshot100k(b *testing.B) {
	f, _, _ := benchFSM(b, 100_000)
	b.ResetTimer()
	for range b.N {
		snap, _ := f.Snapshot()
		_ = snap.Persist(&memSink{})
	}
}

// DueRotations/DueDestructions at 100k keys, of which 1% are due: the
// scheduler's per-tick query. The secondary index makes it O(log n + due).
func BenchmarkDueRotations100k(b *testing.B) {
	f := New(Config{})
	a := newApplier(b)
	f.Apply(logOf(b, 1, a.command(typInit, initPayload(), env{})))
	for i := range 100_000 {
		p := createKeyPayload(keyID(i))
		p.RotationPeriodSeconds = int64(3600 + i) // key i is due at t0 + 3600s + i s
		f.Apply(logOf(b, uint64(i+2), a.command(typCreate, p, env{})))
	}
	now := t0 + int64(3600+1000)*int64(time.Second) // 1001 keys due
	b.ResetTimer()
	for range b.N {
		if got := f.DueRotations(now, 0); len(got) != 1001 {
			b.Fatalf("%d due", len(got))
		}
		f.DueDestructions(now, 0)
	}
}
