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
	if all, _ := resolveBenchOps([]string{"all"}); len(all) != len(benchOps) {
		t.Errorf("all = %v", all)
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
			slice: time.Second, batch: 100, timeout: 10 * time.Second, spec: "EC_P256", ops: benchDefaultOps}
	}
	f := ok()
	if err := f.validate(); err != nil || f.warmup != time.Second {
		t.Fatalf("defaults: %v (warmup %v)", err, f.warmup)
	}
	for name, mut := range map[string]func(*benchFlags){
		"payload":     func(f *benchFlags) { f.payload = 0 },
		"batch":       func(f *benchFlags) { f.batch = 1001 },
		"huge batch":  func(f *benchFlags) { f.payload, f.batch = 65536, 1000 },
		"spec":        func(f *benchFlags) { f.spec = "RSA_2048" },
		"output":      func(f *benchFlags) { f.output = "yaml" },
		"profile":     func(f *benchFlags) { f.serverProfile = "/tmp/x" },
		"duration":    func(f *benchFlags) { f.duration = 0 },
		"concurrency": func(f *benchFlags) { f.concurrency = 0 },
	} {
		f := ok()
		mut(f)
		if err := f.validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
