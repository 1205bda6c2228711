package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

// `cabinet bench`: measures operations against ceilings taken in the same
// run, on the same server, interleaved with the operation in short slices
// so the noise of a shared machine hits both alike (issue 7; method and
// schema in docs/PERFORMANCE.md).

type benchFlags struct {
	addrs      []string
	caCert     string
	clientCert string
	clientKey  string
	output     string
	timeout    time.Duration

	ops         []string
	payload     int
	concurrency int
	connections int
	duration    time.Duration
	slice       time.Duration
	warmup      time.Duration
	batch       int
	target      string
	spec        string
	strong      bool
	quiet       bool
	cpuProfile  string
	jsonOut     string

	local           bool
	localKeep       bool
	localServerArgs []string
	serverProfile   string
	failoverRounds  int
	keys            int
}

// benchDefaultOps are the operations the issue sets targets for.
var benchDefaultOps = []string{"echo", "encrypt", "decrypt", "generate-data-key", "batch-encrypt", "sign", "verify", "create-key", "rotate-key", "first-use"}

func newBenchCmd() *cobra.Command {
	f := &benchFlags{}
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Benchmark a cluster against ceilings measured in the same run",
		Long: `bench measures Cabinet operations as ratios against ceilings measured in the same
run on the same server, interleaved with the operation in short slices:
  (a) Echo, a bare gRPC method on the same server (same TLS, interceptors and
      request/response sizes as the operation) that does no work;
  (b) ApplyNoop, a no-op Raft command of the size of the operation's command,
      through the same leader, stores and transport (create-key, rotate-key).
The echo operation compares Echo itself with a bare gRPC server started in this
process (what a node's per-request machinery costs); first-use compares the
first Encrypt with a key version on the target node (HSM unwrap) with the second.
It creates the keys and ciphertexts each operation needs first, then runs
--concurrency callers over --connections gRPC connections for --duration per
operation and as long again for its ceiling, alternating --slice-long slices.
Sign and verify also time the same Go crypto in this process, to compare with
their cost over the ceiling. --keys N spreads the symmetric operations over a
working set of N keys, created (and used once on each target node) in setup;
each request picks one. Method and JSON schema: docs/PERFORMANCE.md.

Operations: ` + strings.Join(benchOpNames(), ", ") + ` (or "all"), and failover.
failover (--local only, never part of "all") kills the leader's process with
SIGKILL while --concurrency callers Encrypt on the two followers and one writer
proposes a no-op through a follower every 20ms; it reports the failed follower
requests (by gRPC code), the longest gap between their successes, and the time
from the kill to the first acknowledged write, also in Raft HeartbeatTimeouts;
then it restarts the node. --failover-rounds repeats it with the then leader.
--target: leader, follower (a node whose status is follower), all, or an API address.
--local starts a throwaway 3-node cluster on SoftHSM tokens in a temp dir with this
binary and stops it afterwards. Without --local, bench uses --addr (repeatable or
comma-separated; any node, the others are found with ListPeers) and the client
certificate flags; it needs an admin certificate (ApplyNoop is admin-only) and
leaves the keys it created (description "cabinet-bench <run id>").`,
		Example: `  cabinet bench --local --target follower --ops encrypt,decrypt
  cabinet bench --local --target follower --ops encrypt --keys 5000 --local-server-arg=--cache-size=1000
  cabinet bench --local --ops failover --failover-rounds 3
  cabinet bench --addr 127.0.0.1:7101 --ops create-key,rotate-key --target leader -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runBench(cmd.Context(), cmd, f)
		},
	}
	fl := cmd.Flags()
	fl.StringSliceVar(&f.addrs, "addr", benchSplitList(envOr("CABINET_ADDR", "127.0.0.1:7101")), "node API addresses (repeatable or comma-separated; env CABINET_ADDR)")
	fl.StringVar(&f.caCert, "ca-cert", os.Getenv("CABINET_CACERT"), "cluster CA certificate PEM (env CABINET_CACERT)")
	fl.StringVar(&f.clientCert, "client-cert", os.Getenv("CABINET_CLIENT_CERT"), "admin client certificate PEM (env CABINET_CLIENT_CERT)")
	fl.StringVar(&f.clientKey, "client-key", os.Getenv("CABINET_CLIENT_KEY"), "client private key PEM (env CABINET_CLIENT_KEY)")
	fl.StringVarP(&f.output, "output", "o", "table", "report format: table or json (progress goes to stderr)")
	fl.DurationVar(&f.timeout, "timeout", 10*time.Second, "deadline of each setup request; a request still running this long (at most 5s) after its slice ended is cancelled and counted as an error")
	fl.StringSliceVar(&f.ops, "ops", benchDefaultOps, "operations to measure, in order (or \"all\")")
	fl.IntVar(&f.payload, "payload", 1024, "plaintext/message bytes per item (1..65536)")
	fl.IntVar(&f.concurrency, "concurrency", 64, "concurrent callers")
	fl.IntVar(&f.connections, "connections", 4, "gRPC connections, spread over the target nodes; caller i uses connection i mod N")
	fl.DurationVar(&f.duration, "duration", 10*time.Second, "measured time per operation; its ceiling gets as much again")
	fl.DurationVar(&f.slice, "slice", time.Second, "length of one interleaved slice (operation, ceiling, ceiling, operation, ...)")
	fl.DurationVar(&f.warmup, "warmup", 0, "unmeasured warm-up of the operation and its ceiling (default min(1s, duration/5))")
	fl.IntVar(&f.batch, "batch", 100, "items per batch-encrypt/batch-decrypt request (1..1000)")
	fl.StringVar(&f.target, "target", "leader", "leader, follower, all, or an API address")
	fl.StringVar(&f.spec, "spec", "EC_P256", "key spec for sign/verify: EC_P256, EC_P384 or ED25519")
	fl.BoolVar(&f.strong, "strong", false, "ask for STRONG consistency on crypto operations (a read-index round trip each)")
	fl.BoolVarP(&f.quiet, "quiet", "q", false, "no progress on stderr")
	fl.StringVar(&f.jsonOut, "json-out", "", "also write the JSON report to FILE (whatever -o says)")
	fl.StringVar(&f.cpuProfile, "cpuprofile", "", "write a CPU profile of this bench process to FILE")
	fl.BoolVar(&f.local, "local", false, "start a throwaway local 3-node cluster on SoftHSM (this binary), bench it, stop it")
	fl.BoolVar(&f.localKeep, "local-keep", false, "with --local: keep the cluster's temp dir (data, tokens, logs) afterwards")
	fl.StringArrayVar(&f.localServerArgs, "local-server-arg", nil, "with --local: extra flag for every local server (repeatable), e.g. --local-server-arg=--log-level=warn")
	fl.StringVar(&f.serverProfile, "server-cpuprofile", "", "with --local: each server writes a CPU profile of the run to DIR/<node>.pprof")
	fl.IntVar(&f.keys, "keys", 1, "keys the symmetric operations spread their requests over (encrypt, decrypt, generate-data-key, re-encrypt, mac, batch-*), 1..100000; created (and used once on each target) in setup, not measured")
	fl.IntVar(&f.failoverRounds, "failover-rounds", 1, "with --local --ops failover: leader kills (each followed by a restart of the killed node), 1..20")
	return cmd
}

func benchSplitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func (f *benchFlags) validate() error {
	switch {
	case f.output != "table" && f.output != "json":
		return fmt.Errorf("--output must be table or json, not %q", f.output)
	case f.payload < 1 || f.payload > 65536:
		return fmt.Errorf("--payload must be 1..65536 bytes")
	case f.concurrency < 1 || f.concurrency > 10000:
		return fmt.Errorf("--concurrency must be 1..10000")
	case f.connections < 1 || f.connections > 1024:
		return fmt.Errorf("--connections must be 1..1024")
	case f.duration <= 0 || f.duration > 24*time.Hour:
		return fmt.Errorf("--duration must be positive (and under 24h)")
	case f.slice < 50*time.Millisecond:
		return fmt.Errorf("--slice must be at least 50ms")
	case f.warmup < 0:
		return fmt.Errorf("--warmup must not be negative")
	case f.batch < 1 || f.batch > 1000:
		return fmt.Errorf("--batch must be 1..1000")
	case f.batch*(f.payload+64) > 3<<20 && f.wants("batch-encrypt", "batch-decrypt"):
		return fmt.Errorf("--batch x --payload must stay under 3 MiB per request (gRPC's default 4 MiB message limit)")
	case f.timeout <= 0:
		return fmt.Errorf("--timeout must be positive")
	case f.serverProfile != "" && !f.local:
		return fmt.Errorf("--server-cpuprofile needs --local (start an existing server with CABINET_CPUPROFILE=FILE instead)")
	case (f.localKeep || len(f.localServerArgs) > 0) && !f.local:
		return fmt.Errorf("--local-keep and --local-server-arg need --local")
	}
	if err := validateBenchKeys(f.keys); err != nil {
		return err
	}
	if _, err := signSpecOf(f.spec); err != nil && f.wants("sign", "verify") {
		return err
	}
	ops, err := resolveBenchOps(f.ops)
	if err != nil {
		return err
	}
	f.ops = ops
	if slices.Contains(ops, "failover") && !f.local {
		return errors.New("--ops failover needs --local: it kills (SIGKILL) and restarts a node process, so only on a cluster bench started itself")
	}
	if f.failoverRounds < 1 || f.failoverRounds > failoverMaxRounds {
		return fmt.Errorf("--failover-rounds must be 1..%d", failoverMaxRounds)
	}
	if f.warmup == 0 {
		f.warmup = min(time.Second, f.duration/5)
	}
	return nil
}

func (f *benchFlags) wants(names ...string) bool {
	for _, o := range f.ops {
		if o == "all" {
			return true
		}
		for _, n := range names {
			if o == n {
				return true
			}
		}
	}
	return false
}

func resolveBenchOps(in []string) ([]string, error) {
	var out []string
	seen := map[string]bool{}
	for _, o := range in {
		o = strings.ToLower(strings.TrimSpace(o))
		if o == "" {
			continue
		}
		names := []string{o}
		if o == "all" {
			names = benchOpNames() // never failover: it kills a node
		} else if benchOps[o] == nil {
			return nil, fmt.Errorf("unknown operation %q; known: %s (or all), failover (--local only)", o, strings.Join(benchOpNames(), ", "))
		}
		for _, n := range names {
			if !seen[n] {
				seen[n] = true
				out = append(out, n)
			}
		}
	}
	if len(out) == 0 {
		return nil, errors.New("--ops names no operation")
	}
	return out, nil
}

func benchRunID() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func runBench(ctx context.Context, cmd *cobra.Command, f *benchFlags) (err error) {
	if err := f.validate(); err != nil {
		return err
	}
	if f.cpuProfile != "" {
		pf, err := os.Create(f.cpuProfile)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(pf); err != nil {
			pf.Close()
			return err
		}
		defer func() { pprof.StopCPUProfile(); pf.Close() }()
	}
	prog := newBenchProgress(cmd.ErrOrStderr(), f.quiet)
	started := time.Now()

	var nodePIDs []int
	var local *localCluster
	if f.local {
		lc, err := startLocalCluster(ctx, f, prog)
		if lc != nil {
			defer lc.stop(prog)
		}
		if err != nil {
			return fmt.Errorf("--local: %w", err)
		}
		f.addrs = lc.apiAddrs()
		f.caCert, f.clientCert, f.clientKey = lc.adminFiles()
		nodePIDs = lc.pids()
		local = lc
	}

	env, err := connectBench(ctx, f, prog, nodePIDs)
	if err != nil {
		return err
	}
	defer env.close()
	env.local = local

	rep := &benchReport{
		Schema:    benchSchema,
		RunID:     env.runID,
		StartedAt: started.UTC(),
		Settings:  f.settings(),
		Machine:   benchMachineInfo(),
		Cluster:   env.clusterInfo(),
		CPUScope:  env.meter.scope,
	}
	failed := 0
	for i, name := range f.ops {
		if ctx.Err() != nil {
			break
		}
		prog.setOp(i+1, len(f.ops), name)
		res := runBenchOp(ctx, env, benchOps[name], prog)
		if res.Error != "" {
			failed++
		}
		rep.Results = append(rep.Results, res)
	}
	prog.done()
	rep.FinishedAt = time.Now().UTC()
	rep.Interrupted = ctx.Err() != nil

	if f.jsonOut != "" {
		jf, err := os.Create(f.jsonOut)
		if err != nil {
			return err
		}
		err = printAnyJSON(jf, rep)
		if cerr := jf.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("--json-out: %w", err)
		}
	}
	out := cmd.OutOrStdout()
	if f.output == "json" {
		if err := printAnyJSON(out, rep); err != nil {
			return err
		}
	} else if err := printBenchTable(out, rep); err != nil {
		return err
	}
	switch {
	case rep.Interrupted:
		return errors.New("interrupted: the report covers what ran")
	case failed > 0:
		return fmt.Errorf("%d of %d operations failed entirely (see the report)", failed, len(f.ops))
	}
	return nil
}

func (f *benchFlags) settings() benchSettings {
	return benchSettings{
		Ops:             f.ops,
		PayloadBytes:    f.payload,
		Concurrency:     f.concurrency,
		Connections:     f.connections,
		DurationSeconds: f.duration.Seconds(),
		SliceSeconds:    f.slice.Seconds(),
		WarmupSeconds:   f.warmup.Seconds(),
		Batch:           f.batch,
		Target:          f.target,
		SignSpec:        strings.ToUpper(f.spec),
		Strong:          f.strong,
		Local:           f.local,
		FailoverRounds:  f.failoverRounds,
		Keys:            f.keys,
	}
}

func benchMachineInfo() benchMachine {
	host, _ := os.Hostname()
	return benchMachine{
		GoVersion:  runtime.Version(),
		GOOS:       runtime.GOOS,
		GOARCH:     runtime.GOARCH,
		NumCPU:     runtime.NumCPU(),
		GOMAXPROCS: runtime.GOMAXPROCS(0),
		Hostname:   host,
		Version:    Version,
	}
}
