package integration

// Restart-to-serving with N keys (docs/PERFORMANCE.md, "Scale"). This is a
// measurement, not a check: it only runs with CABINET_SCALE=1 and asserts
// nothing about timings.
//
//	CABINET_SCALE=1 CABINET_SCALE_KEYS=10000,100000,1000000 \
//	  go test -run '^TestScaleRestart$' -v -timeout 60m ./integration
//
// It starts a real single-node cluster (SoftHSM), takes a Raft snapshot
// through `cabinet operator snapshot save`, stops the server, and writes a
// newer Raft snapshot into the node's own snapshot store
// (DATA/raft/snapshots): the same Raft index, term and configuration and the
// same cluster state, plus N synthetic AES-256 key records. Then it starts
// `cabinet server` again and times process start -> `cabinet operator
// status` reports healthy with N keys, and reads the server's VmRSS.
//
// Then, with the N keys in the server's state, it runs the real benchmark
// tool against that node: `cabinet bench --ops echo,encrypt --duration 5s
// -o json --json-out FILE` with the admin certificate from `operator init
// --admin-out`. It parses the JSON report and logs a "SCALE bench" line:
// encrypt ops/s, its ceiling (Echo of the same sizes on the same server) and
// the ratio, CPU µs per request of both (bench + server process), p50/p99,
// and the Echo ratio against a bare gRPC server in the bench process (a
// ceiling outside the server). The bench runs before the snapshot save, so
// the logged peak RSS after the snapshot includes the bench load. Bench creates its own encrypt key: the
// N keys are there for their effect on the server (heap and GC, map sizes),
// not as a working set (bench has no option for one). The test fails if the
// bench run fails or the report lacks a field; timings are not asserted.

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

func scaleRecord(i int, blob []byte, t0 int64) *fsmpb.KeyRecord {
	rec := &fsmpb.KeyRecord{
		KeyId: fmt.Sprintf("k-scale%020d", i), Spec: fsmpb.KeySpec_KEY_SPEC_AES_256, Usage: fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT,
		State: fsmpb.KeyState_KEY_STATE_ACTIVE, Origin: fsmpb.KeyOrigin_KEY_ORIGIN_GENERATED,
		CreatedUnixNano: t0 + int64(i), UpdatedUnixNano: t0 + int64(i), CreatedBy: "svc-" + strconv.Itoa(i%50),
	}
	if i%4 == 0 {
		rec.Alias = "scale-" + strconv.Itoa(i)
		rec.Description = "key for tenant " + strconv.Itoa(i)
	}
	if i%8 == 0 {
		rec.Tags = map[string]string{"team": "payments", "env": "prod"}
	}
	versions := 1
	if i%10 == 0 {
		versions = 3
	}
	for v := 1; v <= versions; v++ {
		b := make([]byte, len(blob))
		copy(b, blob)
		b[0], b[1], b[2], b[3] = byte(i), byte(i>>8), byte(i>>16), byte(v)
		rec.Versions = append(rec.Versions, &fsmpb.KeyVersion{
			Version: uint32(v), Material: &fsmpb.WrappedBlob{KekVersion: 1, Blob: b},
			CreatedUnixNano: t0 + int64(i), State: fsmpb.KeyVersionState_KEY_VERSION_STATE_ENABLED,
		})
	}
	rec.PrimaryVersion = uint32(versions)
	return rec
}

func procRSS(pid int) uint64 { return procStatus(pid, "VmRSS:") }

func procStatus(pid int, field string) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, field) {
			kb, _ := strconv.ParseUint(strings.Fields(l)[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

func TestScaleRestart(t *testing.T) {
	if os.Getenv("CABINET_SCALE") != "1" {
		t.Skip("measurement, not a check: set CABINET_SCALE=1 to run (docs/PERFORMANCE.md, Scale)")
	}
	sizes := []int{10_000, 100_000, 1_000_000}
	if s := os.Getenv("CABINET_SCALE_KEYS"); s != "" {
		sizes = nil
		for _, f := range strings.Split(s, ",") {
			n, err := strconv.Atoi(f)
			if err != nil {
				t.Fatal(err)
			}
			sizes = append(sizes, n)
		}
	}
	c := newTestCluster(t, 1)
	// CABINET_SCALE_MEMORY_LIMIT (e.g. 1200MiB) is passed as the server's
	// --memory-limit, to measure resident memory under a soft limit.
	if ml := os.Getenv("CABINET_SCALE_MEMORY_LIMIT"); ml != "" {
		c.serverArgs = append(c.serverArgs, "--memory-limit", ml)
		t.Logf("SCALE server --memory-limit %s", ml)
	}
	nd := c.nodes[0]
	c.initNode(nd)
	c.start(nd)
	c.waitHealthy(nd, 60*time.Second)
	c.mustCLI(nil, "operator", "snapshot", "save", filepath.Join(c.root, "base.snap"), "--addr", nd.apiAddr)
	c.stop(nd)

	raftDir := filepath.Join(nd.dataDir, "raft")
	store, err := raft.NewFileSnapshotStore(raftDir, 1, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	metas, err := store.List()
	if err != nil || len(metas) == 0 {
		t.Fatalf("no raft snapshot in %s: %v", raftDir, err)
	}
	base := metas[0]
	_, rc, err := store.Open(base.ID)
	if err != nil {
		t.Fatal(err)
	}
	baseState, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}

	restart := func(label string, want int) {
		start := time.Now()
		c.start(nd)
		c.waitHealthy(nd, 10*time.Minute)
		took := time.Since(start)
		st, err := c.status(nd)
		if err != nil {
			t.Fatal(err)
		}
		rss := procRSS(nd.cmd.Process.Pid)
		time.Sleep(3 * time.Second)
		rss3 := procRSS(nd.cmd.Process.Pid)
		hwm := procStatus(nd.cmd.Process.Pid, "VmHWM:")
		// A snapshot through the API (Raft snapshot + Persist + stream to
		// the CLI), then the server's peak RSS.
		benchScale(t, c, nd, label)
		hwmBench := procStatus(nd.cmd.Process.Pid, "VmHWM:")
		t.Logf("SCALE bench %s: peak-rss-after-bench=%.1f MiB", label, float64(hwmBench)/(1<<20))
		snapStart := time.Now()
		c.mustCLI(nil, "operator", "snapshot", "save", filepath.Join(c.root, "scale.snap"), "--addr", nd.apiAddr, "--force")
		snapTook := time.Since(snapStart)
		hwmSnap := procStatus(nd.cmd.Process.Pid, "VmHWM:")
		t.Logf("SCALE restart %s: keys=%s (want %d) restart-to-healthy=%v rss-at-healthy=%.1f MiB rss+3s=%.1f MiB peak-rss-before-snapshot=%.1f MiB; snapshot save via CLI %v, peak-rss-after-snapshot=%.1f MiB",
			label, st.KeyCount, want, took.Round(time.Millisecond), float64(rss)/(1<<20), float64(rss3)/(1<<20), float64(hwm)/(1<<20),
			snapTook.Round(time.Millisecond), float64(hwmSnap)/(1<<20))
		c.stop(nd)
	}
	restart("baseline", 0)

	_, trans := raft.NewInmemTransport(raft.ServerAddress(nd.raftAddr))
	defer trans.Close()
	blob := make([]byte, 60)
	_, _ = rand.Read(blob)
	t0 := time.Now().UnixNano()
	for _, n := range sizes {
		st, err := fsm.ReadSnapshot(strings.NewReader(string(baseState)))
		if err != nil {
			t.Fatal(err)
		}
		for i := range n {
			st.Keys = append(st.Keys, scaleRecord(i, blob, t0))
		}
		s, err := fsm.StateFromProto(st)
		if err != nil {
			t.Fatal(err)
		}
		st = s.ToProto() // sorted, as a node writes it
		// The newest snapshot's Raft position (restart() took one through
		// the CLI); the cluster state of the first one plus n keys.
		metas, err := store.List()
		if err != nil || len(metas) == 0 {
			t.Fatalf("list snapshots: %v", err)
		}
		base := metas[0]
		sink, err := store.Create(base.Version, base.Index, base.Term, base.Configuration, base.ConfigurationIndex, trans)
		if err != nil {
			t.Fatal(err)
		}
		w := bufio.NewWriterSize(sink, 256<<10)
		if err := fsm.WriteSnapshot(w, st); err != nil {
			t.Fatal(err)
		}
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		if err := sink.Close(); err != nil {
			t.Fatal(err)
		}
		metas, _ = store.List()
		log.Printf("seeded %d keys: snapshot %s, %d bytes", n, metas[0].ID, metas[0].Size)
		restart(fmt.Sprintf("n=%d snapshot=%d bytes", n, metas[0].Size), n)
	}
}

// scaleBenchStats is the part of a cabinet-bench/v1 result (or
// ceiling_result) this test reads. Pointers: a field missing from the report
// fails the test.
type scaleBenchStats struct {
	OK         *uint64  `json:"ok"`
	Errors     *uint64  `json:"errors"`
	OpsPerSec  *float64 `json:"ops_per_sec"`
	CPUUSPerOp *float64 `json:"cpu_us_per_op"`
	LatencyMS  *struct {
		P50 *float64 `json:"p50"`
		P99 *float64 `json:"p99"`
	} `json:"latency_ms"`
	MachineCPUBusy *float64 `json:"machine_cpu_busy"`
}

type scaleBenchResult struct {
	Op      string `json:"op"`
	Error   string `json:"error"`
	Ceiling *struct {
		Kind  string `json:"kind"`
		Error string `json:"error"`
	} `json:"ceiling"`
	Result        *scaleBenchStats `json:"result"`
	CeilingResult *scaleBenchStats `json:"ceiling_result"`
	Ratio         *float64         `json:"ratio"`
	RatioIQR      *[2]float64      `json:"ratio_iqr"`
	CPURatio      *float64         `json:"cpu_ratio"`
}

type scaleBenchReport struct {
	Schema      string             `json:"schema"`
	Interrupted bool               `json:"interrupted"`
	CPUScope    string             `json:"cpu_scope"`
	Results     []scaleBenchResult `json:"results"`
}

// check returns why the stats lack a field the SCALE line needs, or "".
func (s *scaleBenchStats) check() string {
	switch {
	case s == nil:
		return "missing"
	case s.OK == nil || s.Errors == nil || s.OpsPerSec == nil:
		return "ok/errors/ops_per_sec missing"
	case s.CPUUSPerOp == nil:
		return "cpu_us_per_op missing or null"
	case s.LatencyMS == nil || s.LatencyMS.P50 == nil || s.LatencyMS.P99 == nil:
		return "latency_ms.p50/p99 missing"
	case *s.OK == 0 || *s.OpsPerSec <= 0:
		return fmt.Sprintf("no successful requests (ok %d, errors %d)", *s.OK, *s.Errors)
	}
	return ""
}

// benchScale runs `cabinet bench --ops echo,encrypt` against nd and logs a
// SCALE line from its JSON report. Measurement only: it fails on a failed
// run or an incomplete report, never on a timing.
func benchScale(t *testing.T, c *testCluster, nd *node, label string) {
	t.Helper()
	out := filepath.Join(c.root, fmt.Sprintf("bench-%d.json", time.Now().UnixNano()))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	stdout, stderr, err := c.cli(ctx, nil, "bench", "--addr", nd.apiAddr, "--target", nd.apiAddr,
		"--ca-cert", filepath.Join(c.adminDir, "ca.pem"),
		"--client-cert", filepath.Join(c.adminDir, "admin.pem"),
		"--client-key", filepath.Join(c.adminDir, "admin-key.pem"),
		"--ops", "echo,encrypt", "--duration", "5s", "-o", "json", "--json-out", out, "-q")
	if err != nil {
		t.Fatalf("cabinet bench (%s): %v\nstdout: %.2000s\nstderr: %.2000s", label, err, stdout, stderr)
	}
	took := time.Since(start)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatalf("bench JSON report: %v", err)
	}
	var rep scaleBenchReport
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("bench report is not JSON: %v\n%.2000s", err, b)
	}
	if rep.Schema != "cabinet-bench/v1" || rep.Interrupted {
		t.Fatalf("bench report: schema %q, interrupted %v", rep.Schema, rep.Interrupted)
	}
	res := map[string]scaleBenchResult{}
	for _, r := range rep.Results {
		res[r.Op] = r
	}
	for op, kind := range map[string]string{"echo": "bare-grpc", "encrypt": "echo"} {
		r, ok := res[op]
		switch {
		case !ok:
			t.Fatalf("bench report has no %s result: %.2000s", op, b)
		case r.Error != "" || r.Ceiling == nil || r.Ceiling.Error != "":
			t.Fatalf("bench %s failed: %q (ceiling: %+v)", op, r.Error, r.Ceiling)
		case r.Ceiling.Kind != kind:
			t.Fatalf("bench %s: ceiling %q, want %q", op, r.Ceiling.Kind, kind)
		case r.Ratio == nil || *r.Ratio <= 0 || r.RatioIQR == nil || r.CPURatio == nil:
			t.Fatalf("bench %s: ratio/ratio_iqr/cpu_ratio missing or zero", op)
		}
		if why := r.Result.check(); why != "" {
			t.Fatalf("bench %s result: %s", op, why)
		}
		if why := r.CeilingResult.check(); why != "" {
			t.Fatalf("bench %s ceiling_result: %s", op, why)
		}
	}
	e, x := res["encrypt"], res["echo"]
	busy := "?"
	if e.Result.MachineCPUBusy != nil {
		busy = fmt.Sprintf("%.0f%%", 100**e.Result.MachineCPUBusy)
	}
	t.Logf("SCALE bench %s: encrypt 1KiB %.0f ops/s, ceiling (echo, same sizes) %.0f ops/s, ratio %.2f (IQR %.2f-%.2f); "+
		"CPU %.1f us/op vs ceiling %.1f us/op (cpu_ratio %.2f); encrypt p50 %.2f ms p99 %.2f ms (ceiling p50 %.2f p99 %.2f); "+
		"echo/bare-grpc ratio %.2f (cpu_ratio %.2f, bare %.0f ops/s, %.1f us/op) => encrypt/bare %.2f; errors %d; machine busy %s; cpu_scope %q; bench took %v",
		label, *e.Result.OpsPerSec, *e.CeilingResult.OpsPerSec, *e.Ratio, e.RatioIQR[0], e.RatioIQR[1],
		*e.Result.CPUUSPerOp, *e.CeilingResult.CPUUSPerOp, *e.CPURatio,
		*e.Result.LatencyMS.P50, *e.Result.LatencyMS.P99, *e.CeilingResult.LatencyMS.P50, *e.CeilingResult.LatencyMS.P99,
		*x.Ratio, *x.CPURatio, *x.CeilingResult.OpsPerSec, *x.CeilingResult.CPUUSPerOp, *e.Ratio**x.Ratio,
		*e.Result.Errors, busy, rep.CPUScope, took.Round(time.Second))
}
