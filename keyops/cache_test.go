package keyops

import (
	"bytes"
	"context"
	"sync"
	"testing"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

func TestCacheHitsAndWarmUseSkipsSealer(t *testing.T) {
	e, s := newTestEngine(t, 0)
	key := newTestKey(t, e, 2)
	lookup := lookupOf(key)
	ctx := context.Background()

	ct, _, err := e.Encrypt(ctx, key, []byte("x"), nil) // miss: unwraps v2
	if err != nil {
		t.Fatal(err)
	}
	if st := e.CacheStats(); st.Misses != 1 || st.Hits != 0 || st.Unwraps != 1 || st.Size != 1 {
		t.Fatalf("after first use: %+v", st)
	}
	seals, opens, randoms := s.seals.Load(), s.opens.Load(), s.randoms.Load()
	for range 100 {
		if _, _, err := e.Encrypt(ctx, key, []byte("x"), nil); err != nil {
			t.Fatal(err)
		}
		if _, _, _, err := e.Decrypt(ctx, lookup, ct, nil, false); err != nil {
			t.Fatal(err)
		}
		if _, _, _, err := e.GenerateDataKey(ctx, key, 0, nil); err != nil {
			t.Fatal(err)
		}
	}
	if s.seals.Load() != seals || s.opens.Load() != opens || s.randoms.Load() != randoms {
		t.Fatal("warm uses called the Sealer")
	}
	if st := e.CacheStats(); st.Hits != 300 || st.Misses != 1 || st.Unwraps != 1 {
		t.Fatalf("after warm uses: %+v", st)
	}
	// Version 1 is a separate entry.
	key.PrimaryVersion = 1
	if _, _, err := e.Encrypt(ctx, key, []byte("x"), nil); err != nil {
		t.Fatal(err)
	}
	if st := e.CacheStats(); st.Size != 2 || st.Unwraps != 2 {
		t.Fatalf("after version 1: %+v", st)
	}
}

func TestCacheBound(t *testing.T) {
	const capacity = 3
	e, s := newTestEngine(t, capacity)
	ctx := context.Background()
	var keys []*fsmpb.KeyRecord
	for range 10 {
		keys = append(keys, newTestKey(t, e, 1))
	}
	for i, k := range keys {
		if _, _, err := e.Encrypt(ctx, k, []byte("x"), nil); err != nil {
			t.Fatal(err)
		}
		if st := e.CacheStats(); st.Size > capacity {
			t.Fatalf("after %d keys: size %d > capacity %d", i+1, st.Size, capacity)
		}
	}
	st := e.CacheStats()
	if st.Size != capacity || st.Evictions != 10-capacity || st.Capacity != capacity {
		t.Fatalf("stats %+v", st)
	}
	// A recently used key survives while cold ones are evicted (CLOCK
	// second chance): keep using keys[9] while cycling through others.
	hot := keys[9]
	for _, k := range keys[:6] {
		if _, _, err := e.Encrypt(ctx, hot, []byte("x"), nil); err != nil {
			t.Fatal(err)
		}
		if _, _, err := e.Encrypt(ctx, k, []byte("x"), nil); err != nil {
			t.Fatal(err)
		}
	}
	opens := s.opens.Load()
	e.Encrypt(ctx, hot, []byte("x"), nil)
	if s.opens.Load() != opens {
		t.Error("the hot key was evicted")
	}
}

// Material of evicted, forgotten and purged entries is zeroed.
func TestCacheZeroesMaterial(t *testing.T) {
	ctx := context.Background()
	entryOf := func(e *Engine, k *fsmpb.KeyRecord) *cacheEntry {
		e.cache.mu.RLock()
		defer e.cache.mu.RUnlock()
		return e.cache.entries[cacheKey{keyID: k.KeyId, version: k.PrimaryVersion, kekVersion: 1, spec: fsmpb.KeySpec_KEY_SPEC_AES_256}]
	}
	isZero := func(b []byte) bool { return len(b) == 32 && bytes.Equal(b, make([]byte, 32)) }
	tests := []struct {
		name string
		drop func(e *Engine, k *fsmpb.KeyRecord)
	}{
		{"forget", func(e *Engine, k *fsmpb.KeyRecord) { e.Forget(k.KeyId) }},
		{"purge", func(e *Engine, k *fsmpb.KeyRecord) { e.Purge() }},
		{"evict", func(e *Engine, k *fsmpb.KeyRecord) {
			other := newTestKey(t, e, 1)
			e.Encrypt(ctx, other, nil, nil)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, s := newTestEngine(t, 1)
			k := newTestKey(t, e, 1)
			if _, _, err := e.Encrypt(ctx, k, nil, nil); err != nil {
				t.Fatal(err)
			}
			ent := entryOf(e, k)
			if ent == nil || !bytes.Equal(ent.material, materialOf(t, s, k, 1)) {
				t.Fatal("entry not cached")
			}
			tt.drop(e, k)
			if !isZero(ent.material) {
				t.Fatal("dropped material was not zeroed")
			}
			if entryOf(e, k) != nil {
				t.Fatal("dropped entry still cached")
			}
			opens := s.opens.Load()
			if _, _, err := e.Encrypt(ctx, k, nil, nil); err != nil {
				t.Fatal(err)
			}
			if s.opens.Load() != opens+1 {
				t.Fatal("use after drop did not unwrap again")
			}
		})
	}
}

// Material in use by an operation is zeroed only when the operation is done.
func TestCacheZeroWaitsForUsers(t *testing.T) {
	e, s := newTestEngine(t, 0)
	k := newTestKey(t, e, 1)
	ent, err := e.material(context.Background(), k, 1) // as Encrypt holds it
	if err != nil {
		t.Fatal(err)
	}
	e.Forget(k.KeyId)
	if !bytes.Equal(ent.material, materialOf(t, s, k, 1)) {
		t.Fatal("material zeroed while in use")
	}
	ent.release()
	if !bytes.Equal(ent.material, make([]byte, 32)) {
		t.Fatal("material not zeroed after the last user released it")
	}
	if ent.acquire() {
		t.Fatal("acquired a dead entry")
	}
}

func TestForgetOnlyThatKey(t *testing.T) {
	e, _ := newTestEngine(t, 0)
	a, b := newTestKey(t, e, 2), newTestKey(t, e, 1)
	ctx := context.Background()
	for _, k := range []*fsmpb.KeyRecord{a, b} {
		e.Encrypt(ctx, k, nil, nil)
	}
	a.PrimaryVersion = 1
	e.Encrypt(ctx, a, nil, nil)
	if st := e.CacheStats(); st.Size != 3 {
		t.Fatalf("size %d, want 3", st.Size)
	}
	e.Forget(a.KeyId)
	if st := e.CacheStats(); st.Size != 1 {
		t.Fatalf("after Forget: size %d, want 1", st.Size)
	}
	e.Forget("k-unknown")
	e.Purge()
	if st := e.CacheStats(); st.Size != 0 {
		t.Fatalf("after Purge: size %d", st.Size)
	}
}

// A changed wrapped blob for the same (key, version, KEK) never gets the old
// material.
func TestCacheKeyedByBlob(t *testing.T) {
	e, s := newTestEngine(t, 0)
	k := newTestKey(t, e, 1)
	ctx := context.Background()
	e.Encrypt(ctx, k, nil, nil)
	k.Versions[0].Material = &fsmpb.WrappedBlob{KekVersion: 1, Blob: append([]byte(nil), k.Versions[0].Material.Blob...)}
	k.Versions[0].Material.Blob[20] ^= 1
	opens := s.opens.Load()
	_, _, err := e.Encrypt(ctx, k, nil, nil)
	wantErr(t, err, ErrUnwrap)
	if s.opens.Load() != opens+1 {
		t.Fatal("changed blob served from the cache")
	}
}

// N concurrent first uses of a version unwrap once.
func TestCacheConcurrentFirstUseUnwrapsOnce(t *testing.T) {
	e, s := newTestEngine(t, 0)
	k := newTestKey(t, e, 1)
	gate := make(chan struct{})
	s.gate.Store(&gate)
	const n = 50
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			var err error
			if i%2 == 0 {
				_, _, err = e.Encrypt(context.Background(), k, []byte("x"), nil)
			} else {
				_, _, _, err = e.GenerateDataKey(context.Background(), k, 16, nil)
			}
			errs <- err
		})
	}
	waitFor(t, "all callers to miss", func() bool { return e.CacheStats().Misses == n })
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := s.opens.Load(); got != 1 {
		t.Fatalf("Sealer.Open called %d times, want 1", got)
	}
}

// If the first caller's context ends during the unwrap, waiters with live
// contexts unwrap themselves instead of failing.
func TestCacheFirstCallerCanceled(t *testing.T) {
	e, s := newTestEngine(t, 0)
	k := newTestKey(t, e, 1)
	gate := make(chan struct{})
	s.gate.Store(&gate)
	ctx1, cancel := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() { _, _, err := e.Encrypt(ctx1, k, nil, nil); first <- err }()
	waitFor(t, "first unwrap", func() bool { return s.opens.Load() == 1 })
	second := make(chan error, 1)
	go func() { _, _, err := e.Encrypt(context.Background(), k, nil, nil); second <- err }()
	waitFor(t, "second caller to wait", func() bool { return e.CacheStats().Misses == 2 })
	cancel()
	wantErr(t, <-first, context.Canceled)
	waitFor(t, "second unwrap", func() bool { return s.opens.Load() == 2 })
	close(gate)
	if err := <-second; err != nil {
		t.Fatalf("waiter failed: %v", err)
	}
	// A waiter whose own context ends stops waiting.
	e.Purge()
	gate2 := make(chan struct{})
	s.gate.Store(&gate2)
	go e.Encrypt(context.Background(), k, nil, nil)
	waitFor(t, "third unwrap", func() bool { return s.opens.Load() == 3 })
	ctx3, cancel3 := context.WithCancel(context.Background())
	third := make(chan error, 1)
	go func() { _, _, err := e.Encrypt(ctx3, k, nil, nil); third <- err }()
	waitFor(t, "waiter", func() bool { return e.CacheStats().Misses == 5 })
	cancel3()
	wantErr(t, <-third, context.Canceled)
	close(gate2)
}

// Forget during an unwrap keeps its result out of the cache.
func TestForgetDuringUnwrap(t *testing.T) {
	e, s := newTestEngine(t, 0)
	k := newTestKey(t, e, 1)
	gate := make(chan struct{})
	s.gate.Store(&gate)
	done := make(chan error, 1)
	go func() { _, _, err := e.Encrypt(context.Background(), k, nil, nil); done <- err }()
	waitFor(t, "unwrap", func() bool { return s.opens.Load() == 1 })
	e.Forget(k.KeyId)
	close(gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if st := e.CacheStats(); st.Size != 0 {
		t.Fatalf("forgotten unwrap was cached: %+v", st)
	}
}

// Concurrent use, rotation-like forgetting and eviction under -race.
func TestCacheConcurrentStress(t *testing.T) {
	e, _ := newTestEngine(t, 4)
	var keys []*fsmpb.KeyRecord
	for range 8 {
		keys = append(keys, newTestKey(t, e, 1))
	}
	lookup := lookupOf(keys...)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 300 {
				k := keys[(g+i)%len(keys)]
				ct, _, err := e.Encrypt(context.Background(), k, []byte("payload"), nil)
				if err != nil {
					t.Error(err)
					return
				}
				pt, _, _, err := e.Decrypt(context.Background(), lookup, ct, nil, false)
				if err != nil || string(pt) != "payload" {
					t.Errorf("decrypt: %q %v", pt, err)
					return
				}
				switch i % 50 {
				case 17:
					e.Forget(k.KeyId)
				case 49:
					e.Purge()
				}
			}
		})
	}
	wg.Wait()
	if st := e.CacheStats(); st.Size > 4 {
		t.Fatalf("size %d over bound", st.Size)
	}
}
