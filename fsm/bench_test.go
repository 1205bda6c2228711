package fsm

import (
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
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

// The per-request authorization lookups with 10k grants (100 keys x 100
// grants, 10 principals per key: 10 grants per key and principal) and 1k
// denied principals.
func BenchmarkAuthz10k(b *testing.B) {
	f, a, index := benchFSM(b, 100)
	for k := range 100 {
		for g := range 100 {
			index++
			p := grantPayload(grantID(k*100+g), keyID(k), fmt.Sprint("svc-", g%10), opEncrypt, opDecrypt)
			f.Apply(logOf(b, index, a.command(typCreateGrant, p, env{})))
		}
	}
	for d := range 1000 {
		index++
		f.Apply(logOf(b, index, a.command(typDeny, &fsmpb.DenyPrincipal{Principal: fmt.Sprint("gone-", d)}, env{})))
	}
	if n := len(f.Grants("", "")); n != 10_000 {
		b.Fatalf("%d grants", n)
	}
	keys := make([]string, 100)
	for i := range keys {
		keys[i] = keyID(i)
	}
	users := make([]string, 10)
	gone := make([]string, 10)
	for i := range users {
		users[i] = fmt.Sprint("svc-", i)
		gone[i] = fmt.Sprint("gone-", i*97)
	}
	b.Run("GrantsFor", func(b *testing.B) {
		b.ReportAllocs()
		for i := range b.N {
			if len(f.GrantsFor(keys[i%100], users[i%10])) != 10 {
				b.Fatal("wrong grants")
			}
		}
	})
	b.Run("GrantsForMiss", func(b *testing.B) {
		b.ReportAllocs()
		for i := range b.N {
			if f.GrantsFor(keys[i%100], gone[i%10]) != nil {
				b.Fatal("unexpected grants")
			}
		}
	})
	b.Run("Denied", func(b *testing.B) {
		b.ReportAllocs()
		for i := range b.N {
			if _, ok := f.Denied(gone[i%10]); !ok {
				b.Fatal("not denied")
			}
		}
	})
	b.Run("NotDenied", func(b *testing.B) {
		b.ReportAllocs()
		for i := range b.N {
			if _, ok := f.Denied(users[i%10]); ok {
				b.Fatal("denied")
			}
		}
	})
	b.Run("DeniedThenGrantsForParallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			i := 0
			for pb.Next() {
				if _, ok := f.Denied(users[i%10]); !ok {
					f.GrantsFor(keys[i%100], users[i%10])
				}
				i++
			}
		})
	})
}
