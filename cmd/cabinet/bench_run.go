package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/status"
)

// maxRequestsPerSlice bounds every caller's loop by count as well as time.
const maxRequestsPerSlice = 10_000_000

// benchCaller is one caller's tally; only its own goroutine writes it while
// a slice runs, and it is read once the slice's callers have stopped.
type benchCaller struct {
	hist         latencyHist
	requests     uint64
	ok           uint64
	inWindow     uint64 // successes completed before the slice's deadline
	itemErrs     uint64
	errs         map[string]uint64
	firstErr     string
	firstItemErr string
}

// benchPhase is either the operation or its ceiling over all its slices.
type benchPhase struct {
	label      string
	call       benchCallFn
	items      int
	callers    []*benchCaller
	window     time.Duration // sum of the slices' measured windows
	sliceRates []float64     // successful requests/s of each slice, in order
	slices     int
	machine    cpuTimes // machine-wide, all slices
	machineOK  bool
	proc       uint64 // CPU ticks of the bench + node processes, all slices
	procOK     bool
	liveOK     atomic.Uint64 // for the progress line
	liveErr    atomic.Uint64
	// Finished slices only, for the progress line (read while callers run).
	doneInWindow atomic.Uint64
	doneWindow   atomic.Int64
}

func newPhase(label string, call benchCallFn, items, callers int) *benchPhase {
	ph := &benchPhase{label: label, call: call, items: items, machineOK: true, procOK: true}
	for i := 0; i < callers; i++ {
		ph.callers = append(ph.callers, &benchCaller{errs: map[string]uint64{}})
	}
	return ph
}

func benchErrCode(err error) string {
	if st, ok := status.FromError(err); ok {
		return st.Code().String()
	}
	return "BadResponse"
}

func benchErrText(err error) string {
	if st, ok := status.FromError(err); ok {
		return st.Code().String() + ": " + st.Message()
	}
	return err.Error()
}

// runSlice runs every caller for dur and waits for them. Requests still
// running grace after the deadline are cancelled (and counted as errors).
func runSlice(ctx context.Context, ph *benchPhase, dur, grace time.Duration, meter *cpuMeter) {
	start := time.Now()
	deadline := start.Add(dur)
	rctx, cancel := context.WithDeadline(ctx, deadline.Add(grace))
	defer cancel()
	cpu0 := meter.sample()
	var wg sync.WaitGroup
	for i, c := range ph.callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < maxRequestsPerSlice; n++ {
				t0 := time.Now()
				if !t0.Before(deadline) || rctx.Err() != nil {
					return
				}
				itemErrs, itemErr, err := ph.call(rctx, i)
				t1 := time.Now()
				if ctx.Err() != nil {
					return // interrupted: not the server's error
				}
				c.requests++
				if err != nil {
					c.errs[benchErrCode(err)]++
					if c.firstErr == "" {
						c.firstErr = benchErrText(err)
					}
					ph.liveErr.Add(1)
					// A failing call can return at once; do not spin.
					time.Sleep(time.Millisecond)
					continue
				}
				c.ok++
				ph.liveOK.Add(1)
				c.hist.record(t1.Sub(t0))
				if !t1.After(deadline) {
					c.inWindow++
				}
				if itemErrs > 0 {
					c.itemErrs += uint64(itemErrs)
					if c.firstItemErr == "" {
						c.firstItemErr = itemErr
					}
				}
			}
		}()
	}
	wg.Wait()
	cpu1 := meter.sample()
	if ctx.Err() != nil {
		// Interrupted: count only the time the slice really ran.
		if el := time.Since(start); el < dur {
			dur = el
		}
	}
	ph.window += dur
	ph.slices++
	var in uint64
	for _, c := range ph.callers {
		in += c.inWindow
	}
	if dur > 0 {
		ph.sliceRates = append(ph.sliceRates, float64(in-ph.doneInWindow.Load())/dur.Seconds())
	}
	ph.doneInWindow.Store(in)
	ph.doneWindow.Store(int64(ph.window))
	if cpu0.machineOK && cpu1.machineOK {
		ph.machine = ph.machine.add(cpu1.machine.sub(cpu0.machine))
	} else {
		ph.machineOK = false
	}
	if cpu0.procOK && cpu1.procOK {
		ph.proc += cpu1.proc - cpu0.proc
	} else {
		ph.procOK = false
	}
}

func (ph *benchPhase) totals() (ok, errs uint64) {
	for _, c := range ph.callers {
		ok += c.ok
		errs += c.requests - c.ok
	}
	return ok, errs
}

func (ph *benchPhase) firstError() string {
	for _, c := range ph.callers {
		if c.firstErr != "" {
			return c.firstErr
		}
	}
	return ""
}

// rate is successful requests per second completed inside the windows.
func (ph *benchPhase) rate() float64 {
	if ph.window <= 0 {
		return 0
	}
	var n uint64
	for _, c := range ph.callers {
		n += c.inWindow
	}
	return float64(n) / ph.window.Seconds()
}

func (ph *benchPhase) stats() benchStats {
	var h latencyHist
	s := benchStats{ErrorCodes: map[string]uint64{}, Slices: ph.slices, Seconds: ph.window.Seconds()}
	for _, c := range ph.callers {
		h.merge(&c.hist)
		s.Requests += c.requests
		s.OK += c.ok
		s.ItemErrors += c.itemErrs
		for k, v := range c.errs {
			s.ErrorCodes[k] += v
		}
		if s.FirstError == "" {
			s.FirstError = c.firstErr
		}
		if s.FirstItemError == "" {
			s.FirstItemError = c.firstItemErr
		}
	}
	s.Errors = s.Requests - s.OK
	s.SliceOpsPerSec = append([]float64{}, ph.sliceRates...)
	s.OpsPerSec = ph.rate()
	s.ItemsPerSec = s.OpsPerSec * float64(ph.items)
	ms := func(d time.Duration) float64 { return float64(d) / 1e6 }
	s.LatencyMS = benchLatency{
		P50: ms(h.quantile(0.50)), P90: ms(h.quantile(0.90)), P99: ms(h.quantile(0.99)), P999: ms(h.quantile(0.999)),
		Max: ms(h.max), Mean: ms(h.mean()),
	}
	if ph.machineOK && ph.slices > 0 && ph.machine.total > 0 {
		busy := float64(ph.machine.busy) / float64(ph.machine.total)
		steal := float64(ph.machine.steal) / float64(ph.machine.total)
		s.MachineCPUBusy, s.MachineCPUSteal = &busy, &steal
	}
	if ph.procOK && ph.slices > 0 && s.OK > 0 {
		us := float64(ph.proc) * 1e6 / clockTicks / float64(s.OK)
		s.CPUUSPerOp = &us
		cores := float64(ph.proc) / clockTicks / (ph.window.Seconds() + 1e-9)
		s.CPUCores = &cores
	}
	return s
}

// newBenchResult has every list and map of the JSON schema non-null.
func newBenchResult(op, ceiling string) benchResult {
	r := benchResult{Op: op, ItemsPerRequest: 1, Ceiling: benchCeiling{Kind: ceiling}, SliceRatios: []float64{}}
	for _, s := range []*benchStats{&r.Result, &r.CeilingResult} {
		s.ErrorCodes, s.SliceOpsPerSec = map[string]uint64{}, []float64{}
	}
	return r
}

// runBenchOp prepares one operation and its ceiling, warms both up, then
// alternates them slice by slice (op, ceiling, ceiling, op, ...).
func runBenchOp(ctx context.Context, env *benchEnv, def *benchOpDef, prog *benchProgress) benchResult {
	if def.custom != nil {
		return def.custom(ctx, env, prog)
	}
	f := env.f
	res := newBenchResult(def.name, def.ceiling)
	prog.status(func() string { return "preparing" })
	p, err := def.prepare(ctx, env)
	if err != nil {
		res.Error = "setup: " + err.Error()
		prog.logf("%s: %s", def.name, res.Error)
		return res
	}
	if p.cleanup != nil {
		defer p.cleanup()
	}
	res.ItemsPerRequest, res.RequestBytes, res.ResponseBytes, res.CommandBytes = p.items, p.reqBytes, p.respBytes, p.commandBytes
	res.Keys = p.keys
	ceilCall, ceilInfo, err := ceilingCall(ctx, env, def.ceiling, p)
	res.Ceiling = ceilInfo
	if err != nil {
		res.Ceiling.Error = err.Error()
		prog.logf("%s: %s (measuring the operation alone)", def.name, err)
	}
	if p.crypto != nil {
		prog.status(func() string { return "timing " + p.crypto.name + " in-process" })
		p.crypto.measure(ctx)
	}
	grace := min(f.timeout, 5*time.Second)
	conc := f.concurrency

	// Warm-up (not measured): connections, TLS, the nodes' key caches.
	if f.warmup > 0 {
		w := newPhase("warm-up", p.call, p.items, conc)
		prog.status(func() string { return fmt.Sprintf("warm-up  %d ok  %d errors", w.liveOK.Load(), w.liveErr.Load()) })
		runSlice(ctx, w, f.warmup, grace, env.meter)
		if ok, errs := w.totals(); ok == 0 && errs > 0 && ctx.Err() == nil {
			res.Result = w.stats()
			res.Error = fmt.Sprintf("all %d requests failed in the warm-up: %s", errs, w.firstError())
			prog.logf("%s: %s", def.name, res.Error)
			return res
		}
		if ceilCall != nil {
			w := newPhase("warm-up", ceilCall, 1, conc)
			runSlice(ctx, w, f.warmup, grace, env.meter)
			if ok, errs := w.totals(); ok == 0 && errs > 0 {
				res.Ceiling.Error = fmt.Sprintf("all %d ceiling requests failed in the warm-up: %s", errs, w.firstError())
				prog.logf("%s: %s", def.name, res.Ceiling.Error)
				ceilCall = nil
			}
		}
	}

	opPh := newPhase("op", p.call, p.items, conc)
	var cePh *benchPhase
	if ceilCall != nil {
		cePh = newPhase("ceiling", ceilCall, 1, conc)
	}
	nSlices := int((f.duration + f.slice - 1) / f.slice)
	begin := time.Now()
	var cur, ceRef atomic.Pointer[benchPhase]
	var curStart atomic.Int64
	ceRef.Store(cePh)
	prog.status(func() string {
		ce := ceRef.Load()
		ph := cur.Load()
		if ph == nil {
			return ""
		}
		el := time.Since(time.Unix(0, curStart.Load())).Seconds()
		live := 0.0
		if el > 0 {
			live = float64(ph.liveOK.Load()) / el
		}
		return fmt.Sprintf("%-7s now %s/s | op %s/s ceiling %s/s ratio %s | errors %d | %s/%s",
			ph.label, benchFmtRate(live), benchFmtRate(opPh.progressRate()), benchFmtRate(ce.progressRate()), benchFmtRatio(progressRatio(opPh, ce)),
			opPh.liveErr.Load()+ce.liveErrOrZero(), time.Since(begin).Round(time.Second), (2 * f.duration).Round(time.Second))
	})
	for k := 0; k < nSlices && ctx.Err() == nil; k++ {
		d := f.slice
		if k == nSlices-1 {
			d = f.duration - f.slice*time.Duration(nSlices-1)
		}
		order := []*benchPhase{opPh, cePh}
		if k%2 == 1 {
			order[0], order[1] = cePh, opPh
		}
		for _, ph := range order {
			if ph == nil || ctx.Err() != nil {
				continue
			}
			ph.liveOK.Store(0)
			curStart.Store(time.Now().UnixNano())
			cur.Store(ph)
			runSlice(ctx, ph, d, grace, env.meter)
		}
		if k == 0 {
			if ok, errs := opPh.totals(); ok == 0 && errs > 0 {
				res.Error = fmt.Sprintf("all %d requests failed: %s", errs, opPh.firstError())
				break
			}
			if cePh != nil {
				if ok, errs := cePh.totals(); ok == 0 && errs > 0 {
					res.Ceiling.Error = fmt.Sprintf("all %d ceiling requests failed: %s", errs, cePh.firstError())
					cePh = nil
					ceRef.Store(nil)
				}
			}
		}
		prog.sliceDone()
	}
	cur.Store(nil)
	res.Interrupted = ctx.Err() != nil
	res.Result = opPh.stats()
	if res.Error == "" && res.Result.OK == 0 && ctx.Err() == nil {
		res.Error = fmt.Sprintf("all %d requests failed: %s", res.Result.Errors, res.Result.FirstError)
	}
	if cePh != nil {
		res.CeilingResult = cePh.stats()
		if res.CeilingResult.OpsPerSec > 0 {
			res.Ratio = res.Result.OpsPerSec / res.CeilingResult.OpsPerSec
		}
		res.SliceRatios, res.RatioMedian, res.RatioIQR = sliceRatios(res.Result.SliceOpsPerSec, res.CeilingResult.SliceOpsPerSec)
		if o, c := res.Result.CPUUSPerOp, res.CeilingResult.CPUUSPerOp; o != nil && c != nil && *o > 0 {
			r := *c / *o
			res.CPURatio = &r
		}
	}
	if p.crypto != nil && ctx.Err() == nil {
		prog.status(func() string { return "timing " + p.crypto.name + " in-process" })
		p.crypto.measure(ctx)
		res.Crypto = p.crypto.result(res.Result, res.CeilingResult)
	}
	prog.logf("%s", benchSummaryLine(&res))
	return res
}

// progressRate is rate() over the finished slices; safe while callers run.
func (ph *benchPhase) progressRate() float64 {
	if ph == nil {
		return 0
	}
	w := time.Duration(ph.doneWindow.Load())
	if w <= 0 {
		return 0
	}
	return float64(ph.doneInWindow.Load()) / w.Seconds()
}

func (ph *benchPhase) liveErrOrZero() uint64 {
	if ph == nil {
		return 0
	}
	return ph.liveErr.Load()
}

func progressRatio(op, ce *benchPhase) float64 {
	if ce == nil || ce.progressRate() == 0 {
		return 0
	}
	return op.progressRate() / ce.progressRate()
}

func benchFmtRate(r float64) string {
	switch {
	case r >= 100:
		return strconv.FormatFloat(r, 'f', 0, 64)
	case r >= 10:
		return strconv.FormatFloat(r, 'f', 1, 64)
	default:
		return strconv.FormatFloat(r, 'f', 2, 64)
	}
}

func benchFmtRatio(r float64) string {
	if r == 0 {
		return "-"
	}
	return strconv.FormatFloat(r, 'f', 2, 64)
}

func benchSummaryLine(r *benchResult) string {
	if r.Error != "" {
		return fmt.Sprintf("%s: FAILED: %s", r.Op, r.Error)
	}
	return fmt.Sprintf("%s: %s/s (p50 %.2fms p99 %.2fms, %d errors) vs %s %s/s: ratio %s",
		r.Op, benchFmtRate(r.Result.OpsPerSec), r.Result.LatencyMS.P50, r.Result.LatencyMS.P99, r.Result.Errors,
		r.Ceiling.Kind, benchFmtRate(r.CeilingResult.OpsPerSec), benchFmtRatio(r.Ratio))
}

// ---- progress on stderr ----

type benchProgress struct {
	w     io.Writer
	quiet bool
	tty   bool

	mu      sync.Mutex
	prefix  string
	statusf func() string
	shown   bool
	stop    chan struct{}
	stopped sync.WaitGroup
}

func newBenchProgress(w io.Writer, quiet bool) *benchProgress {
	p := &benchProgress{w: w, quiet: quiet, stop: make(chan struct{})}
	if f, ok := w.(*os.File); ok {
		if fi, err := f.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
			p.tty = true
		}
	}
	if p.tty && !quiet {
		p.stopped.Add(1)
		go func() {
			defer p.stopped.Done()
			t := time.NewTicker(250 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-p.stop:
					return
				case <-t.C:
					p.redraw()
				}
			}
		}()
	}
	return p
}

func (p *benchProgress) redraw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.statusf == nil {
		return
	}
	fmt.Fprintf(p.w, "\r\033[K%s %s", p.prefix, p.statusf())
	p.shown = true
}

func (p *benchProgress) clearLocked() {
	if p.shown {
		fmt.Fprint(p.w, "\r\033[K")
		p.shown = false
	}
}

// logf prints one line (above the live line on a terminal).
func (p *benchProgress) logf(format string, args ...any) {
	if p.quiet {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.clearLocked()
	fmt.Fprintf(p.w, "bench: "+format+"\n", args...)
}

func (p *benchProgress) setOp(i, n int, name string) {
	p.mu.Lock()
	p.prefix = fmt.Sprintf("[%d/%d %s]", i, n, name)
	p.statusf = nil
	p.mu.Unlock()
}

func (p *benchProgress) status(f func() string) {
	p.mu.Lock()
	p.statusf = f
	p.mu.Unlock()
}

// sliceDone prints the live line as a plain line when stderr is not a
// terminal (a log), once per slice pair.
func (p *benchProgress) sliceDone() {
	if p.quiet || p.tty {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.statusf != nil {
		fmt.Fprintf(p.w, "bench: %s %s\n", p.prefix, p.statusf())
	}
}

func (p *benchProgress) done() {
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	p.stopped.Wait()
	p.mu.Lock()
	p.clearLocked()
	p.statusf = nil
	p.mu.Unlock()
}

// sortedCodes lists error codes by count, for the table.
func benchSortedCodes(m map[string]uint64) string {
	type kv struct {
		k string
		v uint64
	}
	var s []kv
	for k, v := range m {
		s = append(s, kv{k, v})
	}
	sort.Slice(s, func(i, j int) bool { return s[i].v > s[j].v || (s[i].v == s[j].v && s[i].k < s[j].k) })
	var out []string
	for _, e := range s {
		out = append(out, fmt.Sprintf("%s %d", e.k, e.v))
	}
	return strings.Join(out, ", ")
}

// sliceRatios pairs each operation slice with the ceiling slice next to it
// (they alternate op, ceiling, ceiling, op, ... so pair k ran back to back)
// and returns the ratios, their median and interquartile range: how far
// machine noise moves the ratio within the run.
func sliceRatios(op, ceil []float64) ([]float64, float64, [2]float64) {
	var rs []float64
	for k := 0; k < len(op) && k < len(ceil); k++ {
		if ceil[k] > 0 {
			rs = append(rs, op[k]/ceil[k])
		}
	}
	if len(rs) == 0 {
		return []float64{}, 0, [2]float64{}
	}
	s := append([]float64(nil), rs...)
	sort.Float64s(s)
	q := func(p float64) float64 { return s[int(p*float64(len(s)-1)+0.5)] }
	return rs, q(0.5), [2]float64{q(0.25), q(0.75)}
}
