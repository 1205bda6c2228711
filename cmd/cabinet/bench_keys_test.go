package main

import (
	"strings"
	"testing"
	"time"
)

// benchTestFlags are valid flags (the defaults) for validate.
func benchTestFlags(keys int) *benchFlags {
	return &benchFlags{output: "table", payload: 1024, concurrency: 64, connections: 4, duration: 10 * time.Second,
		slice: time.Second, batch: 100, timeout: 10 * time.Second, spec: "EC_P256", ops: []string{"encrypt", "decrypt"},
		failoverRounds: 1, keys: keys}
}

func TestBenchKeysFlagValidation(t *testing.T) {
	for _, n := range []int{1, 2, 20, 5000, 100000} {
		if err := benchTestFlags(n).validate(); err != nil {
			t.Errorf("--keys %d: %v", n, err)
		}
	}
	for _, n := range []int{0, -1, 100001, 1 << 30} {
		err := benchTestFlags(n).validate()
		if err == nil || !strings.Contains(err.Error(), "--keys must be 1..100000") {
			t.Errorf("--keys %d: error %v, want \"--keys must be 1..100000\"", n, err)
		}
	}
	// Through the command line too: refused before anything connects.
	cmd := newBenchCmd()
	cmd.SetArgs([]string{"--keys", "0", "--addr", "127.0.0.1:1"})
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	if err := cmd.Execute(); err == nil || !strings.Contains(err.Error(), "--keys must be 1..100000") {
		t.Errorf("cabinet bench --keys 0: %v", err)
	}
}

func TestBenchKeyIndexSpread(t *testing.T) {
	for seq := uint64(0); seq < 100; seq++ {
		if i := benchKeyIndex(int(seq), seq, 1); i != 0 {
			t.Fatalf("one key: index %d", i)
		}
	}
	// 8 callers x 1000 requests over 20 keys: every key, each about equally
	// often (mean 400; a fair pick stays within ±25 % with overwhelming
	// probability, and the picks are deterministic).
	const keys, callers, per = 20, 8, 1000
	counts := make([]int, keys)
	for c := 0; c < callers; c++ {
		for seq := uint64(1); seq <= per; seq++ {
			i := benchKeyIndex(c, seq, keys)
			if i < 0 || i >= keys {
				t.Fatalf("index %d out of 0..%d", i, keys-1)
			}
			if benchKeyIndex(c, seq, keys) != i {
				t.Fatal("not deterministic")
			}
			counts[i]++
		}
	}
	mean := callers * per / keys
	for k, n := range counts {
		if n < mean*3/4 || n > mean*5/4 {
			t.Errorf("key %d picked %d times, mean %d: %v", k, n, mean, counts)
		}
	}
	// Each caller on its own spreads too (no caller stuck on one key).
	for c := 0; c < callers; c++ {
		seen := map[int]bool{}
		for seq := uint64(1); seq <= 200; seq++ {
			seen[benchKeyIndex(c, seq, keys)] = true
		}
		if len(seen) != keys {
			t.Errorf("caller %d touched %d of %d keys in 200 requests", c, len(seen), keys)
		}
	}
	// A large set: 64 callers x 200 requests over 5000 keys touch about
	// 5000 x (1 - e^-2.56) = 4614 distinct keys if the picks are uniform.
	seen := map[int]bool{}
	for c := 0; c < 64; c++ {
		for seq := uint64(1); seq <= 200; seq++ {
			seen[benchKeyIndex(c, seq, 5000)] = true
		}
	}
	if len(seen) < 4450 || len(seen) > 4780 {
		t.Errorf("5000 keys: %d distinct picked in 12800 requests, want about 4614", len(seen))
	}
}

func TestBenchKeyedRequests(t *testing.T) {
	type req struct{ key int }
	next := keyed(4, 20, func(int) *req { return &req{} }, func(r *req, i int) { r.key = i })
	seen := map[int]bool{}
	for seq := uint64(1); seq <= 100; seq++ {
		for c := 0; c < 4; c++ {
			r := next(c, seq)
			if r != next(c, seq+1000) { // the caller's own message, reused
				t.Fatal("a caller's request changed identity")
			}
			seen[benchKeyIndex(c, seq, 20)] = true
		}
	}
	if len(seen) != 20 {
		t.Errorf("%d of 20 keys used", len(seen))
	}
	one := keyed(2, 1, func(c int) *req { return &req{key: 100 + c} }, func(r *req, i int) { r.key = i })
	if one(1, 5).key != 101 {
		t.Error("--keys 1 changed the prebuilt request")
	}
}

func TestBenchCiphertextCount(t *testing.T) {
	for _, c := range []struct{ keys, min, payload, want int }{
		{1, 64, 1024, 64},
		{20, 64, 1024, 64},
		{5000, 64, 1024, 5000},
		{100000, 64, 1024, 100000},
		{100000, 64, 65536, benchCiphertextBudget / (65536 + 128)},
		{10, 100, 1024, 100}, // batch-decrypt: at least --batch
	} {
		if got := ciphertextCount(c.keys, c.min, c.payload); got != c.want {
			t.Errorf("ciphertextCount(%d, %d, %d) = %d, want %d", c.keys, c.min, c.payload, got, c.want)
		}
	}
}
