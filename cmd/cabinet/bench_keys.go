package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// --keys: a working set of N keys for the symmetric operations (encrypt,
// decrypt, generate-data-key, re-encrypt, mac, batch-encrypt, batch-decrypt).
// Setup creates the N keys (not measured) and touches each once on every
// target node, so the measurement starts from the steady state of the
// nodes' unwrap caches; every request then picks its key with
// benchKeyIndex, a pure function of (caller, sequence): deterministic, and
// no shared state on the hot path.

const (
	benchMaxKeys = 100000
	// benchKeySetupWorkers bounds the concurrent setup requests (creates and
	// cache-warming touches), as for rotate-key's keys.
	benchKeySetupWorkers = 16
	// benchCiphertextBudget bounds the bytes of ciphertexts pre-encrypted
	// for decrypt, re-encrypt and batch-decrypt (one per key while it fits).
	benchCiphertextBudget = 128 << 20
	// benchSetupBatch: ciphertexts per BatchEncrypt request in setup.
	benchSetupBatch = 100
)

func validateBenchKeys(n int) error {
	if n < 1 || n > benchMaxKeys {
		return fmt.Errorf("--keys must be 1..%d, not %d", benchMaxKeys, n)
	}
	return nil
}

// benchKeyIndex picks the key (or ciphertext) of caller's seq-th request out
// of n: a splitmix64 mix of (caller, seq), so the picks are spread uniformly
// over the n (every key about equally often, in no fixed cycle, which would
// defeat an LRU cache far more than a real working set does) and reproducible.
func benchKeyIndex(caller int, seq uint64, n int) int {
	if n <= 1 {
		return 0
	}
	z := uint64(caller)<<40 ^ seq
	z += 0x9e3779b97f4a7c15
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	z ^= z >> 31
	return int(z % uint64(n))
}

// keySet returns the run's --keys keys for a purpose, creating them once
// (the first is the run's setup key for that purpose, as with --keys 1).
// With more than one key, each is also touched once through every target
// node (touch), which warms the node's unwrap cache as far as it holds.
func (e *benchEnv) keySet(ctx context.Context, spec cabinetpb.KeySpec, usage cabinetpb.KeyUsage,
	touch func(ctx context.Context, kc cabinetpb.KeyServiceClient, key string) error,
) ([]string, error) {
	first, err := e.key(ctx, spec, usage)
	if err != nil {
		return nil, err
	}
	n := e.f.keys
	if n <= 1 {
		return []string{first}, nil
	}
	purpose := spec.String() + "/" + usage.String()
	e.mu.Lock()
	defer e.mu.Unlock()
	if ks, ok := e.keySets[purpose]; ok {
		return ks, nil
	}
	keys := make([]string, n)
	keys[0] = first
	nt := min(len(e.targets), len(e.kcs))
	var created, touched atomic.Int64
	created.Store(1)
	e.prog.logf("creating %d %s keys (setup, not measured)", n-1, spec)
	e.prog.status(func() string {
		return fmt.Sprintf("creating keys  %d/%d created  %d/%d touched on %d node(s)", created.Load(), n, touched.Load(), n, nt)
	})
	start := time.Now()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	fail := func(err error) {
		errOnce.Do(func() { firstErr = err; cancel() })
	}
	idx := make(chan int)
	for w := 0; w < benchKeySetupWorkers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range idx {
				if i > 0 {
					id, err := e.createKey(sctx, spec, usage)
					if err != nil {
						fail(err)
						continue
					}
					keys[i] = id
					created.Add(1)
				}
				for t := 0; t < nt; t++ {
					c, cc := e.setupCtx(sctx)
					err := touch(c, e.kcs[t], keys[i])
					cc()
					if err != nil {
						fail(fmt.Errorf("first use of key %d of %d on %s: %w", i+1, n, e.targets[t].NodeID, rpcError(err)))
						break
					}
				}
				touched.Add(1)
			}
		}()
	}
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
feed:
	for i := 0; i < n; i++ {
		for {
			select {
			case idx <- i:
				continue feed
			case <-sctx.Done():
				break feed
			case <-tick.C:
				if !e.prog.tty {
					e.prog.logf("keys: %d/%d created, %d touched", created.Load(), n, touched.Load())
				}
			}
		}
	}
	close(idx)
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return nil, fmt.Errorf("--keys %d: %w", n, firstErr)
	}
	e.prog.logf("created %d %s keys in %.1fs (each used once on %d target node(s))", n-1, spec, time.Since(start).Seconds(), nt)
	e.keySets[purpose] = keys
	return keys, nil
}

// aesKeys is the working set of the AES operations.
func (e *benchEnv) aesKeys(ctx context.Context) ([]string, error) {
	one := []byte{0}
	return e.keySet(ctx, cabinetpb.KeySpec_AES_256, cabinetpb.KeyUsage_ENCRYPT_DECRYPT,
		func(ctx context.Context, kc cabinetpb.KeyServiceClient, key string) error {
			_, err := kc.Encrypt(ctx, &cabinetpb.EncryptRequest{KeyId: key, Plaintext: one, Consistency: e.consistency()})
			return err
		})
}

// macKeys is the working set of mac.
func (e *benchEnv) macKeys(ctx context.Context) ([]string, error) {
	one := []byte{0}
	return e.keySet(ctx, cabinetpb.KeySpec_HMAC_SHA256, cabinetpb.KeyUsage_GENERATE_VERIFY_MAC,
		func(ctx context.Context, kc cabinetpb.KeyServiceClient, key string) error {
			_, err := kc.GenerateMac(ctx, &cabinetpb.GenerateMacRequest{KeyId: key, Message: one, Consistency: e.consistency()})
			return err
		})
}

// ciphertextCount is how many ciphertexts decrypt, re-encrypt (min, the
// --keys 1 pool) and batch-decrypt (min = --batch) spread over with nkeys
// keys: one per key while benchCiphertextBudget allows, at least min.
func ciphertextCount(nkeys, minimum, payload int) int {
	if nkeys <= 1 {
		return minimum
	}
	budget := benchCiphertextBudget / (payload + 128)
	return max(minimum, min(nkeys, budget))
}

// encryptOver makes n ciphertexts of random payloads, the j-th under
// keys[j mod len(keys)], in batches of up to benchSetupBatch (and 2 MiB).
func (e *benchEnv) encryptOver(ctx context.Context, keys []string, n int) ([][]byte, error) {
	if len(keys) == 1 {
		return e.encryptN(ctx, keys[0], n)
	}
	out := make([][]byte, 0, n)
	last := time.Now()
	per := max(1, min(benchSetupBatch, (2<<20)/(e.f.payload+128))) // well under gRPC's 4 MiB
	for lo := 0; lo < n; lo += per {
		req := &cabinetpb.BatchEncryptRequest{}
		for j := lo; j < min(n, lo+per); j++ {
			req.Items = append(req.Items, &cabinetpb.EncryptRequest{KeyId: keys[j%len(keys)], Plaintext: benchRandom(e.f.payload)})
		}
		c, cancel := e.setupCtx(ctx)
		resp, err := e.setupKC().BatchEncrypt(c, req)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("encrypt the ciphertexts to decrypt: %w", rpcError(err))
		}
		if len(resp.GetResults()) != len(req.Items) {
			return nil, fmt.Errorf("batch encrypt returned %d results for %d items", len(resp.GetResults()), len(req.Items))
		}
		for _, r := range resp.GetResults() {
			if r.GetError() != nil {
				return nil, fmt.Errorf("encrypt a ciphertext: %s: %s", r.GetError().GetCode(), r.GetError().GetMessage())
			}
			out = append(out, r.GetResponse().GetCiphertext())
		}
		if time.Since(last) > 5*time.Second {
			last = time.Now()
			e.prog.logf("ciphertexts: %d/%d", len(out), n)
		}
	}
	return out, nil
}

// keyed returns next for unaryOp: one request per caller, built by mk, and
// before each call set(req, i) with i = benchKeyIndex(caller, seq, n) (the
// caller owns its message). With n <= 1 the requests are never changed.
func keyed[Req any](callers, n int, mk func(caller int) Req, set func(r Req, i int)) func(int, uint64) Req {
	reqs := make([]Req, callers)
	for i := range reqs {
		reqs[i] = mk(i)
	}
	if n <= 1 {
		return func(caller int, _ uint64) Req { return reqs[caller] }
	}
	return func(caller int, seq uint64) Req {
		r := reqs[caller]
		set(r, benchKeyIndex(caller, seq, n))
		return r
	}
}

// distinctKeys is how many of keys the first n of a cyclic pool use.
func distinctKeys(keys []string, n int) int { return min(len(keys), n) }
