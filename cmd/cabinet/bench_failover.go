package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// failover (--local only, never part of "all"): issue 7's "crypto
// operations on followers continue through a leader failover with no
// failed requests; writes resume within 2 x HeartbeatTimeout". Each round:
// find the leader and the two followers; --concurrency callers Encrypt on
// the followers (closed loop, a fixed per-call timeout) while one writer
// proposes an ApplyNoop through a follower every 20ms; after a warm-up the
// leader's process gets SIGKILL; the run goes on until a write started
// after the kill is acknowledged and failoverAfter more has passed (or
// failoverGiveUp); the killed node is restarted on its data dir and waited
// for. The figures are taken from the list of completed calls afterwards
// (analyzeFailover), in the window from the kill to writes-resumed +
// failoverAfter.

const (
	failoverCallTimeout  = 2 * time.Second
	failoverWriteEvery   = 20 * time.Millisecond
	failoverWriteTimeout = time.Second
	failoverWarmup       = 2 * time.Second
	failoverAfter        = 3 * time.Second
	failoverGiveUp       = 30 * time.Second
	failoverBucket       = 100 * time.Millisecond
	failoverSettle       = 60 * time.Second // a leader and healthy followers before a round
	failoverMaxRounds    = 20
	// failoverMaxEvents bounds each caller's recorded calls per round (and
	// so its loop, by count).
	failoverMaxEvents = 1 << 20
)

// ---- report ----

type benchFailover struct {
	RoundsRequested int `json:"rounds_requested"`
	// The local servers' Raft timeouts and --max-staleness, and where each
	// value came from: "default", "--local-server-arg" or "env".
	HeartbeatTimeoutSeconds float64 `json:"heartbeat_timeout_seconds"`
	HeartbeatTimeoutSource  string  `json:"heartbeat_timeout_source"`
	ElectionTimeoutSeconds  float64 `json:"election_timeout_seconds"`
	MaxStalenessSeconds     float64 `json:"max_staleness_seconds"`
	Consistency             string  `json:"consistency"`
	Callers                 int     `json:"callers"`
	CallTimeoutSeconds      float64 `json:"call_timeout_seconds"`
	WriteIntervalMS         float64 `json:"write_interval_ms"`
	WriteTimeoutSeconds     float64 `json:"write_timeout_seconds"`
	WarmupSeconds           float64 `json:"warmup_seconds"`
	AfterSeconds            float64 `json:"after_seconds"`
	GiveUpSeconds           float64 `json:"give_up_seconds"`
	BucketMS                float64 `json:"bucket_ms"`
	// Over the rounds that ran.
	CryptoOK         uint64            `json:"crypto_ok"`
	CryptoFailed     uint64            `json:"crypto_failed"`
	CryptoErrorCodes map[string]uint64 `json:"crypto_error_codes"`
	LongestGapMS     float64           `json:"longest_gap_ms"`
	RoundsResumed    int               `json:"rounds_writes_resumed"`
	// Kill -> first acknowledged write over the rounds where writes resumed;
	// null when none did.
	WriteUnavailableMinMS        *float64 `json:"write_unavailable_min_ms"`
	WriteUnavailableMaxMS        *float64 `json:"write_unavailable_max_ms"`
	MaxWriteUnavailableHeartbeat *float64 `json:"max_write_unavailable_over_heartbeat"`
	// The leader before the first kill gets leadership back at the end, so
	// later operations' --target means what it meant; "" if that failed.
	RestoredLeader string               `json:"restored_leader"`
	RestoreError   string               `json:"restore_error"`
	Rounds         []benchFailoverRound `json:"rounds"`
}

type benchFailoverRound struct {
	Round      int       `json:"round"`
	Error      string    `json:"error"`
	KilledNode string    `json:"killed_node"`
	KilledPID  int       `json:"killed_pid"`
	Followers  []string  `json:"followers"`
	NewLeader  string    `json:"new_leader"`
	KilledAt   time.Time `json:"killed_at"`
	// WritesResumed: a write started after the kill was acknowledged within
	// give_up_seconds. WriteUnavailableMS: kill -> that acknowledgement.
	WritesResumed              bool     `json:"writes_resumed"`
	WriteUnavailableMS         *float64 `json:"write_unavailable_ms"`
	WriteUnavailableOverHeartb *float64 `json:"write_unavailable_over_heartbeat"`
	// WindowSeconds: kill -> writes resumed + after_seconds (or give-up).
	WindowSeconds  float64               `json:"window_seconds"`
	Crypto         benchFailoverCrypto   `json:"crypto"`
	CryptoBefore   benchFailoverCount    `json:"crypto_before_kill"`
	Writes         benchFailoverCount    `json:"writes"`
	Buckets        []benchFailoverBucket `json:"buckets"`
	RestartSeconds float64               `json:"restart_seconds"`
	hist           *latencyHist          // successes in the window
}

// benchFailoverCrypto: follower Encrypts that completed in the window.
type benchFailoverCrypto struct {
	OK         uint64            `json:"ok"`
	Failed     uint64            `json:"failed"`
	ErrorCodes map[string]uint64 `json:"error_codes"`
	FirstError string            `json:"first_error"`
	// Longest time without a successful response, from the last success
	// before the kill (or the kill) to the window's end: over both
	// followers, and per follower.
	LongestGapMS           float64            `json:"longest_gap_ms"`
	LongestGapMSByFollower map[string]float64 `json:"longest_gap_ms_by_follower"`
}

type benchFailoverCount struct {
	Attempts   uint64            `json:"attempts"`
	OK         uint64            `json:"ok"`
	Failed     uint64            `json:"failed"`
	ErrorCodes map[string]uint64 `json:"error_codes"`
}

// benchFailoverBucket: calls completed in [t_ms, t_ms+bucket_ms) relative to
// the kill (negative: before it).
type benchFailoverBucket struct {
	TMS      int64  `json:"t_ms"`
	OK       uint64 `json:"ok"`
	Failed   uint64 `json:"failed"`
	WritesOK uint64 `json:"writes_ok"`
}

// ---- accounting (pure: unit-tested) ----

// foEvent is one completed call; times are offsets from the round's start.
type foEvent struct {
	start, end time.Duration
	node       int // follower index for crypto calls
	ok         bool
	code, msg  string
}

type foParams struct {
	after, giveUp, bucket, heartbeat time.Duration
}

func defaultFoParams(heartbeat time.Duration) foParams {
	return foParams{after: failoverAfter, giveUp: failoverGiveUp, bucket: failoverBucket, heartbeat: heartbeat}
}

// foResumed returns the end of the first successful write that started at
// or after the kill (a write started before may have been acknowledged by
// the old leader).
func foResumed(writes []foEvent, kill time.Duration) (time.Duration, bool) {
	var best time.Duration
	found := false
	for _, w := range writes {
		if w.ok && w.start >= kill && (!found || w.end < best) {
			best, found = w.end, true
		}
	}
	return best, found
}

// newFailoverRound has every list and map of the JSON schema non-null.
func newFailoverRound(followers []string) benchFailoverRound {
	return benchFailoverRound{
		Followers:    append([]string{}, followers...),
		Crypto:       benchFailoverCrypto{ErrorCodes: map[string]uint64{}, LongestGapMSByFollower: map[string]float64{}},
		CryptoBefore: benchFailoverCount{ErrorCodes: map[string]uint64{}},
		Writes:       benchFailoverCount{ErrorCodes: map[string]uint64{}},
		Buckets:      []benchFailoverBucket{},
		hist:         &latencyHist{},
	}
}

// analyzeFailover computes a round's figures from its completed calls.
func analyzeFailover(kill time.Duration, crypto, writes []foEvent, followers []string, p foParams) benchFailoverRound {
	r := newFailoverRound(followers)
	end := kill + p.giveUp
	if w, ok := foResumed(writes, kill); ok {
		r.WritesResumed = true
		un := w - kill
		ms := float64(un) / 1e6
		r.WriteUnavailableMS = &ms
		if p.heartbeat > 0 {
			x := float64(un) / float64(p.heartbeat)
			r.WriteUnavailableOverHeartb = &x
		}
		end = w + p.after
	}
	r.WindowSeconds = (end - kill).Seconds()
	in := func(e foEvent) bool { return e.end >= kill && e.end <= end }

	// Buckets from the first completion (warm-up) to the window's end.
	first := kill
	for _, e := range crypto {
		first = min(first, e.end)
	}
	bstart := kill - ((kill-first+p.bucket-1)/p.bucket)*p.bucket
	nb := int((end-bstart)/p.bucket) + 1
	for i := 0; i < nb; i++ {
		r.Buckets = append(r.Buckets, benchFailoverBucket{TMS: int64((bstart - kill + time.Duration(i)*p.bucket) / time.Millisecond)})
	}
	bucketOf := func(t time.Duration) *benchFailoverBucket {
		if t < bstart || t > end {
			return nil
		}
		return &r.Buckets[min(nb-1, int((t-bstart)/p.bucket))]
	}

	// Successes per follower, for the gaps.
	succ := make([][]time.Duration, len(followers))
	var lastBefore = make([]time.Duration, len(followers))
	var hadBefore = make([]bool, len(followers))
	for _, e := range crypto {
		if b := bucketOf(e.end); b != nil {
			if e.ok {
				b.OK++
			} else {
				b.Failed++
			}
		}
		switch {
		case e.end < kill:
			r.CryptoBefore.Attempts++
			if e.ok {
				r.CryptoBefore.OK++
				if e.node >= 0 && e.node < len(followers) && (!hadBefore[e.node] || e.end > lastBefore[e.node]) {
					lastBefore[e.node], hadBefore[e.node] = e.end, true
				}
			} else {
				r.CryptoBefore.Failed++
				r.CryptoBefore.ErrorCodes[e.code]++
			}
		case in(e):
			if e.ok {
				r.Crypto.OK++
				r.hist.record(e.end - e.start)
				if e.node >= 0 && e.node < len(followers) {
					succ[e.node] = append(succ[e.node], e.end)
				}
			} else {
				r.Crypto.Failed++
				r.Crypto.ErrorCodes[e.code]++
				if r.Crypto.FirstError == "" {
					r.Crypto.FirstError = e.msg
				}
			}
		}
	}
	for _, w := range writes {
		if w.ok {
			if b := bucketOf(w.end); b != nil {
				b.WritesOK++
			}
		}
		if !in(w) {
			continue
		}
		r.Writes.Attempts++
		if w.ok {
			r.Writes.OK++
		} else {
			r.Writes.Failed++
			r.Writes.ErrorCodes[w.code]++
		}
	}

	// Longest gaps: from the last success before the kill (or the kill) over
	// the successes in the window to its end.
	gap := func(from time.Duration, ts []time.Duration) time.Duration {
		sort.Slice(ts, func(i, j int) bool { return ts[i] < ts[j] })
		longest, prev := time.Duration(0), from
		for _, t := range ts {
			longest = max(longest, t-prev)
			prev = t
		}
		return max(longest, end-prev)
	}
	var all []time.Duration
	allFrom := kill
	anyBefore := false
	for i, name := range followers {
		from := kill
		if hadBefore[i] {
			from = lastBefore[i]
			if !anyBefore || from > allFrom {
				allFrom, anyBefore = from, true
			}
		}
		r.Crypto.LongestGapMSByFollower[name] = float64(gap(from, append([]time.Duration(nil), succ[i]...))) / 1e6
		all = append(all, succ[i]...)
	}
	r.Crypto.LongestGapMS = float64(gap(allFrom, all)) / 1e6
	return r
}

// summarizeFailover fills the totals over the rounds.
func summarizeFailover(fo *benchFailover) {
	fo.CryptoOK, fo.CryptoFailed, fo.RoundsResumed, fo.LongestGapMS = 0, 0, 0, 0
	fo.CryptoErrorCodes = map[string]uint64{}
	fo.WriteUnavailableMinMS, fo.WriteUnavailableMaxMS, fo.MaxWriteUnavailableHeartbeat = nil, nil, nil
	for _, r := range fo.Rounds {
		if r.KilledAt.IsZero() {
			continue // never killed anything
		}
		fo.CryptoOK += r.Crypto.OK
		fo.CryptoFailed += r.Crypto.Failed
		for k, v := range r.Crypto.ErrorCodes {
			fo.CryptoErrorCodes[k] += v
		}
		fo.LongestGapMS = max(fo.LongestGapMS, r.Crypto.LongestGapMS)
		if !r.WritesResumed {
			continue
		}
		fo.RoundsResumed++
		u := *r.WriteUnavailableMS
		if fo.WriteUnavailableMinMS == nil || u < *fo.WriteUnavailableMinMS {
			fo.WriteUnavailableMinMS = &u
		}
		if fo.WriteUnavailableMaxMS == nil || u > *fo.WriteUnavailableMaxMS {
			v := u
			fo.WriteUnavailableMaxMS = &v
		}
		if h := r.WriteUnavailableOverHeartb; h != nil && (fo.MaxWriteUnavailableHeartbeat == nil || *h > *fo.MaxWriteUnavailableHeartbeat) {
			v := *h
			fo.MaxWriteUnavailableHeartbeat = &v
		}
	}
}

// localServerDuration is the value a local server runs with for a duration
// flag: the last --local-server-arg giving it, else CABINET_<FLAG> in this
// process's environment (the servers inherit it), else def.
func localServerDuration(args []string, flag string, def time.Duration) (time.Duration, string, error) {
	var val string
	src := "default"
	for i := 0; i < len(args); i++ {
		a := strings.TrimLeft(args[i], "-")
		if len(a) == len(args[i]) || len(args[i])-len(a) > 2 {
			continue
		}
		switch {
		case a == flag && i+1 < len(args):
			val, src = args[i+1], "--local-server-arg"
			i++
		case strings.HasPrefix(a, flag+"="):
			val, src = strings.TrimPrefix(a, flag+"="), "--local-server-arg"
		}
	}
	if src == "default" {
		if v, ok := os.LookupEnv(configEnvName(flag)); ok && v != "" {
			val, src = v, "env"
		}
	}
	if src == "default" {
		return def, src, nil
	}
	d, err := time.ParseDuration(val)
	if err != nil || d <= 0 {
		return 0, src, fmt.Errorf("--%s %q (%s): not a positive duration", flag, val, src)
	}
	return d, src, nil
}

// ---- the run ----

func runFailover(ctx context.Context, env *benchEnv, prog *benchProgress) benchResult {
	f := env.f
	res := newBenchResult("failover", "none")
	lc := env.local
	if lc == nil {
		res.Error = "failover needs --local (it kills and restarts a node it started)"
		return res
	}
	hb, hbSrc, err := localServerDuration(f.localServerArgs, "raft-heartbeat-timeout", time.Second)
	if err != nil {
		res.Error = "setup: " + err.Error()
		return res
	}
	el, _, _ := localServerDuration(f.localServerArgs, "raft-election-timeout", time.Second)
	ms, _, _ := localServerDuration(f.localServerArgs, "max-staleness", cluster.DefaultMaxStaleness)
	fo := &benchFailover{
		RoundsRequested: f.failoverRounds, HeartbeatTimeoutSeconds: hb.Seconds(), HeartbeatTimeoutSource: hbSrc,
		ElectionTimeoutSeconds: el.Seconds(), MaxStalenessSeconds: ms.Seconds(), Consistency: env.consistency().String(),
		Callers: f.concurrency, CallTimeoutSeconds: failoverCallTimeout.Seconds(), WriteIntervalMS: float64(failoverWriteEvery) / 1e6,
		WriteTimeoutSeconds: failoverWriteTimeout.Seconds(), WarmupSeconds: failoverWarmup.Seconds(), AfterSeconds: failoverAfter.Seconds(),
		GiveUpSeconds: failoverGiveUp.Seconds(), BucketMS: float64(failoverBucket) / 1e6,
		CryptoErrorCodes: map[string]uint64{}, Rounds: []benchFailoverRound{},
	}
	res.Failover = fo
	prog.status(func() string { return "preparing" })
	key, err := env.aesKey(ctx)
	if err != nil {
		res.Error = "setup: " + err.Error()
		return res
	}
	pt := benchRandom(f.payload)
	req := &cabinetpb.EncryptRequest{KeyId: key, Plaintext: pt, Consistency: env.consistency()}
	res.RequestBytes = proto.Size(req)

	var hist latencyHist
	var origLeader string
	for round := 1; round <= f.failoverRounds && ctx.Err() == nil; round++ {
		r, leaderID := failoverRound(ctx, env, lc, round, req, hb, prog)
		if origLeader == "" {
			origLeader = leaderID
		}
		if r.hist != nil {
			hist.merge(r.hist)
		}
		fo.Rounds = append(fo.Rounds, r)
		summarizeFailover(fo)
		prog.logf("%s", failoverRoundLine(&r, fo))
		if r.Error != "" {
			break // the cluster may be short of a node: no more kills
		}
	}
	res.Interrupted = ctx.Err() != nil
	if origLeader != "" && ctx.Err() == nil {
		prog.status(func() string { return "giving leadership back to " + origLeader })
		if err := failoverRestoreLeader(ctx, env, lc, origLeader); err != nil {
			fo.RestoreError = err.Error()
			prog.logf("failover: could not give leadership back to %s (later operations' --target may now mean another node): %v", origLeader, err)
		} else {
			fo.RestoredLeader = origLeader
		}
	}
	summarizeFailover(fo)

	// result: the follower Encrypts in the windows.
	s := &res.Result
	s.Slices = 0
	for _, r := range fo.Rounds {
		if r.KilledAt.IsZero() {
			continue
		}
		s.Slices++
		s.Seconds += r.WindowSeconds
		s.SliceOpsPerSec = append(s.SliceOpsPerSec, float64(r.Crypto.OK)/max(r.WindowSeconds, 1e-9))
		if s.FirstError == "" {
			s.FirstError = r.Crypto.FirstError
		}
	}
	s.OK, s.Errors = fo.CryptoOK, fo.CryptoFailed
	s.Requests = s.OK + s.Errors
	for k, v := range fo.CryptoErrorCodes {
		s.ErrorCodes[k] = v
	}
	if s.Seconds > 0 {
		s.OpsPerSec = float64(s.OK) / s.Seconds
		s.ItemsPerSec = s.OpsPerSec
	}
	msf := func(d time.Duration) float64 { return float64(d) / 1e6 }
	s.LatencyMS = benchLatency{P50: msf(hist.quantile(0.5)), P90: msf(hist.quantile(0.9)), P99: msf(hist.quantile(0.99)),
		P999: msf(hist.quantile(0.999)), Max: msf(hist.max), Mean: msf(hist.mean())}
	if res.Error == "" && len(fo.Rounds) > 0 && fo.Rounds[0].KilledAt.IsZero() {
		res.Error = fo.Rounds[0].Error
	}
	return res
}

// failoverNodes polls until one node leads and every other is a healthy
// follower; it returns them as local nodes.
func failoverNodes(ctx context.Context, env *benchEnv, lc *localCluster) (leader *localNode, followers []*localNode, err error) {
	byID := map[string]*localNode{}
	for _, n := range lc.nodes {
		byID[n.id] = n
	}
	err = benchPoll(ctx, failoverSettle, func() error {
		leader, followers = nil, nil
		for _, n := range lc.nodes {
			st, err := failoverStatus(ctx, env, n)
			if err != nil {
				return fmt.Errorf("status of %s: %w", n.id, err)
			}
			if byID[st.GetNodeId()] != n {
				return fmt.Errorf("%s answers as %q", n.id, st.GetNodeId())
			}
			switch {
			case st.GetRaftState() == "leader":
				if leader != nil {
					return errors.New("two nodes report leader")
				}
				leader = n
			case st.GetRaftState() == "follower" && st.GetHealthy():
				followers = append(followers, n)
			default:
				return fmt.Errorf("%s is %s (healthy %v)", n.id, st.GetRaftState(), st.GetHealthy())
			}
		}
		if leader == nil || len(followers) != len(lc.nodes)-1 {
			return errors.New("no leader yet")
		}
		return nil
	})
	return leader, followers, err
}

func failoverStatus(ctx context.Context, env *benchEnv, n *localNode) (*cabinetpb.StatusResponse, error) {
	conn, err := benchDial(n.apiAddr, env.tlsCfg)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	c, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	st, err := cabinetpb.NewOperatorServiceClient(conn).Status(c, &cabinetpb.StatusRequest{})
	if err != nil {
		return nil, rpcError(err)
	}
	return st, nil
}

// failoverRound runs one kill and restart; it returns the round's figures
// and the id of the leader it killed ("" if it found none).
func failoverRound(ctx context.Context, env *benchEnv, lc *localCluster, round int, req *cabinetpb.EncryptRequest, hb time.Duration, prog *benchProgress) (benchFailoverRound, string) {
	f := env.f
	fail := func(format string, args ...any) benchFailoverRound {
		r := newFailoverRound(nil)
		r.Round, r.Error, r.hist = round, fmt.Sprintf(format, args...), nil
		return r
	}
	prog.status(func() string { return fmt.Sprintf("round %d: waiting for a leader and healthy followers", round) })
	leader, followers, err := failoverNodes(ctx, env, lc)
	if err != nil {
		return fail("before the kill: %v", err), ""
	}
	names := []string{followers[0].id, followers[1].id}

	// Connections: --connections split over the two followers.
	per := max(1, f.connections/len(followers))
	conns := make([][]*grpc.ClientConn, len(followers))
	kcs := make([][]cabinetpb.KeyServiceClient, len(followers))
	ocs := make([]cabinetpb.OperatorServiceClient, len(followers))
	defer func() {
		for _, cs := range conns {
			for _, c := range cs {
				c.Close()
			}
		}
	}()
	for i, n := range followers {
		for j := 0; j < per; j++ {
			c, err := benchDial(n.apiAddr, env.tlsCfg)
			if err != nil {
				return fail("connect to %s: %v", n.id, err), leader.id
			}
			conns[i] = append(conns[i], c)
			kcs[i] = append(kcs[i], cabinetpb.NewKeyServiceClient(c))
		}
		ocs[i] = cabinetpb.NewOperatorServiceClient(conns[i][0])
		// The key must be usable on the follower first (cache, staleness).
		err := benchPoll(ctx, 10*time.Second, func() error {
			c, cancel := context.WithTimeout(ctx, failoverCallTimeout)
			defer cancel()
			_, err := kcs[i][0].Encrypt(c, req)
			return err
		})
		if err != nil {
			return fail("%s does not serve Encrypt before the kill: %v", n.id, rpcError(err)), leader.id
		}
	}

	t0 := time.Now()
	var stop atomic.Bool
	var killAt, resumedAt atomic.Int64
	killAt.Store(-1)
	resumedAt.Store(-1)
	var liveOK, liveErr atomic.Uint64
	events := make([][]foEvent, f.concurrency)
	var writes []foEvent
	var wg sync.WaitGroup
	for i := 0; i < f.concurrency; i++ {
		fi := i % len(followers)
		kc := kcs[fi][(i/len(followers))%per]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < failoverMaxEvents && !stop.Load(); n++ {
				s := time.Since(t0)
				c, cancel := context.WithTimeout(ctx, failoverCallTimeout)
				_, err := kc.Encrypt(c, req)
				cancel()
				if ctx.Err() != nil {
					return
				}
				e := foEvent{start: s, end: time.Since(t0), node: fi, ok: err == nil}
				if err != nil {
					e.code, e.msg = benchErrCode(err), benchErrText(err)
					liveErr.Add(1)
					events[i] = append(events[i], e)
					time.Sleep(time.Millisecond) // a failing call can return at once: do not spin
					continue
				}
				liveOK.Add(1)
				events[i] = append(events[i], e)
			}
		}()
	}
	wg.Add(1)
	go func() { // the writer
		defer wg.Done()
		tick := time.NewTicker(failoverWriteEvery)
		defer tick.Stop()
		limit := int((failoverWarmup+failoverGiveUp+failoverAfter)/failoverWriteEvery) + 100
		for n := 0; n < limit && !stop.Load(); n++ {
			s := time.Since(t0)
			c, cancel := context.WithTimeout(ctx, failoverWriteTimeout)
			_, err := ocs[n%len(ocs)].ApplyNoop(c, &cabinetpb.ApplyNoopRequest{})
			cancel()
			if ctx.Err() != nil {
				return
			}
			e := foEvent{start: s, end: time.Since(t0), node: n % len(ocs), ok: err == nil}
			if err != nil {
				e.code, e.msg = benchErrCode(err), benchErrText(err)
			} else if k := killAt.Load(); k >= 0 && int64(s) >= k && resumedAt.Load() < 0 {
				resumedAt.Store(int64(e.end))
			}
			writes = append(writes, e)
			select {
			case <-tick.C:
			case <-ctx.Done():
				return
			}
		}
	}()
	finish := func() {
		stop.Store(true)
		wg.Wait() // bounded: every call has a deadline
	}
	var phase atomic.Pointer[string]
	setPhase := func(s string) { phase.Store(&s) }
	setPhase("warm-up")
	prog.status(func() string {
		since := ""
		if k := killAt.Load(); k >= 0 {
			since = fmt.Sprintf(" | %.1fs since the kill of %s", (time.Since(t0) - time.Duration(k)).Seconds(), leader.id)
			if w := resumedAt.Load(); w >= 0 {
				since += fmt.Sprintf(", writes back after %.2fs", float64(w-k)/1e9)
			}
		}
		return fmt.Sprintf("round %d/%d %s | follower encrypts %d ok, %d failed%s", round, f.failoverRounds, *phase.Load(), liveOK.Load(), liveErr.Load(), since)
	})

	select {
	case <-ctx.Done():
	case <-time.After(failoverWarmup):
	}
	if ctx.Err() != nil {
		finish()
		return fail("interrupted"), leader.id
	}
	pid := leader.cmd.Process.Pid
	killedAt := time.Now()
	if err := leader.cmd.Process.Kill(); err != nil {
		finish()
		return fail("SIGKILL %s (pid %d): %v", leader.id, pid, err), leader.id
	}
	kill := time.Since(t0)
	killAt.Store(int64(kill))
	setPhase("leader killed")
	prog.logf("failover round %d: SIGKILL %s (leader, pid %d); followers %s", round, leader.id, pid, strings.Join(names, ", "))
	// Run until writes resumed + failoverAfter, or give up.
	giveUp := time.NewTimer(failoverGiveUp)
	defer giveUp.Stop()
	poll := time.NewTicker(50 * time.Millisecond)
	defer poll.Stop()
wait:
	for {
		select {
		case <-ctx.Done():
			break wait
		case <-giveUp.C:
			break wait
		case <-poll.C:
			if w := resumedAt.Load(); w >= 0 && time.Since(t0) >= time.Duration(w)+failoverAfter {
				break wait
			}
		}
	}
	setPhase("stopping callers")
	finish()
	var crypto []foEvent
	for _, ev := range events {
		crypto = append(crypto, ev...)
	}
	r := analyzeFailover(kill, crypto, writes, names, defaultFoParams(hb))
	r.Round, r.KilledNode, r.KilledPID, r.KilledAt = round, leader.id, pid, killedAt.UTC()
	for _, n := range followers {
		if st, err := failoverStatus(ctx, env, n); err == nil && st.GetRaftState() == "leader" {
			r.NewLeader = n.id
		}
	}
	if ctx.Err() != nil {
		r.Error = "interrupted"
		return r, leader.id
	}

	// Restart the killed node on its data dir.
	setPhase("restarting " + leader.id)
	select {
	case <-leader.done:
	case <-time.After(10 * time.Second):
		r.Error = fmt.Sprintf("%s (pid %d) did not exit after SIGKILL", leader.id, pid)
		return r, leader.id
	}
	rs := time.Now()
	if err := lc.startServer(leader, f); err != nil {
		r.Error = "restart: " + err.Error()
		return r, leader.id
	}
	env.meter.replacePID(pid, leader.cmd.Process.Pid)
	if err := lc.waitHealthy(ctx, leader, env.tlsCfg); err != nil {
		r.Error = "restart: " + err.Error()
		return r, leader.id
	}
	r.RestartSeconds = time.Since(rs).Seconds()
	return r, leader.id
}

// failoverRestoreLeader moves leadership back to id (bounded retries: the
// restarted node may still be catching up).
func failoverRestoreLeader(ctx context.Context, env *benchEnv, lc *localCluster, id string) error {
	return benchPoll(ctx, 30*time.Second, func() error {
		leader, _, err := failoverNodes(ctx, env, lc)
		if err != nil {
			return err
		}
		if leader.id == id {
			return nil
		}
		conn, err := benchDial(leader.apiAddr, env.tlsCfg)
		if err != nil {
			return err
		}
		defer conn.Close()
		c, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if _, err := cabinetpb.NewOperatorServiceClient(conn).TransferLeadership(c, &cabinetpb.TransferLeadershipRequest{ToNodeId: id}); err != nil {
			return rpcError(err)
		}
		return errors.New("transferred; checking")
	})
}

// ---- output ----

func failoverRoundLine(r *benchFailoverRound, fo *benchFailover) string {
	if r.KilledAt.IsZero() {
		return fmt.Sprintf("failover round %d: FAILED: %s", r.Round, r.Error)
	}
	w := fmt.Sprintf("writes did not resume within %gs", fo.GiveUpSeconds)
	if r.WritesResumed {
		w = fmt.Sprintf("kill -> first acknowledged write %.0fms = %.2f x HeartbeatTimeout (%gs)", *r.WriteUnavailableMS, benchDeref(r.WriteUnavailableOverHeartb), fo.HeartbeatTimeoutSeconds)
	}
	codes := ""
	if r.Crypto.Failed > 0 {
		codes = " (" + benchSortedCodes(r.Crypto.ErrorCodes) + ")"
	}
	line := fmt.Sprintf("failover round %d: killed %s, new leader %s: %s; follower encrypts in the %.1fs window: %d ok, %d failed%s, longest gap %.0fms",
		r.Round, r.KilledNode, benchOr(r.NewLeader, "?"), w, r.WindowSeconds, r.Crypto.OK, r.Crypto.Failed, codes, r.Crypto.LongestGapMS)
	if r.Error != "" {
		line += "; " + r.Error
	} else {
		line += fmt.Sprintf("; %s healthy again %.1fs after its restart", r.KilledNode, r.RestartSeconds)
	}
	return line
}

func benchDeref(p *float64) float64 {
	if p == nil {
		return 0
	}
	return *p
}

func benchOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// printFailoverTable prints a table of the rounds of a failover result.
func printFailoverTable(w interface{ Write([]byte) (int, error) }, fo *benchFailover) error {
	fmt.Fprintf(w, "\nfailover: %d callers Encrypt on the two followers (%s, %gs call timeout); one ApplyNoop through a follower every %gms (%gs timeout); window = kill -> first acknowledged write + %gs; HeartbeatTimeout %gs (%s), max-staleness %gs\n",
		fo.Callers, fo.Consistency, fo.CallTimeoutSeconds, fo.WriteIntervalMS, fo.WriteTimeoutSeconds, fo.AfterSeconds, fo.HeartbeatTimeoutSeconds, fo.HeartbeatTimeoutSource, fo.MaxStalenessSeconds)
	t := newTable(w)
	fmt.Fprintln(t, "ROUND\tKILLED\tNEW LEADER\tKILL->WRITE\tx HEARTBEAT\tWINDOW\tFOLLOWER OK\tFAILED\tLONGEST GAP\tWRITES OK/FAILED\tRESTART")
	for _, r := range fo.Rounds {
		if r.KilledAt.IsZero() {
			fmt.Fprintf(t, "%d\tFAILED\t\t\t\t\t\t\t\t\t\n", r.Round)
			continue
		}
		kw, xh := "not resumed", "-"
		if r.WritesResumed {
			kw, xh = fmt.Sprintf("%.0fms", *r.WriteUnavailableMS), fmt.Sprintf("%.2f", benchDeref(r.WriteUnavailableOverHeartb))
		}
		failed := fmt.Sprint(r.Crypto.Failed)
		if r.Crypto.Failed > 0 {
			failed += " (" + benchSortedCodes(r.Crypto.ErrorCodes) + ")"
		}
		restart := "-"
		if r.RestartSeconds > 0 {
			restart = fmt.Sprintf("%.1fs", r.RestartSeconds)
		}
		fmt.Fprintf(t, "%d\t%s\t%s\t%s\t%s\t%.1fs\t%d\t%s\t%.0fms\t%d/%d\t%s\n", r.Round, r.KilledNode, benchOr(r.NewLeader, "?"), kw, xh, r.WindowSeconds,
			r.Crypto.OK, failed, r.Crypto.LongestGapMS, r.Writes.OK, r.Writes.Failed, restart)
	}
	if err := t.Flush(); err != nil {
		return err
	}
	var lines []string
	for _, r := range fo.Rounds {
		if r.Error != "" {
			lines = append(lines, fmt.Sprintf("round %d: %s", r.Round, r.Error))
		}
		if r.Crypto.FirstError != "" {
			lines = append(lines, fmt.Sprintf("round %d: first follower error: %s", r.Round, r.Crypto.FirstError))
		}
	}
	sum := fmt.Sprintf("failover: %d of %d rounds resumed writes", fo.RoundsResumed, len(fo.Rounds))
	if fo.WriteUnavailableMinMS != nil {
		sum += fmt.Sprintf("; kill -> first write %.0f-%.0fms (at most %.2f x HeartbeatTimeout)", *fo.WriteUnavailableMinMS, *fo.WriteUnavailableMaxMS, benchDeref(fo.MaxWriteUnavailableHeartbeat))
	}
	sum += fmt.Sprintf("; follower encrypts: %d ok, %d failed", fo.CryptoOK, fo.CryptoFailed)
	if fo.CryptoFailed > 0 {
		sum += " (" + benchSortedCodes(fo.CryptoErrorCodes) + ")"
	}
	sum += fmt.Sprintf("; longest gap %.0fms", fo.LongestGapMS)
	lines = append(lines, sum)
	if fo.RestoreError != "" {
		lines = append(lines, "leadership not given back: "+fo.RestoreError)
	} else if fo.RestoredLeader != "" {
		lines = append(lines, "leadership given back to "+fo.RestoredLeader)
	}
	for _, l := range lines {
		fmt.Fprintln(w, "  "+l)
	}
	return nil
}
