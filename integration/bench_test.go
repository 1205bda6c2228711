package integration

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// benchReportView is the part of `cabinet bench -o json` (schema
// cabinet-bench/v1, docs/PERFORMANCE.md) the smoke test checks.
type benchReportView struct {
	Schema      string `json:"schema"`
	Interrupted bool   `json:"interrupted"`
	Settings    struct {
		Keys int `json:"keys"`
	} `json:"settings"`
	Cluster struct {
		Nodes []struct {
			NodeID string `json:"node_id"`
			Role   string `json:"role"`
		} `json:"nodes"`
		Targets []struct {
			NodeID string `json:"node_id"`
			Role   string `json:"role"`
		} `json:"targets"`
	} `json:"cluster"`
	Results []struct {
		Op              string  `json:"op"`
		Error           string  `json:"error"`
		Keys            int     `json:"keys"`
		ItemsPerRequest int     `json:"items_per_request"`
		RequestBytes    int     `json:"request_bytes"`
		Ratio           float64 `json:"ratio"`
		Ceiling         struct {
			Kind         string `json:"kind"`
			RequestBytes int    `json:"request_bytes"`
			CommandBytes int    `json:"command_bytes"`
			Error        string `json:"error"`
		} `json:"ceiling"`
		Result        benchStatsView `json:"result"`
		CeilingResult benchStatsView `json:"ceiling_result"`
		Crypto        *struct {
			Operation string  `json:"operation"`
			USPerOp   float64 `json:"us_per_op"`
		} `json:"crypto"`
	} `json:"results"`
}

type benchStatsView struct {
	OK        uint64  `json:"ok"`
	Errors    uint64  `json:"errors"`
	OpsPerSec float64 `json:"ops_per_sec"`
	LatencyMS struct {
		P50  float64 `json:"p50"`
		P99  float64 `json:"p99"`
		P999 float64 `json:"p999"`
	} `json:"latency_ms"`
}

// TestBenchSmoke: `cabinet bench` runs a short benchmark against a real
// three-process cluster and reports, for a crypto operation served by a
// follower (ceiling: Echo), a signature (plus the in-process crypto probe)
// and a write (ceiling: a no-op Raft command), ratios against ceilings
// measured in the same run. No timing thresholds: the machine is too noisy.
func TestBenchSmoke(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startThree(t)
	var addrs []string
	for _, nd := range c.nodes {
		addrs = append(addrs, nd.apiAddr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	out, errOut, err := c.cli(ctx, nil, "bench", "--addr", strings.Join(addrs, ","), "--target", "follower",
		"--ops", "encrypt,sign,create-key", "--duration", "2s", "--slice", "500ms", "--warmup", "300ms",
		"--concurrency", "8", "--connections", "2", "-o", "json", "-q")
	if err != nil {
		t.Fatalf("cabinet bench: %v\nstdout: %s\nstderr: %s", err, out, errOut)
	}
	t.Logf("cabinet bench took %v", time.Since(start).Round(time.Millisecond))
	var rep benchReportView
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("report is not JSON: %v\n%s", err, out)
	}
	if rep.Schema != "cabinet-bench/v1" || rep.Interrupted {
		t.Fatalf("schema %q, interrupted %v", rep.Schema, rep.Interrupted)
	}
	if len(rep.Cluster.Nodes) != 3 || len(rep.Cluster.Targets) != 1 || rep.Cluster.Targets[0].Role != "follower" {
		t.Fatalf("cluster/targets: %+v", rep.Cluster)
	}
	want := map[string]string{"encrypt": "echo", "sign": "echo", "create-key": "raft-noop"}
	if len(rep.Results) != len(want) {
		t.Fatalf("%d results, want %d: %s", len(rep.Results), len(want), out)
	}
	for _, r := range rep.Results {
		t.Logf("%-10s %8.0f/s p50 %.2fms p99 %.2fms | %s %8.0f/s | ratio %.2f | errors %d",
			r.Op, r.Result.OpsPerSec, r.Result.LatencyMS.P50, r.Result.LatencyMS.P99, r.Ceiling.Kind, r.CeilingResult.OpsPerSec, r.Ratio, r.Result.Errors)
		if r.Error != "" || r.Ceiling.Error != "" {
			t.Errorf("%s failed: %q (ceiling: %q)", r.Op, r.Error, r.Ceiling.Error)
			continue
		}
		if kind, ok := want[r.Op]; !ok || r.Ceiling.Kind != kind {
			t.Errorf("%s: ceiling %q, want %q", r.Op, r.Ceiling.Kind, want[r.Op])
		}
		if r.Result.OK == 0 || r.Result.OpsPerSec <= 0 || r.CeilingResult.OK == 0 || r.CeilingResult.OpsPerSec <= 0 {
			t.Errorf("%s: no successful requests measured: %+v / ceiling %+v", r.Op, r.Result, r.CeilingResult)
		}
		if r.Ratio <= 0 {
			t.Errorf("%s: ratio %v", r.Op, r.Ratio)
		}
		if r.Result.LatencyMS.P50 <= 0 || r.Result.LatencyMS.P99 < r.Result.LatencyMS.P50 || r.Result.LatencyMS.P999 < r.Result.LatencyMS.P99 {
			t.Errorf("%s: latency quantiles %+v", r.Op, r.Result.LatencyMS)
		}
		switch r.Op {
		case "encrypt":
			// The ceiling carries the operation's message sizes.
			if d := r.Ceiling.RequestBytes - r.RequestBytes; d > 0 || d < -4 {
				t.Errorf("encrypt: echo request %d B for an operation request of %d B", r.Ceiling.RequestBytes, r.RequestBytes)
			}
		case "sign":
			if r.Crypto == nil || r.Crypto.USPerOp <= 0 {
				t.Errorf("sign: no in-process crypto cost: %+v", r.Crypto)
			}
		case "create-key":
			if r.Ceiling.CommandBytes <= 0 {
				t.Errorf("create-key: no-op command size %d", r.Ceiling.CommandBytes)
			}
		}
	}
	t.Run("keys", func(t *testing.T) { benchKeysRun(t, c, addrs) })
}

// benchKeysRun: `cabinet bench --keys 20` spreads encrypt and decrypt over a
// working set of 20 keys (created in setup) and says so in the report.
func benchKeysRun(t *testing.T, c *testCluster, addrs []string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	out, errOut, err := c.cli(ctx, nil, "bench", "--addr", strings.Join(addrs, ","), "--target", "follower",
		"--ops", "encrypt,decrypt", "--keys", "20", "--duration", "1s", "--slice", "500ms", "--warmup", "200ms",
		"--concurrency", "8", "--connections", "2", "-o", "json", "-q")
	if err != nil {
		t.Fatalf("cabinet bench --keys 20: %v\nstdout: %s\nstderr: %s", err, out, errOut)
	}
	t.Logf("cabinet bench --keys 20 took %v", time.Since(start).Round(time.Millisecond))
	var rep benchReportView
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("report is not JSON: %v\n%s", err, out)
	}
	if rep.Settings.Keys != 20 || len(rep.Results) != 2 {
		t.Fatalf("settings.keys %d, %d results: %s", rep.Settings.Keys, len(rep.Results), out)
	}
	for _, r := range rep.Results {
		t.Logf("--keys 20 %-8s %8.0f/s | %s %8.0f/s | ratio %.2f | keys %d | errors %d",
			r.Op, r.Result.OpsPerSec, r.Ceiling.Kind, r.CeilingResult.OpsPerSec, r.Ratio, r.Keys, r.Result.Errors)
		if r.Error != "" || r.Ceiling.Error != "" {
			t.Errorf("%s failed: %q (ceiling: %q)", r.Op, r.Error, r.Ceiling.Error)
			continue
		}
		if r.Keys != 20 {
			t.Errorf("%s: keys %d, want 20", r.Op, r.Keys)
		}
		if r.Result.OK == 0 || r.CeilingResult.OK == 0 || r.Ratio <= 0 || r.Ceiling.Kind != "echo" {
			t.Errorf("%s: ratio %v, ceiling %q, ok %d / %d", r.Op, r.Ratio, r.Ceiling.Kind, r.Result.OK, r.CeilingResult.OK)
		}
	}
}
