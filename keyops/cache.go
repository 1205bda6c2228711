package keyops

import (
	"bytes"
	"context"
	"crypto"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// UnwrapCache is a bounded cache of unwrapped key material, keyed by
// (key id, version, KEK version, spec) and the wrapped blob itself: a lookup hits
// only if the blob in the state is byte for byte the blob the cached
// material came from (cheaper than hashing the blob on every hit, and
// exact), so a changed blob (restore, re-wrap) can never be served stale
// material.
//
// Concurrency:
//   - hits take only the read lock, one atomic add on the entry's reference
//     count and, at most once per CLOCK sweep, a store to its reference bit;
//   - misses are de-duplicated: concurrent first uses of a version wait for
//     one unwrap (singleflight);
//   - eviction is CLOCK (second chance), so a hit never needs the write lock
//     to update recency as LRU would.
//
// Material of an entry that is evicted, forgotten or purged is zeroed as
// soon as no operation holds it any more (reference counting), never while
// an Encrypt or Decrypt is using it.
type unwrapCache struct {
	mu       sync.RWMutex
	entries  map[cacheKey]*cacheEntry
	byKeyID  map[string][]*cacheEntry
	ring     []*cacheEntry // CLOCK slots; nil = free
	free     []int         // free slot indices
	hand     int
	inflight map[cacheKey]*unwrapCall

	hits, misses, evictions, unwraps atomic.Uint64
}

type cacheKey struct {
	keyID      string
	version    uint32
	kekVersion uint32
	spec       fsmpb.KeySpec
}

// secret is a version's unwrapped material in the form operations use:
// raw bytes for symmetric specs (AES and HMAC keys), the parsed private key
// for asymmetric ones (so a warm Sign or Decrypt never parses PKCS#8).
type secret struct {
	material []byte
	signer   crypto.Signer
}

// cacheEntry holds one version's secret. It is immutable until the entry is
// dead and unreferenced, then zeroed once.
type cacheEntry struct {
	key  cacheKey
	blob []byte // copy of the wrapped blob the material came from
	secret

	// state is the reference count, plus deadBit once the entry left the
	// cache.
	state      atomic.Int64
	zeroed     atomic.Bool
	referenced atomic.Bool // CLOCK reference bit
	slot       int         // index in ring; guarded by unwrapCache.mu
}

const deadBit = int64(1) << 62

// acquire takes a reference; it fails if the entry is dead.
func (e *cacheEntry) acquire() bool {
	if e.state.Add(1)&deadBit != 0 {
		e.release()
		return false
	}
	return true
}

// release drops a reference; the last release of a dead entry zeroes it.
func (e *cacheEntry) release() {
	if e.state.Add(-1) == deadBit {
		e.zero()
	}
}

// kill marks the entry dead; it is zeroed now if unreferenced, else by the
// last release.
func (e *cacheEntry) kill() {
	if e.state.Or(deadBit) == 0 {
		e.zero()
	}
}

func (e *cacheEntry) zero() {
	if e.zeroed.CompareAndSwap(false, true) {
		clear(e.material)
		zeroSigner(e.signer)
	}
}

type unwrapCall struct {
	blob []byte
	done chan struct{}
	// Set before done is closed.
	entry *cacheEntry
	err   error
	// callerCanceled: err came from the first caller's context ending, so
	// a waiter with a live context should try again itself.
	callerCanceled bool
	// forgotten is set (under mu) by Forget/Purge while the unwrap runs:
	// the result serves its first caller but is not cached.
	forgotten bool
}

func newUnwrapCache(capacity int) *unwrapCache {
	c := &unwrapCache{
		entries:  make(map[cacheKey]*cacheEntry),
		byKeyID:  make(map[string][]*cacheEntry),
		ring:     make([]*cacheEntry, capacity),
		free:     make([]int, capacity),
		inflight: make(map[cacheKey]*unwrapCall),
	}
	for i := range c.free {
		c.free[i] = capacity - 1 - i // pop from the end: slot 0 first
	}
	return c
}

// lookupLocked returns the live entry for k with this blob, acquired, or nil.
// The caller holds mu (read or write).
func (c *unwrapCache) lookupLocked(k cacheKey, blob []byte) *cacheEntry {
	e := c.entries[k]
	if e == nil || !bytes.Equal(e.blob, blob) || !e.acquire() {
		return nil
	}
	if !e.referenced.Load() {
		e.referenced.Store(true)
	}
	return e
}

// get returns the acquired entry for (k, blob), calling open at most once
// across concurrent callers when it is not cached. The caller must release
// the entry.
func (c *unwrapCache) get(ctx context.Context, k cacheKey, blob []byte, open func(context.Context) (secret, error)) (*cacheEntry, error) {
	for {
		c.mu.RLock()
		e := c.lookupLocked(k, blob)
		c.mu.RUnlock()
		if e != nil {
			c.hits.Add(1)
			return e, nil
		}

		c.mu.Lock()
		if e := c.lookupLocked(k, blob); e != nil {
			c.mu.Unlock()
			c.hits.Add(1)
			return e, nil
		}
		c.misses.Add(1)
		if call := c.inflight[k]; call != nil {
			c.mu.Unlock()
			select {
			case <-call.done:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			if call.err != nil {
				if call.callerCanceled && ctx.Err() == nil {
					continue
				}
				return nil, call.err
			}
			if bytes.Equal(call.blob, blob) && call.entry.acquire() {
				return call.entry, nil
			}
			continue // other blob, or forgotten meanwhile: look again
		}
		call := &unwrapCall{blob: bytes.Clone(blob), done: make(chan struct{})}
		c.inflight[k] = call
		c.mu.Unlock()

		c.unwraps.Add(1)
		sec, err := open(ctx)

		c.mu.Lock()
		delete(c.inflight, k)
		if err == nil {
			e = &cacheEntry{key: k, blob: call.blob, secret: sec, slot: -1}
			e.state.Store(1) // our caller's reference
			if call.forgotten {
				e.kill()
			} else {
				c.insertLocked(e)
			}
		}
		call.entry, call.err = e, err
		call.callerCanceled = err != nil && ctx.Err() != nil
		close(call.done)
		c.mu.Unlock()
		return e, err
	}
}

// insertLocked adds e, replacing an entry for the same key and evicting by
// CLOCK when full. The caller holds mu for writing.
func (c *unwrapCache) insertLocked(e *cacheEntry) {
	if old := c.entries[e.key]; old != nil {
		c.removeLocked(old)
	}
	if len(c.free) == 0 {
		for {
			victim := c.ring[c.hand]
			c.hand = (c.hand + 1) % len(c.ring)
			if victim == nil {
				continue
			}
			if victim.referenced.Load() {
				victim.referenced.Store(false)
				continue
			}
			c.removeLocked(victim)
			c.evictions.Add(1)
			break
		}
	}
	slot := c.free[len(c.free)-1]
	c.free = c.free[:len(c.free)-1]
	e.slot = slot
	c.ring[slot] = e
	c.entries[e.key] = e
	c.byKeyID[e.key.keyID] = append(c.byKeyID[e.key.keyID], e)
}

// removeLocked takes e out of the cache and kills it.
func (c *unwrapCache) removeLocked(e *cacheEntry) {
	if c.entries[e.key] == e {
		delete(c.entries, e.key)
	}
	if list := c.byKeyID[e.key.keyID]; list != nil {
		list = slices.DeleteFunc(list, func(x *cacheEntry) bool { return x == e })
		if len(list) == 0 {
			delete(c.byKeyID, e.key.keyID)
		} else {
			c.byKeyID[e.key.keyID] = list
		}
	}
	if e.slot >= 0 && c.ring[e.slot] == e {
		c.ring[e.slot] = nil
		c.free = append(c.free, e.slot)
		e.slot = -1
	}
	e.kill()
}

// forget drops every version of keyID, and keeps unwraps of it now in flight
// out of the cache.
func (c *unwrapCache) forget(keyID string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range slices.Clone(c.byKeyID[keyID]) {
		c.removeLocked(e)
	}
	for k, call := range c.inflight {
		if k.keyID == keyID {
			call.forgotten = true
		}
	}
}

// purge drops everything.
func (c *unwrapCache) purge() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, e := range c.ring {
		if e != nil {
			c.removeLocked(e)
		}
	}
	for _, call := range c.inflight {
		call.forgotten = true
	}
}

// CacheStats describes the unwrap cache.
type CacheStats struct {
	// Hits: uses served from the cache.
	Hits uint64
	// Misses: uses that found no cached material (including those that
	// waited for another caller's unwrap).
	Misses uint64
	// Unwraps: calls to the Sealer to unwrap material.
	Unwraps uint64
	// Evictions: entries dropped to respect the bound (not counting
	// Forget and Purge).
	Evictions uint64
	// Size and Capacity: cached versions now, and at most.
	Size     int
	Capacity int
}

func (c *unwrapCache) stats() CacheStats {
	c.mu.RLock()
	size := len(c.entries)
	c.mu.RUnlock()
	return CacheStats{
		Hits:      c.hits.Load(),
		Misses:    c.misses.Load(),
		Unwraps:   c.unwraps.Load(),
		Evictions: c.evictions.Load(),
		Size:      size,
		Capacity:  len(c.ring),
	}
}
