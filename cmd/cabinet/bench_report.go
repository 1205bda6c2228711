package main

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// benchSchema names the JSON report's shape (docs/PERFORMANCE.md). Fields
// are only ever added; a change of meaning gets a new schema name.
const benchSchema = "cabinet-bench/v1"

type benchReport struct {
	Schema      string        `json:"schema"`
	RunID       string        `json:"run_id"`
	StartedAt   time.Time     `json:"started_at"`
	FinishedAt  time.Time     `json:"finished_at"`
	Interrupted bool          `json:"interrupted"`
	Settings    benchSettings `json:"settings"`
	Machine     benchMachine  `json:"machine"`
	Cluster     benchCluster  `json:"cluster"`
	CPUScope    string        `json:"cpu_scope"`
	Results     []benchResult `json:"results"`
}

type benchSettings struct {
	Ops             []string `json:"ops"`
	PayloadBytes    int      `json:"payload_bytes"`
	Concurrency     int      `json:"concurrency"`
	Connections     int      `json:"connections"`
	DurationSeconds float64  `json:"duration_seconds"`
	SliceSeconds    float64  `json:"slice_seconds"`
	WarmupSeconds   float64  `json:"warmup_seconds"`
	Batch           int      `json:"batch"`
	Target          string   `json:"target"`
	SignSpec        string   `json:"sign_spec"`
	Strong          bool     `json:"strong"`
	Local           bool     `json:"local"`
	FailoverRounds  int      `json:"failover_rounds"`
	// Keys is --keys: the working set of the symmetric operations.
	Keys int `json:"keys"`
}

type benchMachine struct {
	GoVersion  string `json:"go_version"`
	GOOS       string `json:"goos"`
	GOARCH     string `json:"goarch"`
	NumCPU     int    `json:"num_cpu"`
	GOMAXPROCS int    `json:"gomaxprocs"`
	Hostname   string `json:"hostname"`
	Version    string `json:"cabinet_version"`
}

type benchCluster struct {
	Nodes   []benchNode `json:"nodes"`
	Targets []benchNode `json:"targets"`
}

type benchResult struct {
	Op string `json:"op"`
	// Error is set when the operation could not be measured at all (setup
	// failed, or every request failed); "" otherwise.
	Error string `json:"error"`
	// Interrupted: Ctrl-C or SIGTERM cut the measurement short.
	Interrupted     bool `json:"interrupted"`
	ItemsPerRequest int  `json:"items_per_request"`
	RequestBytes    int  `json:"request_bytes"`
	ResponseBytes   int  `json:"response_bytes"`
	// CommandBytes is the Raft command a write proposes (0 for reads).
	CommandBytes int `json:"command_bytes"`
	// Keys: how many distinct keys the operation's requests spread over
	// (--keys for the symmetric operations; fewer for decrypt, re-encrypt
	// and batch-decrypt when their ciphertext budget caps it; 1 for
	// sign/verify, one per caller for rotate-key; 0 for the others).
	Keys          int          `json:"keys"`
	Ceiling       benchCeiling `json:"ceiling"`
	Result        benchStats   `json:"result"`
	CeilingResult benchStats   `json:"ceiling_result"`
	// Ratio = result.ops_per_sec / ceiling_result.ops_per_sec (requests,
	// not items); 0 when the ceiling could not be measured.
	Ratio float64 `json:"ratio"`
	// SliceRatios: op/ceiling of each back-to-back slice pair; RatioMedian
	// and RatioIQR (25th, 75th percentile) say how much noise moved it.
	SliceRatios []float64  `json:"slice_ratios"`
	RatioMedian float64    `json:"ratio_median"`
	RatioIQR    [2]float64 `json:"ratio_iqr"`
	// CPURatio = ceiling_result.cpu_us_per_op / result.cpu_us_per_op: the
	// ratio a CPU-bound cluster would reach; steadier than Ratio on a shared
	// machine. null when CPU time is unknown.
	CPURatio *float64     `json:"cpu_ratio"`
	Crypto   *benchCrypto `json:"crypto"`
	// FirstUse is set for the first-use operation only.
	FirstUse *benchFirstUse `json:"first_use"`
	// Failover is set for the failover operation only (bench_failover.go).
	Failover *benchFailover `json:"failover"`
}

// benchFirstUse: the first Encrypt with a key version on the target node
// (cold cache: HSM unwrap) against the second (warm), one caller.
type benchFirstUse struct {
	Keys        int     `json:"keys"`
	CreatedVia  string  `json:"created_via"`
	ExtraP50MS  float64 `json:"extra_p50_ms"`
	ExtraMeanMS float64 `json:"extra_mean_ms"`
}

type benchCeiling struct {
	Kind             string `json:"kind"` // echo | raft-noop
	RequestBytes     int    `json:"request_bytes"`
	ResponseBytes    int    `json:"response_bytes"`
	CommandBytes     int    `json:"command_bytes"`      // raft-noop: the no-op command's size
	NoopPaddingBytes int    `json:"noop_padding_bytes"` // raft-noop: ApplyNoop size
	Error            string `json:"error"`
}

type benchStats struct {
	Requests       uint64            `json:"requests"`
	OK             uint64            `json:"ok"`
	Errors         uint64            `json:"errors"`
	ErrorCodes     map[string]uint64 `json:"error_codes"`
	FirstError     string            `json:"first_error"`
	ItemErrors     uint64            `json:"item_errors"`
	FirstItemError string            `json:"first_item_error"`
	Slices         int               `json:"slices"`
	Seconds        float64           `json:"seconds"`
	OpsPerSec      float64           `json:"ops_per_sec"`
	ItemsPerSec    float64           `json:"items_per_sec"`
	// Each slice's ops/s in run order: drift over the run (noise, or a cost
	// that grows with the state, like versions per key) shows here.
	SliceOpsPerSec []float64    `json:"slice_ops_per_sec"`
	LatencyMS      benchLatency `json:"latency_ms"`
	// CPU time of the bench process and the cluster's node processes
	// (report.cpu_scope) per successful request, and in cores (CPU seconds
	// per second of slice); null when the node processes are not on this
	// machine.
	CPUUSPerOp *float64 `json:"cpu_us_per_op"`
	CPUCores   *float64 `json:"cpu_cores"`
	// Machine-wide busy and steal time (all processes, /proc/stat) as a
	// fraction of all CPUs during the slices: how contended the machine was.
	MachineCPUBusy  *float64 `json:"machine_cpu_busy"`
	MachineCPUSteal *float64 `json:"machine_cpu_steal"`
}

type benchLatency struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p999"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

type benchCrypto struct {
	Operation string `json:"operation"`
	// Median over the rounds, one goroutine locked to its thread: thread CPU
	// time per op when cpu_time (Linux), else wall time; and wall time.
	USPerOp     float64   `json:"us_per_op"`
	WallUSPerOp float64   `json:"wall_us_per_op"`
	CPUTime     bool      `json:"cpu_time"`
	SamplesUS   []float64 `json:"samples_us"`
	// 1e6/op - 1e6/ceiling: wall time per request the cluster spends beyond
	// the ceiling at this concurrency.
	ExtraWallUSPerOp *float64 `json:"extra_wall_us_per_op"`
	// CPU per request beyond the ceiling's (result.cpu_us_per_op -
	// ceiling_result.cpu_us_per_op): what the operation adds to a bare call.
	ExtraCPUUSPerOp *float64 `json:"extra_cpu_us_per_op"`
	ExtraOverCrypto *float64 `json:"extra_over_crypto"`
}

func benchFmtMS(v float64) string {
	switch {
	case v == 0:
		return "-"
	case v < 1:
		return fmt.Sprintf("%.2fms", v)
	case v < 10:
		return fmt.Sprintf("%.1fms", v)
	default:
		return fmt.Sprintf("%.0fms", v)
	}
}

func benchFmtOptUS(p *float64) string {
	if p == nil {
		return "-"
	}
	return fmt.Sprintf("%.0f", *p)
}

func printBenchTable(w io.Writer, r *benchReport) error {
	s := r.Settings
	var targets []string
	for _, t := range r.Cluster.Targets {
		targets = append(targets, fmt.Sprintf("%s %s (%s)", t.NodeID, t.APIAddr, t.Role))
	}
	fmt.Fprintf(w, "cabinet bench %s: %d nodes; target %s = %s\n", r.RunID, len(r.Cluster.Nodes), s.Target, strings.Join(targets, ", "))
	fmt.Fprintf(w, "%d callers, %d connections, payload %d B, batch %d, %s; %gs per operation and %gs of its ceiling, interleaved in %gs slices; %d CPUs here\n\n",
		s.Concurrency, s.Connections, s.PayloadBytes, s.Batch, benchKeysPhrase(s.Keys), s.DurationSeconds, s.DurationSeconds, s.SliceSeconds, r.Machine.NumCPU)
	t := newTable(w)
	fmt.Fprintln(t, "OPERATION\tOPS/S\tP50\tP99\tP99.9\tERRORS\tCPU µs/OP\tCEILING\tCEIL OPS/S\tCEIL P50\tCEIL CPU µs/OP\tRATIO\t(SLICE IQR)\tCPU RATIO")
	for _, res := range r.Results {
		name := res.Op
		if res.ItemsPerRequest > 1 {
			name = fmt.Sprintf("%s x%d", res.Op, res.ItemsPerRequest)
		}
		if res.Error != "" {
			fmt.Fprintf(t, "%s\tFAILED\t\t\t\t%d\t\t\t\t\t\t\n", name, res.Result.Errors)
			continue
		}
		if res.Failover != nil { // follower Encrypts in the failover windows; no ceiling
			fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%d\t-\t(see below)\t\t\t\t\t\t\n", name,
				benchFmtRate(res.Result.OpsPerSec), benchFmtMS(res.Result.LatencyMS.P50), benchFmtMS(res.Result.LatencyMS.P99), benchFmtMS(res.Result.LatencyMS.P999), res.Result.Errors)
			continue
		}
		ceil := res.Ceiling.Kind
		switch {
		case res.Ceiling.Error != "":
			ceil += " (failed)"
		case res.Ceiling.Kind == ceilingEcho:
			ceil = fmt.Sprintf("echo %d/%d B", res.Ceiling.RequestBytes, res.Ceiling.ResponseBytes)
		case res.Ceiling.Kind == ceilingRaftNoop:
			ceil = fmt.Sprintf("raft-noop %d B", res.Ceiling.CommandBytes)
		case res.Ceiling.Kind == ceilingBareGRPC:
			ceil = fmt.Sprintf("bare-grpc %d/%d B", res.Ceiling.RequestBytes, res.Ceiling.ResponseBytes)
		}
		iqr, cpuRatio := "", "-"
		if len(res.SliceRatios) > 1 {
			iqr = fmt.Sprintf("(%.2f-%.2f)", res.RatioIQR[0], res.RatioIQR[1])
		}
		if res.CPURatio != nil {
			cpuRatio = benchFmtRatio(*res.CPURatio)
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", name,
			benchFmtRate(res.Result.OpsPerSec), benchFmtMS(res.Result.LatencyMS.P50), benchFmtMS(res.Result.LatencyMS.P99), benchFmtMS(res.Result.LatencyMS.P999),
			res.Result.Errors+res.Result.ItemErrors, benchFmtOptUS(res.Result.CPUUSPerOp),
			ceil, benchFmtRate(res.CeilingResult.OpsPerSec), benchFmtMS(res.CeilingResult.LatencyMS.P50), benchFmtOptUS(res.CeilingResult.CPUUSPerOp), benchFmtRatio(res.Ratio),
			iqr, cpuRatio)
	}
	if err := t.Flush(); err != nil {
		return err
	}
	var notes []string
	for _, res := range r.Results {
		switch {
		case res.Error != "":
			notes = append(notes, fmt.Sprintf("%s failed: %s", res.Op, res.Error))
			continue
		case res.Ceiling.Error != "":
			notes = append(notes, fmt.Sprintf("%s: ceiling not measured: %s", res.Op, res.Ceiling.Error))
		}
		if res.Interrupted {
			notes = append(notes, fmt.Sprintf("%s: interrupted after %.1fs of %gs", res.Op, res.Result.Seconds, s.DurationSeconds))
		}
		if res.ItemsPerRequest > 1 {
			notes = append(notes, fmt.Sprintf("%s: %s items/s (%d per request)", res.Op, benchFmtRate(res.Result.ItemsPerSec), res.ItemsPerRequest))
		}
		if s.Keys > 1 && res.Keys > 1 && res.Keys != s.Keys && benchSymmetricOps[res.Op] {
			notes = append(notes, fmt.Sprintf("%s: spread over %d of the %d keys (ciphertext budget)", res.Op, res.Keys, s.Keys))
		}
		if n := res.Result.Errors + res.Result.ItemErrors; n > 0 {
			msg := res.Result.FirstError
			if msg == "" {
				msg = res.Result.FirstItemError
			}
			notes = append(notes, fmt.Sprintf("%s: %d errors (%s); first: %s", res.Op, n, benchSortedCodes(res.Result.ErrorCodes), msg))
		}
		if fu := res.FirstUse; fu != nil {
			notes = append(notes, fmt.Sprintf("first-use: first Encrypt of a key version on the target (cold cache, HSM unwrap) p50 %s vs second %s: +%.2fms p50, +%.2fms mean (%d keys created via %s; one caller)",
				benchFmtMS(res.Result.LatencyMS.P50), benchFmtMS(res.CeilingResult.LatencyMS.P50), fu.ExtraP50MS, fu.ExtraMeanMS, fu.Keys, fu.CreatedVia))
		}
		if c := res.Crypto; c != nil {
			line := fmt.Sprintf("%s: cost over the ceiling %s µs CPU/op (%s µs wall/op); %s in-process here: %.1f µs/op",
				res.Op, benchFmtOptUS(c.ExtraCPUUSPerOp), benchFmtOptUS(c.ExtraWallUSPerOp), c.Operation, c.USPerOp)
			if c.ExtraOverCrypto != nil {
				line += fmt.Sprintf(" -> extra = %.2f x the signature", *c.ExtraOverCrypto)
			}
			notes = append(notes, line)
		}
	}
	if len(notes) > 0 {
		fmt.Fprintln(w)
		for _, n := range notes {
			fmt.Fprintln(w, "  "+n)
		}
	}
	for _, res := range r.Results {
		if res.Failover != nil {
			if err := printFailoverTable(w, res.Failover); err != nil {
				return err
			}
		}
	}
	fmt.Fprintln(w, "\nRATIO = ops/s of the operation / ops/s of its ceiling in the same run (echo: Cabinet's Echo with the same message sizes; raft-noop: a no-op Raft command of the same size; bare-grpc: a bare gRPC server in the bench process; warm-use: the second use of the key).")
	fmt.Fprintln(w, "SLICE IQR = 25th-75th percentile of the ratio over back-to-back slice pairs (noise).")
	fmt.Fprintf(w, "CPU µs/OP = CPU time per successful request of: %s; CPU RATIO = ceiling's CPU µs/op / operation's.\n", r.CPUScope)
	return nil
}

// benchSymmetricOps are the operations --keys spreads over N keys.
var benchSymmetricOps = map[string]bool{"encrypt": true, "decrypt": true, "generate-data-key": true, "re-encrypt": true,
	"mac": true, "batch-encrypt": true, "batch-decrypt": true}

func benchKeysPhrase(n int) string {
	if n <= 1 {
		return "1 key per symmetric operation"
	}
	return fmt.Sprintf("%d keys per symmetric operation (each request picks one)", n)
}
