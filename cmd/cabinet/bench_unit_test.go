package main

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

func TestLatencyHistQuantiles(t *testing.T) {
	var h latencyHist
	r := rand.New(rand.NewPCG(1, 2))
	var all []time.Duration
	for i := 0; i < 200_000; i++ {
		// log-uniform from 10µs to 1s
		d := time.Duration(10e3 * float64(uint64(1)<<r.IntN(17)) * (1 + r.Float64()))
		all = append(all, d)
		h.record(d)
	}
	slices.Sort(all)
	for _, q := range []float64{0.5, 0.9, 0.99, 0.999} {
		exact := all[int(q*float64(len(all)))-1]
		got := h.quantile(q)
		if rel := float64(got-exact) / float64(exact); rel < -0.001 || rel > 0.035 {
			t.Errorf("q%.3f: got %v, exact %v (%.2f%%)", q, got, exact, rel*100)
		}
	}
	if h.quantile(1) != all[len(all)-1] || h.max != all[len(all)-1] {
		t.Errorf("max: %v / %v, want %v", h.quantile(1), h.max, all[len(all)-1])
	}
	var m latencyHist
	m.merge(&h)
	m.merge(&h)
	if m.n != 2*h.n || m.quantile(0.5) != h.quantile(0.5) {
		t.Errorf("merge: n %d, p50 %v vs %v", m.n, m.quantile(0.5), h.quantile(0.5))
	}
	for _, v := range []uint64{0, 1, 63, 64, 65, 127, 128, 129, 1000, 1 << 20, 1<<40 + 12345} {
		if up := histValue(histIndex(v)); up < v || (v >= 64 && float64(up-v) > float64(v)/64+1) {
			t.Errorf("bucket of %d has upper edge %d", v, up)
		}
	}
}

func TestEchoSizesMatchTheOperation(t *testing.T) {
	for _, c := range []struct{ req, resp int }{{1057, 1141}, {40, 34}, {10, 3}, {106_000, 114_000}, {3, 1}} {
		pl, rs := echoSizes(c.req, c.resp)
		gotReq := proto.Size(&cabinetpb.EchoRequest{Payload: make([]byte, pl), ResponseSize: int32(rs)})
		gotResp := proto.Size(&cabinetpb.EchoResponse{Payload: make([]byte, rs)})
		if gotReq > c.req || gotReq < c.req-3 {
			t.Errorf("request %d: echo request is %d bytes", c.req, gotReq)
		}
		if rs < 1 || (c.resp >= 3 && (gotResp > c.resp || gotResp < c.resp-3)) {
			t.Errorf("response %d: echo response is %d bytes (response_size %d)", c.resp, gotResp, rs)
		}
	}
}

func TestNoopCeilingMatchesCommandSize(t *testing.T) {
	env := &benchEnv{principal: "admin:admin", runID: "0123456789ab"}
	p := &preparedOp{}
	p.setNoop(env, fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, &fsmpb.CreateKey{
		KeyId: "k-abcdefghijklmnopqrstuvwxyz", Spec: fsmpb.KeySpec_KEY_SPEC_AES_256, Description: "cabinet-bench x",
		Material: &fsmpb.WrappedBlob{KekVersion: 1, Blob: make([]byte, aesSealedBytes)},
	}, "bench-x-1-1")
	if p.commandBytes < 150 || p.noopCommandSize > p.commandBytes || p.noopCommandSize < p.commandBytes-3 {
		t.Fatalf("command %d B, noop command %d B (padding %d)", p.commandBytes, p.noopCommandSize, p.noopPadding)
	}
	// The server builds the no-op the same way.
	cmd, err := fsm.NewCommand(fsmpb.CommandType_COMMAND_TYPE_NOOP, &fsmpb.Noop{Padding: make([]byte, p.noopPadding)}, "", env.principal)
	if err != nil {
		t.Fatal(err)
	}
	cmd.LeaderTimeUnixNano = time.Now().UnixNano()
	if got := proto.Size(cmd); got != p.noopCommandSize {
		t.Errorf("server-built no-op is %d B, bench computed %d B", got, p.noopCommandSize)
	}
}

func TestResolveBenchOpsAndTargets(t *testing.T) {
	ops, err := resolveBenchOps([]string{"Encrypt", "decrypt", "encrypt"})
	if err != nil || !slices.Equal(ops, []string{"encrypt", "decrypt"}) {
		t.Errorf("ops %v, %v", ops, err)
	}
	if all, _ := resolveBenchOps([]string{"all"}); len(all) != len(benchOps)-1 || slices.Contains(all, "failover") {
		t.Errorf("all = %v (must be every operation but failover)", all)
	}
	if ops, err := resolveBenchOps([]string{"failover"}); err != nil || !slices.Equal(ops, []string{"failover"}) {
		t.Errorf("failover by name: %v, %v", ops, err)
	}
	if _, err := resolveBenchOps([]string{"explode"}); err == nil {
		t.Error("an unknown op was accepted")
	}
	nodes := []benchNode{
		{NodeID: "n1", APIAddr: "127.0.0.1:1", Role: "leader", Healthy: true},
		{NodeID: "n2", APIAddr: "127.0.0.1:2", Role: "follower", Healthy: false},
		{NodeID: "n3", APIAddr: "127.0.0.1:3", Role: "follower", Healthy: true},
	}
	for target, want := range map[string][]string{"leader": {"n1"}, "follower": {"n3"}, "all": {"n1", "n3"}, "127.0.0.1:2": {"n2"}} {
		got, err := pickTargets(target, nodes)
		var ids []string
		for _, n := range got {
			ids = append(ids, n.NodeID)
		}
		if err != nil || !slices.Equal(ids, want) {
			t.Errorf("target %s: %v, %v; want %v", target, ids, err, want)
		}
	}
	if _, err := pickTargets("follower", nodes[:1]); err == nil {
		t.Error("follower target without a follower was accepted")
	}
	if _, err := pickTargets("bogus", nodes); err == nil {
		t.Error("a bogus target was accepted")
	}
}

func TestBenchFlagsValidate(t *testing.T) {
	ok := func() *benchFlags {
		return &benchFlags{output: "table", payload: 1024, concurrency: 64, connections: 4, duration: 10 * time.Second,
			slice: time.Second, batch: 100, timeout: 10 * time.Second, spec: "EC_P256", ops: benchDefaultOps, failoverRounds: 1, keys: 1}
	}
	f := ok()
	if err := f.validate(); err != nil || f.warmup != time.Second {
		t.Fatalf("defaults: %v (warmup %v)", err, f.warmup)
	}
	for name, mut := range map[string]func(*benchFlags){
		"payload":                  func(f *benchFlags) { f.payload = 0 },
		"batch":                    func(f *benchFlags) { f.batch = 1001 },
		"huge batch":               func(f *benchFlags) { f.payload, f.batch = 65536, 1000 },
		"spec":                     func(f *benchFlags) { f.spec = "RSA_2048" },
		"output":                   func(f *benchFlags) { f.output = "yaml" },
		"profile":                  func(f *benchFlags) { f.serverProfile = "/tmp/x" },
		"duration":                 func(f *benchFlags) { f.duration = 0 },
		"concurrency":              func(f *benchFlags) { f.concurrency = 0 },
		"failover without --local": func(f *benchFlags) { f.ops = []string{"encrypt", "failover"} },
		"failover rounds":          func(f *benchFlags) { f.local, f.ops, f.failoverRounds = true, []string{"failover"}, 0 },
		"keys 0":                   func(f *benchFlags) { f.keys = 0 },
		"keys 100001":              func(f *benchFlags) { f.keys = 100001 },
	} {
		f := ok()
		mut(f)
		if err := f.validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestFailoverFlagsValidate(t *testing.T) {
	f := &benchFlags{output: "table", payload: 1024, concurrency: 64, connections: 4, duration: 10 * time.Second,
		slice: time.Second, batch: 100, timeout: 10 * time.Second, spec: "EC_P256", ops: []string{"failover"}, failoverRounds: 3, local: true, keys: 1}
	if err := f.validate(); err != nil {
		t.Fatalf("--local --ops failover --failover-rounds 3: %v", err)
	}
	f.local, f.ops = false, []string{"all"}
	if err := f.validate(); err != nil || slices.Contains(f.ops, "failover") {
		t.Fatalf("all without --local: %v, ops %v", err, f.ops)
	}
}

func TestLocalServerDuration(t *testing.T) {
	t.Setenv("CABINET_RAFT_HEARTBEAT_TIMEOUT", "")
	for _, c := range []struct {
		args []string
		want time.Duration
		src  string
	}{
		{nil, time.Second, "default"},
		{[]string{"--log-level=warn"}, time.Second, "default"},
		{[]string{"--raft-heartbeat-timeout=500ms"}, 500 * time.Millisecond, "--local-server-arg"},
		{[]string{"--raft-heartbeat-timeout", "2s", "--log-level=warn"}, 2 * time.Second, "--local-server-arg"},
		{[]string{"-raft-heartbeat-timeout=3s", "--raft-heartbeat-timeout=4s"}, 4 * time.Second, "--local-server-arg"},
		{[]string{"--raft-heartbeat-timeout-x=9s"}, time.Second, "default"},
	} {
		got, src, err := localServerDuration(c.args, "raft-heartbeat-timeout", time.Second)
		if err != nil || got != c.want || src != c.src {
			t.Errorf("%q: %v %s %v; want %v %s", c.args, got, src, err, c.want, c.src)
		}
	}
	if _, _, err := localServerDuration([]string{"--raft-heartbeat-timeout=soon"}, "raft-heartbeat-timeout", time.Second); err == nil {
		t.Error("a bad duration was accepted")
	}
	t.Setenv("CABINET_RAFT_HEARTBEAT_TIMEOUT", "1500ms")
	if got, src, err := localServerDuration(nil, "raft-heartbeat-timeout", time.Second); err != nil || got != 1500*time.Millisecond || src != "env" {
		t.Errorf("env: %v %s %v", got, src, err)
	}
}

// A synthetic round: two followers, the kill at 2s, writes failing from the
// kill until a write started at 3.5s is acknowledged at 3.6s.
func TestAnalyzeFailoverWindow(t *testing.T) {
	ms := func(v int) time.Duration { return time.Duration(v) * time.Millisecond }
	kill := ms(2000)
	var crypto, writes []foEvent
	// Follower 0 succeeds every 10ms throughout, except a pause from 2300
	// to 2750 (last success 2300, next 2750: a 450ms gap).
	for t0 := 0; t0 <= 6600; t0 += 10 {
		if t0 > 2300 && t0 < 2750 {
			continue
		}
		crypto = append(crypto, foEvent{start: ms(t0) - ms(2), end: ms(t0), node: 0, ok: true})
	}
	// Follower 1 succeeds every 10ms until 1990, then fails twice
	// (Unavailable at 2100, DeadlineExceeded at 4100), then succeeds from
	// 4200: a gap of 4200-1990 = 2210ms for it, but not for both.
	for t0 := 0; t0 <= 1990; t0 += 10 {
		crypto = append(crypto, foEvent{start: ms(t0) - ms(2), end: ms(t0), node: 1, ok: true})
	}
	crypto = append(crypto,
		foEvent{start: ms(2050), end: ms(2100), node: 1, code: "Unavailable", msg: "Unavailable: no leader"},
		foEvent{start: ms(2100), end: ms(4100), node: 1, code: "DeadlineExceeded", msg: "DeadlineExceeded: context deadline exceeded"},
		// a failure before the kill is not in the window
		foEvent{start: ms(500), end: ms(510), node: 1, code: "Internal", msg: "Internal: x"},
	)
	for t0 := 4200; t0 <= 6600; t0 += 10 {
		crypto = append(crypto, foEvent{start: ms(t0) - ms(2), end: ms(t0), node: 1, ok: true})
	}
	// after the window's end (3600 + 3000 = 6600): not counted
	crypto = append(crypto, foEvent{start: ms(6650), end: ms(6700), node: 1, code: "Unavailable"})
	// Writes: ok before the kill, one started before the kill and
	// acknowledged after it (must not count as resumed), failures, then
	// the first write started after the kill.
	writes = append(writes,
		foEvent{start: ms(1900), end: ms(1910), ok: true},
		foEvent{start: ms(1995), end: ms(2005), ok: true},
		foEvent{start: ms(2010), end: ms(3010), code: "DeadlineExceeded"},
		foEvent{start: ms(3010), end: ms(3400), code: "Unavailable"},
		foEvent{start: ms(3500), end: ms(3600), ok: true},
		foEvent{start: ms(3620), end: ms(3630), ok: true},
	)
	r := analyzeFailover(kill, crypto, writes, []string{"node2", "node3"}, foParams{after: 3 * time.Second, giveUp: 30 * time.Second, bucket: 100 * time.Millisecond, heartbeat: time.Second})
	if !r.WritesResumed || r.WriteUnavailableMS == nil || *r.WriteUnavailableMS != 1600 {
		t.Fatalf("resumed %v after %v ms, want 1600", r.WritesResumed, r.WriteUnavailableMS)
	}
	if x := *r.WriteUnavailableOverHeartb; x != 1.6 {
		t.Errorf("over heartbeat %v, want 1.6", x)
	}
	if r.WindowSeconds != 4.6 {
		t.Errorf("window %vs, want 4.6", r.WindowSeconds)
	}
	// Follower 0: 2000..2300 (31) + 2750..6600 (386); follower 1: 4200..6600 (241).
	if r.Crypto.OK != 31+386+241 || r.Crypto.Failed != 2 {
		t.Errorf("crypto ok %d failed %d, want %d and 2", r.Crypto.OK, r.Crypto.Failed, 31+386+241)
	}
	if r.Crypto.ErrorCodes["Unavailable"] != 1 || r.Crypto.ErrorCodes["DeadlineExceeded"] != 1 || r.Crypto.FirstError == "" {
		t.Errorf("codes %v, first %q", r.Crypto.ErrorCodes, r.Crypto.FirstError)
	}
	if r.CryptoBefore.Failed != 1 || r.CryptoBefore.OK != 200+200 {
		t.Errorf("before the kill: %+v", r.CryptoBefore)
	}
	if r.Crypto.LongestGapMSByFollower["node2"] != 450 || r.Crypto.LongestGapMSByFollower["node3"] != 2210 {
		t.Errorf("gaps by follower %v, want node2 450, node3 2210", r.Crypto.LongestGapMSByFollower)
	}
	if r.Crypto.LongestGapMS != 450 {
		t.Errorf("longest gap %v, want 450", r.Crypto.LongestGapMS)
	}
	// Writes in the window: the one acknowledged at 2005 and the rest.
	if r.Writes.Attempts != 5 || r.Writes.OK != 3 || r.Writes.Failed != 2 || r.Writes.ErrorCodes["DeadlineExceeded"] != 1 {
		t.Errorf("writes %+v", r.Writes)
	}
	// Buckets: from -2000ms (first completion at 0) to the window's end.
	if len(r.Buckets) != 67 || r.Buckets[0].TMS != -2000 || r.Buckets[len(r.Buckets)-1].TMS != 4600 {
		t.Fatalf("%d buckets from %d to %d ms", len(r.Buckets), r.Buckets[0].TMS, r.Buckets[len(r.Buckets)-1].TMS)
	}
	var ok, failed, wok uint64
	for _, b := range r.Buckets {
		ok, failed, wok = ok+b.OK, failed+b.Failed, wok+b.WritesOK
	}
	if ok != r.Crypto.OK+r.CryptoBefore.OK || failed != 3 || wok != 4 {
		t.Errorf("buckets: %d ok, %d failed, %d writes ok", ok, failed, wok)
	}
	if b := r.Buckets[25]; b.TMS != 500 || b.OK != 0 || b.Failed != 0 { // 2500..2600: follower 0 paused, follower 1 waiting
		t.Errorf("bucket 2500ms: %+v", b)
	}
	if r.hist.n != r.Crypto.OK {
		t.Errorf("latency samples %d, want %d", r.hist.n, r.Crypto.OK)
	}

	// Writes that never resume: the window runs to the give-up point.
	r = analyzeFailover(kill, crypto[:10], writes[:4], []string{"node2", "node3"}, foParams{after: 3 * time.Second, giveUp: 30 * time.Second, bucket: 100 * time.Millisecond, heartbeat: time.Second})
	if r.WritesResumed || r.WriteUnavailableMS != nil || r.WindowSeconds != 30 {
		t.Errorf("not resumed: %v %v %v", r.WritesResumed, r.WriteUnavailableMS, r.WindowSeconds)
	}
	fo := &benchFailover{Rounds: []benchFailoverRound{r}}
	r2 := analyzeFailover(kill, crypto, writes, []string{"a", "b"}, foParams{after: 3 * time.Second, giveUp: 30 * time.Second, bucket: 100 * time.Millisecond, heartbeat: 2 * time.Second})
	fo.Rounds[0].KilledAt, r2.KilledAt = time.Unix(1, 0), time.Unix(2, 0)
	fo.Rounds = append(fo.Rounds, r2, newFailoverRound(nil)) // the last never killed anything
	summarizeFailover(fo)
	if fo.RoundsResumed != 1 || *fo.WriteUnavailableMinMS != 1600 || *fo.WriteUnavailableMaxMS != 1600 || *fo.MaxWriteUnavailableHeartbeat != 0.8 {
		t.Errorf("summary: %d resumed, %v-%v, x%v", fo.RoundsResumed, *fo.WriteUnavailableMinMS, *fo.WriteUnavailableMaxMS, *fo.MaxWriteUnavailableHeartbeat)
	}
	if fo.CryptoFailed != r2.Crypto.Failed+fo.Rounds[0].Crypto.Failed || fo.LongestGapMS < 450 {
		t.Errorf("summary crypto: %d failed, gap %v", fo.CryptoFailed, fo.LongestGapMS)
	}
}
