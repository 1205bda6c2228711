package fsm

import (
	"fmt"
	"testing"

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
