package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/keyops"
	"github.com/cabinet-kms/cabinet/transport"
)

type fakeNode struct{ st cluster.Status }

func (f fakeNode) Status() cluster.Status { return f.st }

type fakeCache struct{ st keyops.CacheStats }

func (f fakeCache) CacheStats() keyops.CacheStats { return f.st }

type fakeKeys int

func (f fakeKeys) KeyCount() int { return int(f) }

// failingHSM fails every call; the decorator must count and pass errors on.
type failingHSM struct{ hsm.Provider }

var errHSMDown = errors.New("token gone")

func (failingHSM) Health(context.Context) error { return errHSMDown }
func (failingHSM) Open(context.Context, uint32, []byte, []byte) ([]byte, error) {
	return nil, errHSMDown
}

func testRegistry(t *testing.T) *prometheus.Registry {
	t.Helper()
	raftDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(raftDir, "raft.db"), make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(raftDir, "snapshots", "1-2-3"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(raftDir, "snapshots", "1-2-3", "state.bin"), make([]byte, 100), 0o600); err != nil {
		t.Fatal(err)
	}
	reg := newMetricsRegistry()
	reg.MustRegister(newNodeCollector(
		fakeNode{cluster.Status{State: "follower", Term: 7, CommitIndex: 42, AppliedIndex: 41, LastContact: 1500 * time.Millisecond, Voter: true}},
		fakeCache{keyops.CacheStats{Hits: 10, Misses: 2, Size: 2, Capacity: 100}}, fakeKeys(3), raftDir))
	transport.NewRPCMetrics(reg)
	h := newMeteredHSM(failingHSM{}, reg)
	_ = h.Health(context.Background())
	_, _ = h.Open(context.Background(), 1, nil, nil)
	return reg
}

func TestNodeAndHSMMetrics(t *testing.T) {
	reg := testRegistry(t)
	want := `
# HELP cabinet_raft_state 1 for this node's current Raft state, 0 for the others.
# TYPE cabinet_raft_state gauge
cabinet_raft_state{state="candidate"} 0
cabinet_raft_state{state="follower"} 1
cabinet_raft_state{state="leader"} 0
cabinet_raft_state{state="shutdown"} 0
# HELP cabinet_raft_last_contact_seconds Seconds since this follower heard from the leader (0 on the leader, -1 if never).
# TYPE cabinet_raft_last_contact_seconds gauge
cabinet_raft_last_contact_seconds 1.5
# HELP cabinet_raft_log_bytes Size of the Raft log store (raft.db) on disk.
# TYPE cabinet_raft_log_bytes gauge
cabinet_raft_log_bytes 4096
# HELP cabinet_raft_snapshot_bytes Size of the retained Raft snapshots on disk.
# TYPE cabinet_raft_snapshot_bytes gauge
cabinet_raft_snapshot_bytes 100
# HELP cabinet_unwrap_cache_hits_total Key uses served from the unwrap cache.
# TYPE cabinet_unwrap_cache_hits_total counter
cabinet_unwrap_cache_hits_total 10
# HELP cabinet_hsm_errors_total HSM calls that failed, by operation.
# TYPE cabinet_hsm_errors_total counter
cabinet_hsm_errors_total{op="health"} 1
cabinet_hsm_errors_total{op="open"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"cabinet_raft_state", "cabinet_raft_last_contact_seconds", "cabinet_raft_log_bytes", "cabinet_raft_snapshot_bytes",
		"cabinet_unwrap_cache_hits_total", "cabinet_hsm_errors_total"); err != nil {
		t.Fatal(err)
	}
	if n, err := testutil.GatherAndCount(reg, "cabinet_hsm_operations_total"); err != nil || n != 2 {
		t.Fatalf("hsm operations series: %d, %v", n, err)
	}
	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, "cabinet_") {
			t.Errorf("lint %s: %s", p.Metric, p.Text)
		}
	}
}

// TestMetricsAreDocumented: every cabinet_* family appears in docs/METRICS.md.
func TestMetricsAreDocumented(t *testing.T) {
	reg := testRegistry(t)
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile("../../docs/METRICS.md")
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, f := range fams {
		names[f.GetName()] = true
	}
	// Request metrics have no series until a request: name them explicitly.
	for _, n := range []string{"cabinet_grpc_requests_total", "cabinet_grpc_request_duration_seconds", "cabinet_grpc_requests_in_flight"} {
		names[n] = true
	}
	for n := range names {
		if strings.HasPrefix(n, "cabinet_") && !strings.Contains(string(doc), "`"+n+"`") {
			t.Errorf("docs/METRICS.md does not describe %s", n)
		}
	}
}
