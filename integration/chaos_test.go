package integration

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// The chaos harness (issue 6, docs/RELIABILITY.md): real processes, a
// fault-injecting proxy between them, concurrent clients recording a
// history, and four checkers over it (chaos_check_test.go).
//
//	go test ./integration -run '^TestChaos$'                  # CI: a few short seeds
//	make chaos SEED=7 DURATION=60s NODES=5                    # one schedule
//	CHAOS_REPLAY=.run/chaos/seed-7.json go test ./integration -run TestChaosReplay

type chaosConfig struct {
	Seed         int64         `json:"seed"`
	Duration     time.Duration `json:"duration"`
	Nodes        int           `json:"nodes"`
	Clients      int           `json:"clients"`
	MaxStaleness time.Duration `json:"max_staleness"`
	MaxKeys      int           `json:"max_keys"`
}

// chaosOp is one client operation: one attempt for reads, every attempt
// (same request id) for writes. Times are nanoseconds since the run began.
type chaosOp struct {
	ID          int    `json:"id"`
	Client      int    `json:"client"`
	Kind        string `json:"kind"` // create rotate disable enable revoke encrypt decrypt
	Key         string `json:"key"`  // logical key name (the porcupine partition)
	KeyID       string `json:"key_id,omitempty"`
	Node        int    `json:"node"` // last node tried
	Strong      bool   `json:"strong,omitempty"`
	RequestID   string `json:"request_id,omitempty"`
	Call        int64  `json:"call"`
	Return      int64  `json:"return"`
	Outcome     string `json:"outcome"` // ok, fail (definite), unknown (write whose effect is not known)
	Code        string `json:"code,omitempty"`
	Err         string `json:"err,omitempty"`
	Version     uint32 `json:"version,omitempty"`
	State       string `json:"state,omitempty"`
	Plaintext   []byte `json:"plaintext,omitempty"`
	Ciphertext  []byte `json:"ciphertext,omitempty"`
	Attempts    int    `json:"attempts,omitempty"`
	ExpectPlain []byte `json:"expect_plain,omitempty"` // decrypt: what was encrypted
}

type faultEvent struct {
	Kind   string `json:"kind"`
	Target string `json:"target,omitempty"`
	Detail string `json:"detail,omitempty"`
	Start  int64  `json:"start"` // ns since run start
	End    int64  `json:"end"`
	Err    string `json:"err,omitempty"`
}

type chaosHistory struct {
	Config chaosConfig  `json:"config"`
	Faults []faultEvent `json:"faults"`
	Ops    []chaosOp    `json:"ops"`
}

type recorder struct {
	mu    sync.Mutex
	start time.Time
	ops   []chaosOp
	next  int
}

func (r *recorder) now() int64 { return int64(time.Since(r.start)) }

func (r *recorder) add(op chaosOp) {
	r.mu.Lock()
	op.ID = r.next
	r.next++
	r.ops = append(r.ops, op)
	r.mu.Unlock()
}

// keyPool holds the keys whose creation was acknowledged (usable by
// clients) and the ciphertexts acknowledged so far.
type keyPool struct {
	mu      sync.Mutex
	names   []string
	ids     map[string]string // name -> key id
	revoked map[string]bool
	pending int
	cts     []chaosOp // successful encrypts
}

func chaosEnvConfig(t *testing.T) (chaosConfig, bool) {
	s := os.Getenv("CHAOS_SEED")
	if s == "" {
		return chaosConfig{}, false
	}
	seed, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		t.Fatalf("CHAOS_SEED: %v", err)
	}
	cfg := chaosConfig{Seed: seed, Duration: 60 * time.Second, Nodes: 3}
	if d := os.Getenv("CHAOS_DURATION"); d != "" {
		if cfg.Duration, err = time.ParseDuration(d); err != nil {
			t.Fatalf("CHAOS_DURATION: %v", err)
		}
	}
	if n := os.Getenv("CHAOS_NODES"); n != "" {
		if cfg.Nodes, err = strconv.Atoi(n); err != nil || (cfg.Nodes != 3 && cfg.Nodes != 5) {
			t.Fatalf("CHAOS_NODES must be 3 or 5, got %q", n)
		}
	}
	return cfg, true
}

// TestChaos runs randomized fault schedules against a real cluster and
// checks the history. Without CHAOS_SEED it runs the short CI set: seeds 1
// and 2, 15s each, one after the other on one three-node cluster (each
// schedule's faults are undone and its history checked before the next).
func TestChaos(t *testing.T) {
	if cfg, ok := chaosEnvConfig(t); ok {
		cc := newChaosClusterFor(t, &cfg)
		runChaos(t, cc, cfg, true)
		return
	}
	if testing.Short() {
		t.Skip("chaos runs are skipped in -short mode")
	}
	cfg := chaosConfig{Duration: 15 * time.Second, Nodes: 3}
	cc := newChaosClusterFor(t, &cfg)
	for _, seed := range []int64{1, 2} {
		cfg.Seed = seed
		runChaos(t, cc, cfg, false)
	}
}

func newChaosClusterFor(t *testing.T, cfg *chaosConfig) *chaosCluster {
	if cfg.Clients == 0 {
		cfg.Clients = 4
	}
	if cfg.MaxStaleness == 0 {
		cfg.MaxStaleness = 2 * time.Second
	}
	if cfg.MaxKeys == 0 {
		cfg.MaxKeys = 10
	}
	cc := newChaosCluster(t, cfg.Nodes, "--max-staleness", cfg.MaxStaleness.String(),
		"--raft-heartbeat-timeout", "1s", "--raft-election-timeout", "1s")
	cc.bootstrap()
	return cc
}

func runChaos(t *testing.T, cc *chaosCluster, cfg chaosConfig, keep bool) {
	t.Logf("chaos: seed=%d duration=%v nodes=%d clients=%d (reproduce: make chaos SEED=%d DURATION=%v NODES=%d)",
		cfg.Seed, cfg.Duration, cfg.Nodes, cfg.Clients, cfg.Seed, cfg.Duration, cfg.Nodes)
	rec := &recorder{start: time.Now()}
	pool := &keyPool{ids: map[string]string{}, revoked: map[string]bool{}}
	ctx, cancel := context.WithTimeout(context.Background(), cfg.Duration)
	defer cancel()

	var wg sync.WaitGroup
	for c := 0; c < cfg.Clients; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			runClient(ctx, cc, cfg, c, rand.New(rand.NewSource(cfg.Seed*1000+int64(c))), rec, pool)
		}(c)
	}
	schedule := planFaults(cfg)
	faults := runFaults(ctx, cc, cfg, schedule, rec)
	wg.Wait()

	// Undo everything, restart the dead, and let the cluster settle.
	cc.restoreAll()
	cc.restartDead()
	for i := range cc.nodes {
		cc.waitNodeHealthy(i, 60*time.Second)
	}

	rec.mu.Lock()
	h := chaosHistory{Config: cfg, Faults: faults, Ops: append([]chaosOp(nil), rec.ops...)}
	rec.mu.Unlock()

	var violations []string
	violations = append(violations, checkLinearizable(h)...)
	violations = append(violations, checkRevocationBound(h)...)
	violations = append(violations, checkDecryptIntegrity(h)...)
	conv, digests := checkConvergence(cc)
	violations = append(violations, conv...)
	violations = append(violations, checkDurability(cc, h)...)

	st := historyStats(h)
	t.Logf("chaos seed=%d: %s; faults: %s; %d violations", cfg.Seed, st, faultSummary(faults), len(violations))
	if len(digests) > 0 {
		t.Logf("final state digest (every node): %s", digests[0])
	}
	path := ""
	if keep || len(violations) > 0 {
		path = saveHistory(t, h)
	}
	if len(violations) > 0 {
		var b strings.Builder
		fmt.Fprintf(&b, "CHAOS VIOLATIONS (seed=%d duration=%v nodes=%d)\nreproduce: make chaos SEED=%d DURATION=%v NODES=%d\nre-check the saved history: CHAOS_REPLAY=%s go test ./integration -run TestChaosReplay -v\nfault schedule:\n",
			cfg.Seed, cfg.Duration, cfg.Nodes, cfg.Seed, cfg.Duration, cfg.Nodes, path)
		for _, f := range faults {
			fmt.Fprintf(&b, "  %s\n", f)
		}
		for _, v := range violations {
			fmt.Fprintf(&b, "%s\n", v)
		}
		t.Error(b.String())
	}
}

func (f faultEvent) String() string {
	s := fmt.Sprintf("%7.3fs-%7.3fs %s", float64(f.Start)/1e9, float64(f.End)/1e9, f.Kind)
	if f.Target != "" {
		s += " " + f.Target
	}
	if f.Detail != "" {
		s += " (" + f.Detail + ")"
	}
	if f.Err != "" {
		s += " ERROR: " + f.Err
	}
	return s
}

func faultSummary(fs []faultEvent) string {
	var parts []string
	for _, f := range fs {
		parts = append(parts, f.Kind+":"+f.Target)
	}
	return strings.Join(parts, ", ")
}

func historyStats(h chaosHistory) string {
	by := map[string][3]int{}
	for _, op := range h.Ops {
		c := by[op.Kind]
		switch op.Outcome {
		case "ok":
			c[0]++
		case "fail":
			c[1]++
		default:
			c[2]++
		}
		by[op.Kind] = c
	}
	var parts []string
	for _, k := range []string{"create", "rotate", "disable", "enable", "revoke", "encrypt", "decrypt"} {
		c := by[k]
		parts = append(parts, fmt.Sprintf("%s %d/%d/%d", k, c[0], c[1], c[2]))
	}
	conflicts := 0
	for _, op := range h.Ops {
		if isRotateConflict(op) {
			conflicts++
		}
	}
	return fmt.Sprintf("%d ops (ok/fail/unknown): %s; rotate conflicts (finding 1, fixed; expect 0): %d", len(h.Ops), strings.Join(parts, " "), conflicts)
}

func saveHistory(t *testing.T, h chaosHistory) string {
	dir := os.Getenv("CHAOS_OUT")
	if dir == "" {
		dir = filepath.Join("..", ".run", "chaos")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Logf("save history: %v", err)
		return ""
	}
	path := filepath.Join(dir, fmt.Sprintf("seed-%d-%s.json", h.Config.Seed, time.Now().UTC().Format("20060102T150405")))
	b, err := marshalHistory(h)
	if err == nil {
		err = os.WriteFile(path, b, 0o644)
	}
	if err != nil {
		t.Logf("save history: %v", err)
		return ""
	}
	abs, _ := filepath.Abs(path)
	t.Logf("history saved to %s", abs)
	return abs
}

// ---- clients ----

func runClient(ctx context.Context, cc *chaosCluster, cfg chaosConfig, c int, rng *rand.Rand, rec *recorder, pool *keyPool) {
	seq := 0
	for ctx.Err() == nil {
		pool.mu.Lock()
		nkeys := len(pool.names)
		canCreate := nkeys-len(pool.revoked)+pool.pending < cfg.MaxKeys
		pool.mu.Unlock()
		p := rng.Intn(100)
		switch {
		case nkeys == 0 || (canCreate && p < 10):
			seq++
			name := fmt.Sprintf("s%d-c%d-k%d", cfg.Seed, c, seq)
			pool.mu.Lock()
			pool.pending++
			pool.mu.Unlock()
			op := doWrite(cc, rng, rec, c, "create", name, "", fmt.Sprintf("chaos-%d-%d-%d", cfg.Seed, c, seq))
			pool.mu.Lock()
			pool.pending--
			if op.Outcome == "ok" {
				pool.names = append(pool.names, name)
				pool.ids[name] = op.KeyID
			}
			pool.mu.Unlock()
		case p < 20:
			name, id := pool.pick(rng)
			seq++
			doWrite(cc, rng, rec, c, "rotate", name, id, fmt.Sprintf("rot-%d-%d-%d", cfg.Seed, c, seq))
		case p < 28:
			name, id := pool.pick(rng)
			seq++
			doWrite(cc, rng, rec, c, "disable", name, id, fmt.Sprintf("dis-%d-%d-%d", cfg.Seed, c, seq))
		case p < 38:
			name, id := pool.pick(rng)
			seq++
			doWrite(cc, rng, rec, c, "enable", name, id, fmt.Sprintf("ena-%d-%d-%d", cfg.Seed, c, seq))
		case p < 40:
			if rng.Intn(4) != 0 { // revocation is terminal: keep it rare
				continue
			}
			name, id := pool.pick(rng)
			seq++
			if doWrite(cc, rng, rec, c, "revoke", name, id, fmt.Sprintf("rev-%d-%d-%d", cfg.Seed, c, seq)).Outcome == "ok" {
				pool.mu.Lock()
				pool.revoked[name] = true
				pool.mu.Unlock()
			}
		case p < 75:
			name, id := pool.pick(rng)
			doEncrypt(ctx, cc, rng, rec, pool, c, name, id, rng.Intn(3) == 0)
		default:
			pool.mu.Lock()
			var src chaosOp
			if len(pool.cts) > 0 {
				src = pool.cts[rng.Intn(len(pool.cts))]
			}
			pool.mu.Unlock()
			if src.Ciphertext == nil {
				continue
			}
			doDecrypt(ctx, cc, rng, rec, c, src, rng.Intn(3) == 0)
		}
		time.Sleep(time.Duration(rng.Intn(15)) * time.Millisecond) // think time
	}
}

func (p *keyPool) pick(rng *rand.Rand) (string, string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	// Mostly keys that are not revoked; sometimes a revoked one, to keep
	// probing that it stays unusable.
	n := p.names[rng.Intn(len(p.names))]
	for i := 0; i < 5 && p.revoked[n] && rng.Intn(10) != 0; i++ {
		n = p.names[rng.Intn(len(p.names))]
	}
	return n, p.ids[n]
}

// doWrite retries one write with one request id over random nodes until a
// definite answer or its budget runs out (then its effect is unknown). It
// does not stop at the end of the run: a started write gets its answer.
func doWrite(cc *chaosCluster, rng *rand.Rand, rec *recorder, c int, kind, name, keyID, reqID string) chaosOp {
	op := chaosOp{Client: c, Kind: kind, Key: name, KeyID: keyID, RequestID: reqID, Call: rec.now()}
	budget := time.Now().Add(8 * time.Second)
	var lastErr error
	for {
		op.Node = rng.Intn(len(cc.nodes))
		op.Attempts++
		actx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		var key *cabinetpb.Key
		var err error
		k := cc.keys(op.Node)
		switch kind {
		case "create":
			var r *cabinetpb.CreateKeyResponse
			r, err = k.CreateKey(actx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, Description: name, RequestId: reqID})
			key = r.GetKey()
		case "rotate":
			var r *cabinetpb.KeyResponse
			r, err = k.RotateKey(actx, &cabinetpb.KeyRefRequest{KeyId: keyID, RequestId: reqID})
			key = r.GetKey()
		case "disable":
			var r *cabinetpb.KeyResponse
			r, err = k.DisableKey(actx, &cabinetpb.KeyRefRequest{KeyId: keyID, RequestId: reqID})
			key = r.GetKey()
		case "enable":
			var r *cabinetpb.KeyResponse
			r, err = k.EnableKey(actx, &cabinetpb.KeyRefRequest{KeyId: keyID, RequestId: reqID})
			key = r.GetKey()
		case "revoke":
			var r *cabinetpb.KeyResponse
			r, err = k.RevokeKey(actx, &cabinetpb.RevokeKeyRequest{KeyId: keyID, Reason: cabinetpb.RevocationReason_SUPERSEDED, RequestId: reqID})
			key = r.GetKey()
		}
		cancel()
		if err == nil {
			op.Outcome, op.Return = "ok", rec.now()
			op.Version, op.State = key.GetPrimaryVersion(), key.GetState().String()
			if kind == "create" {
				op.KeyID = key.GetKeyId()
			}
			break
		}
		lastErr = err
		if !retryableCode(err) {
			op.Outcome, op.Return = "fail", rec.now()
			break
		}
		if time.Now().After(budget) {
			op.Outcome, op.Return = "unknown", rec.now()
			break
		}
		time.Sleep(time.Duration(50+rng.Intn(100)) * time.Millisecond) // retry backoff
	}
	if lastErr != nil && op.Outcome != "ok" {
		op.Code, op.Err = status.Code(lastErr).String(), status.Convert(lastErr).Message()
	}
	rec.add(op)
	return op
}

func doEncrypt(ctx context.Context, cc *chaosCluster, rng *rand.Rand, rec *recorder, pool *keyPool, c int, name, keyID string, strong bool) {
	pt := []byte(fmt.Sprintf("pt-%d-%d", c, rng.Int63()))
	op := chaosOp{Client: c, Kind: "encrypt", Key: name, KeyID: keyID, Node: rng.Intn(len(cc.nodes)), Strong: strong, Plaintext: pt, Attempts: 1}
	cons := cabinetpb.Consistency_BOUNDED_STALENESS
	if strong {
		cons = cabinetpb.Consistency_STRONG
	}
	actx, cancel := context.WithTimeout(ctx, 2*time.Second)
	op.Call = rec.now()
	r, err := cc.keys(op.Node).Encrypt(actx, &cabinetpb.EncryptRequest{KeyId: keyID, Plaintext: pt, EncryptionContext: map[string]string{"k": name}, Consistency: cons})
	op.Return = rec.now()
	cancel()
	if err == nil {
		op.Outcome, op.Version, op.Ciphertext = "ok", r.GetKeyVersion(), r.GetCiphertext()
		pool.mu.Lock()
		pool.cts = append(pool.cts, op)
		pool.mu.Unlock()
	} else {
		op.Outcome, op.Code, op.Err = "fail", status.Code(err).String(), status.Convert(err).Message()
	}
	rec.add(op)
}

func doDecrypt(ctx context.Context, cc *chaosCluster, rng *rand.Rand, rec *recorder, c int, src chaosOp, strong bool) {
	op := chaosOp{Client: c, Kind: "decrypt", Key: src.Key, KeyID: src.KeyID, Node: rng.Intn(len(cc.nodes)), Strong: strong, ExpectPlain: src.Plaintext, Ciphertext: src.Ciphertext, Attempts: 1}
	cons := cabinetpb.Consistency_BOUNDED_STALENESS
	if strong {
		cons = cabinetpb.Consistency_STRONG
	}
	actx, cancel := context.WithTimeout(ctx, 2*time.Second)
	op.Call = rec.now()
	r, err := cc.keys(op.Node).Decrypt(actx, &cabinetpb.DecryptRequest{Ciphertext: src.Ciphertext, EncryptionContext: map[string]string{"k": src.Key}, Consistency: cons})
	op.Return = rec.now()
	cancel()
	if err == nil {
		op.Outcome, op.Version, op.Plaintext = "ok", r.GetKeyVersion(), r.GetPlaintext()
	} else {
		op.Outcome, op.Code, op.Err = "fail", status.Code(err).String(), status.Convert(err).Message()
	}
	rec.add(op)
}

// ---- faults ----

var faultKinds = []string{"kill9", "leader-kill", "sigstop", "partition", "isolate-leader", "delay", "drop", "hsm-outage", "rolling-restart"}

type plannedFault struct {
	Kind   string
	Target int // node index (ignored for leader faults)
	Hold   time.Duration
	Gap    time.Duration // quiet time before the fault
	Delay  time.Duration
	Minor  []int // partition: the isolated minority
}

// planFaults derives the whole schedule from the seed: every fault kind in
// a seeded order, repeated as long as the run lasts.
func planFaults(cfg chaosConfig) []plannedFault {
	rng := rand.New(rand.NewSource(cfg.Seed))
	var out []plannedFault
	for round := 0; round < 20; round++ {
		kinds := append([]string(nil), faultKinds...)
		rng.Shuffle(len(kinds), func(i, j int) { kinds[i], kinds[j] = kinds[j], kinds[i] })
		for _, k := range kinds {
			f := plannedFault{Kind: k, Target: rng.Intn(cfg.Nodes), Hold: time.Duration(2000+rng.Intn(2500)) * time.Millisecond,
				Gap: time.Duration(500+rng.Intn(1500)) * time.Millisecond, Delay: time.Duration(20+rng.Intn(130)) * time.Millisecond}
			perm := rng.Perm(cfg.Nodes)
			f.Minor = perm[:1+rng.Intn((cfg.Nodes-1)/2)]
			out = append(out, f)
		}
	}
	return out
}

func runFaults(ctx context.Context, cc *chaosCluster, cfg chaosConfig, plan []plannedFault, rec *recorder) []faultEvent {
	var events []faultEvent
	sleep := func(d time.Duration) bool {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(d):
			return true
		}
	}
	// Let the clients create some keys before the first fault.
	if !sleep(1500 * time.Millisecond) {
		return nil
	}
	for _, f := range plan {
		if ctx.Err() != nil || !sleep(f.Gap) {
			break
		}
		ev := faultEvent{Kind: f.Kind, Start: rec.now()}
		// Hold a fault at most until the run ends (all are undone after it).
		hold := func() { sleep(f.Hold) }
		switch f.Kind {
		case "kill9":
			ev.Target = cc.nodes[f.Target].id
			cc.kill9(f.Target)
			hold()
			cc.startNode(f.Target)
			ev.Err = errString(pollUntil(context.Background(), 30*time.Second, func() error { return cc.nodeHealthy(f.Target) }))
		case "leader-kill":
			l, err := cc.leaderIndex()
			if err != nil {
				ev.Err = err.Error()
				break
			}
			ev.Target = cc.nodes[l].id
			cc.kill9(l)
			hold()
			cc.startNode(l)
			ev.Err = errString(pollUntil(context.Background(), 30*time.Second, func() error { return cc.nodeHealthy(l) }))
		case "sigstop":
			ev.Target = cc.nodes[f.Target].id
			cc.signal(f.Target, syscall.SIGSTOP)
			hold()
			cc.signal(f.Target, syscall.SIGCONT)
		case "partition", "isolate-leader":
			minor := f.Minor
			if f.Kind == "isolate-leader" {
				l, err := cc.leaderIndex()
				if err != nil {
					ev.Err = err.Error()
					break
				}
				minor = []int{l}
			}
			var names []string
			for _, i := range minor {
				names = append(names, cc.nodes[i].id)
			}
			ev.Target = strings.Join(names, "+")
			cc.proxy.partition(minor...)
			hold()
			cc.proxy.heal()
		case "delay":
			ev.Detail = f.Delay.String() + " per chunk, all links"
			cc.proxy.setDelay(f.Delay)
			hold()
			cc.proxy.setDelay(0)
		case "drop":
			ev.Detail = fmt.Sprintf("%d connections closed", cc.proxy.dropAll())
		case "hsm-outage":
			ev.Target = cc.nodes[f.Target].id
			if err := cc.hsmOutage(f.Target, true); err != nil {
				ev.Err = err.Error()
				break
			}
			hold()
			ev.Err = errString(cc.hsmOutage(f.Target, false))
		case "rolling-restart":
			ev.Target = "all"
			for i := range cc.nodes {
				cc.terminate(i)
				cc.startNode(i)
				if err := pollUntil(context.Background(), 30*time.Second, func() error { return cc.nodeHealthy(i) }); err != nil {
					ev.Err = err.Error()
					break
				}
			}
		}
		ev.End = rec.now()
		events = append(events, ev)
	}
	return events
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// bytesEqual is bytes.Equal, named for the checkers' readability.
func bytesEqual(a, b []byte) bool { return bytes.Equal(a, b) }
