package main

import (
	"context"
	"crypto/rsa"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/keyops"
)

// The node's Prometheus metrics. The registry is built per server run (no
// package-level state) and served on its own plain-HTTP listener
// (--metrics-addr, off unless set) so scraping never touches the mTLS API.
//
// Gossip membership metrics are absent: Cabinet has no gossip layer yet.

// newMetricsRegistry returns a registry with the Go runtime and process
// collectors and the build info.
func newMetricsRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	bi := buildInfo()
	info := prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "cabinet", Name: "build_info",
		Help:        "Always 1; the labels describe the running binary.",
		ConstLabels: prometheus.Labels{"version": bi.Version, "revision": bi.Revision, "goversion": bi.GoVersion},
	})
	info.Set(1)
	reg.MustRegister(info)
	return reg
}

// nodeStatusSource is what the node collector reads (cluster.Node).
type nodeStatusSource interface{ Status() cluster.Status }

// cacheStatsSource is what the node collector reads (keyops.Engine).
type cacheStatsSource interface{ CacheStats() keyops.CacheStats }

// keyCountSource is what the node collector reads (fsm.FSM).
type keyCountSource interface{ KeyCount() int }

// nodeCollector reads Raft, unwrap-cache and storage figures at scrape
// time, so nothing has to push them.
type nodeCollector struct {
	node    nodeStatusSource
	cache   cacheStatsSource
	keys    keyCountSource
	raftDir string

	raftState, term, commit, applied, lastLog, firstLog, snapIndex, lastContact, voter *prometheus.Desc
	logBytes, snapBytes                                                                *prometheus.Desc
	cacheHits, cacheMisses, cacheUnwraps, cacheEvictions, cacheSize, cacheCapacity     *prometheus.Desc
	keyCount                                                                           *prometheus.Desc
}

func newNodeCollector(node nodeStatusSource, cache cacheStatsSource, keys keyCountSource, raftDir string) *nodeCollector {
	d := func(sub, name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName("cabinet", sub, name), help, labels, nil)
	}
	return &nodeCollector{
		node: node, cache: cache, keys: keys, raftDir: raftDir,
		raftState:      d("raft", "state", "1 for this node's current Raft state, 0 for the others.", "state"),
		term:           d("raft", "term", "Current Raft term."),
		commit:         d("raft", "commit_index", "Highest log index known committed."),
		applied:        d("raft", "applied_index", "Highest log index applied to the state machine."),
		lastLog:        d("raft", "last_log_index", "Last index in this node's log."),
		firstLog:       d("raft", "first_log_index", "First index still in this node's log (0 when empty)."),
		snapIndex:      d("raft", "last_snapshot_index", "Index covered by the latest snapshot (0 if none)."),
		lastContact:    d("raft", "last_contact_seconds", "Seconds since this follower heard from the leader (0 on the leader, -1 if never)."),
		voter:          d("raft", "voter", "1 if this node is a voter in the Raft configuration."),
		logBytes:       d("raft", "log_bytes", "Size of the Raft log store (raft.db) on disk."),
		snapBytes:      d("raft", "snapshot_bytes", "Size of the retained Raft snapshots on disk."),
		cacheHits:      d("unwrap_cache", "hits_total", "Key uses served from the unwrap cache."),
		cacheMisses:    d("unwrap_cache", "misses_total", "Key uses that found no cached material."),
		cacheUnwraps:   d("unwrap_cache", "unwraps_total", "Material unwrapped through the HSM."),
		cacheEvictions: d("unwrap_cache", "evictions_total", "Entries evicted to respect the bound."),
		cacheSize:      d("unwrap_cache", "size", "Key versions cached now."),
		cacheCapacity:  d("unwrap_cache", "capacity", "Key versions the cache holds at most."),
		keyCount:       d("", "keys", "Keys in the replicated state on this node."),
	}
}

func (c *nodeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.raftState, c.term, c.commit, c.applied, c.lastLog, c.firstLog, c.snapIndex,
		c.lastContact, c.voter, c.logBytes, c.snapBytes, c.cacheHits, c.cacheMisses, c.cacheUnwraps, c.cacheEvictions,
		c.cacheSize, c.cacheCapacity, c.keyCount} {
		ch <- d
	}
}

func (c *nodeCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v))
	}
	st := c.node.Status()
	for _, s := range []string{"leader", "follower", "candidate", "shutdown"} {
		v := 0.0
		if st.State == s {
			v = 1
		}
		gauge(c.raftState, v, s)
	}
	gauge(c.term, float64(st.Term))
	gauge(c.commit, float64(st.CommitIndex))
	gauge(c.applied, float64(st.AppliedIndex))
	gauge(c.lastLog, float64(st.LastLogIndex))
	gauge(c.firstLog, float64(st.FirstLogIndex))
	gauge(c.snapIndex, float64(st.LastSnapshotIndex))
	lc := st.LastContact.Seconds()
	if st.LastContact < 0 {
		lc = -1
	}
	gauge(c.lastContact, lc)
	gauge(c.voter, boolFloat(st.Voter))
	gauge(c.logBytes, float64(fileSize(filepath.Join(c.raftDir, "raft.db"))))
	gauge(c.snapBytes, float64(treeSize(filepath.Join(c.raftDir, "snapshots"))))

	cs := c.cache.CacheStats()
	counter(c.cacheHits, cs.Hits)
	counter(c.cacheMisses, cs.Misses)
	counter(c.cacheUnwraps, cs.Unwraps)
	counter(c.cacheEvictions, cs.Evictions)
	gauge(c.cacheSize, float64(cs.Size))
	gauge(c.cacheCapacity, float64(cs.Capacity))
	gauge(c.keyCount, float64(c.keys.KeyCount()))
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// treeSize sums the regular files under dir (0 if it does not exist).
func treeSize(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// hsmMetrics counts and times every call into the HSM.
type hsmMetrics struct {
	ops     *prometheus.CounterVec
	errs    *prometheus.CounterVec
	latency *prometheus.HistogramVec
}

func newHSMMetrics(reg prometheus.Registerer) *hsmMetrics {
	m := &hsmMetrics{
		ops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "cabinet", Subsystem: "hsm", Name: "operations_total",
			Help: "Calls into the HSM, by operation.",
		}, []string{"op"}),
		errs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "cabinet", Subsystem: "hsm", Name: "errors_total",
			Help: "HSM calls that failed, by operation.",
		}, []string{"op"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "cabinet", Subsystem: "hsm", Name: "operation_duration_seconds",
			Help:    "HSM call latency, by operation.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
		}, []string{"op"}),
	}
	reg.MustRegister(m.ops, m.errs, m.latency)
	return m
}

func (m *hsmMetrics) observe(op string, start time.Time, err error) {
	m.ops.WithLabelValues(op).Inc()
	m.latency.WithLabelValues(op).Observe(time.Since(start).Seconds())
	if err != nil {
		m.errs.WithLabelValues(op).Inc()
	}
}

// meteredHSM decorates an hsm.Provider with hsmMetrics; it changes nothing
// else.
type meteredHSM struct {
	p hsm.Provider
	m *hsmMetrics
}

var _ hsm.Provider = (*meteredHSM)(nil)

func newMeteredHSM(p hsm.Provider, reg prometheus.Registerer) *meteredHSM {
	return &meteredHSM{p: p, m: newHSMMetrics(reg)}
}

func (h *meteredHSM) EnsureIdentity(ctx context.Context) (_ *rsa.PublicKey, err error) {
	defer func(t time.Time) { h.m.observe("ensure_identity", t, err) }(time.Now())
	return h.p.EnsureIdentity(ctx)
}

func (h *meteredHSM) GenerateKEK(ctx context.Context, version uint32) (_ []byte, err error) {
	defer func(t time.Time) { h.m.observe("generate_kek", t, err) }(time.Now())
	return h.p.GenerateKEK(ctx, version)
}

func (h *meteredHSM) KEKCheckValue(ctx context.Context, version uint32) (_ []byte, err error) {
	defer func(t time.Time) { h.m.observe("kek_check_value", t, err) }(time.Now())
	return h.p.KEKCheckValue(ctx, version)
}

func (h *meteredHSM) WrapKEK(ctx context.Context, version uint32, recipient *rsa.PublicKey) (_ []byte, err error) {
	defer func(t time.Time) { h.m.observe("wrap_kek", t, err) }(time.Now())
	return h.p.WrapKEK(ctx, version, recipient)
}

func (h *meteredHSM) UnwrapKEK(ctx context.Context, version uint32, wrapped []byte) (_ []byte, err error) {
	defer func(t time.Time) { h.m.observe("unwrap_kek", t, err) }(time.Now())
	return h.p.UnwrapKEK(ctx, version, wrapped)
}

func (h *meteredHSM) DestroyKEK(ctx context.Context, version uint32) (err error) {
	defer func(t time.Time) { h.m.observe("destroy_kek", t, err) }(time.Now())
	return h.p.DestroyKEK(ctx, version)
}

func (h *meteredHSM) Seal(ctx context.Context, kekVersion uint32, plaintext, aad []byte) (_ []byte, err error) {
	defer func(t time.Time) { h.m.observe("seal", t, err) }(time.Now())
	return h.p.Seal(ctx, kekVersion, plaintext, aad)
}

func (h *meteredHSM) Open(ctx context.Context, kekVersion uint32, sealed, aad []byte) (_ []byte, err error) {
	defer func(t time.Time) { h.m.observe("open", t, err) }(time.Now())
	return h.p.Open(ctx, kekVersion, sealed, aad)
}

func (h *meteredHSM) GenerateRandom(ctx context.Context, n int) (_ []byte, err error) {
	defer func(t time.Time) { h.m.observe("generate_random", t, err) }(time.Now())
	return h.p.GenerateRandom(ctx, n)
}

func (h *meteredHSM) Health(ctx context.Context) (err error) {
	defer func(t time.Time) { h.m.observe("health", t, err) }(time.Now())
	return h.p.Health(ctx)
}

func (h *meteredHSM) Close() error { return h.p.Close() }

// serveMetrics serves reg on addr (GET /metrics) until ctx ends. It returns
// once the listener is bound, so a bad address fails the start.
func serveMetrics(ctx context.Context, addr string, reg *prometheus.Registry, log *slog.Logger) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen for metrics on %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics listener stopped", "err", err)
		}
	}()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	log.Info("serving Prometheus metrics", "addr", ln.Addr().String(), "path", "/metrics")
	return nil
}
