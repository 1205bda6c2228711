package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/net/netutil"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/keyops"
	"github.com/cabinet-kms/cabinet/transport"
	"github.com/cabinet-kms/cabinet/transport/audit"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

type serverFlags struct {
	dataDir      string
	logLevel     string
	logFormat    string
	maxStaleness time.Duration
	heartbeat    time.Duration
	election     time.Duration
	cacheSize    int
	minRotation  time.Duration
	minPending   time.Duration
	rateLimit    float64
	rateBurst    int
	maxConns     int
	auditSync    time.Duration
	raftListen   string
	apiListen    string
	metricsAddr  string
	gossip       gossipSettings

	configPath     string
	validateConfig bool

	dev     bool
	devAddr string

	memoryLimit string
}

func newServerCmd() *cobra.Command {
	f := &serverFlags{}
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Run a Cabinet node (waits for `operator init` or `operator join` to prepare --data-dir)",
		Long: `Run a Cabinet node. It waits for ` + "`operator init`" + ` or ` + "`operator join`" + ` to prepare --data-dir.

Every flag can also be set in a YAML config file (--config, keys are the flag
names) or with an environment variable CABINET_<FLAG_NAME> (upper case, dashes
as underscores, e.g. CABINET_DATA_DIR). The command line wins over the
environment, which wins over the file. docs/CONFIG.md lists every option.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runServerCommand(cmd, f)
		},
	}
	cmd.Flags().StringVar(&f.dataDir, "data-dir", "", "node data directory (written by operator init/join)")
	cmd.Flags().StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	cmd.Flags().StringVar(&f.logFormat, "log-format", "text", "text or json")
	cmd.Flags().DurationVar(&f.maxStaleness, "max-staleness", cluster.DefaultMaxStaleness, "a follower serves crypto only while it applied the leader's commit index learnt within this (keep it above the worst leader failover, ~2x the election timeout + 1s)")
	cmd.Flags().DurationVar(&f.heartbeat, "raft-heartbeat-timeout", time.Second, "Raft heartbeat timeout")
	cmd.Flags().DurationVar(&f.election, "raft-election-timeout", time.Second, "Raft election timeout")
	cmd.Flags().IntVar(&f.cacheSize, "cache-size", 10000, "unwrapped key versions kept in memory")
	cmd.Flags().DurationVar(&f.minRotation, "min-rotation-period", 24*time.Hour, "shortest automatic rotation period accepted")
	cmd.Flags().DurationVar(&f.minPending, "min-pending-window", 7*24*time.Hour, "shortest destruction waiting period accepted")
	cmd.Flags().Float64Var(&f.rateLimit, "rate-limit", 0, "requests per second per principal (0: unlimited)")
	cmd.Flags().IntVar(&f.rateBurst, "rate-burst", 0, "burst per principal (default: the rate)")
	cmd.Flags().IntVar(&f.maxConns, "max-connections", 4096, "concurrent client connections accepted by the API listener")
	cmd.Flags().StringVar(&f.raftListen, "raft-listen", "", "listen for Raft here instead of the advertised raft address (e.g. behind a proxy)")
	cmd.Flags().StringVar(&f.apiListen, "api-listen", "", "listen for the API here instead of the advertised API address (e.g. behind a proxy)")
	cmd.Flags().DurationVar(&f.auditSync, "audit-sync-interval", 100*time.Millisecond, "how often the audit log is fsynced (each record is written at once)")
	cmd.Flags().StringVar(&f.gossip.addr, "gossip-addr", "", "memberlist bind address (default: the Raft IP at Raft port + 100)")
	cmd.Flags().StringSliceVar(&f.gossip.join, "gossip-join", nil, "extra gossip addresses to contact (members are found from the node records anyway)")
	cmd.Flags().DurationVar(&f.gossip.autoremoveAfter, "autoremove-dead-after", 0, "leader removes voters gossip saw dead this long, only while quorum stays safe and never below 3 voters (0: off)")
	cmd.Flags().BoolVar(&f.gossip.enabled, "gossip", true, "run memberlist gossip (discovery and failure detection)")
	cmd.Flags().StringVar(&f.metricsAddr, "metrics-addr", "", "serve Prometheus metrics over plain HTTP at this address, e.g. 127.0.0.1:9464 (off when empty)")
	cmd.Flags().StringVar(&f.configPath, "config", "", "YAML config file whose keys are these flags' names (env CABINET_CONFIG)")
	cmd.Flags().BoolVar(&f.validateConfig, "validate-config", false, "check the configuration (file, environment, flags), print the effective options and exit")
	cmd.Flags().StringVar(&f.memoryLimit, "memory-limit", "", "soft memory limit for the Go runtime, e.g. 1200MiB; \"auto\" = 90% of the cgroup limit; empty = GOMEMLIMIT or none (docs/PRODUCTION.md)")
	cmd.Flags().BoolVar(&f.dev, "dev", false, "try Cabinet out: a single node in this process with an in-memory HSM and a temporary data dir (all keys lost at exit; loopback only; prints the client environment)")
	cmd.Flags().StringVar(&f.devAddr, "dev-addr", devDefaultAddr, "with --dev: the API address (a loopback IP:port)")
	return cmd
}

func newLogger(level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format must be text or json")
}

// waitNodeConfig waits until init/join has written node.json, so servers can
// be started before their node is initialised or joined.
func waitNodeConfig(ctx context.Context, dataDir string, log *slog.Logger) (*nodeConfig, error) {
	logged := false
	for {
		nc, err := loadNodeConfig(dataDir)
		if err == nil {
			return nc, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		if !logged {
			log.Info("waiting for this node to be initialised or joined", "data_dir", dataDir,
				"hint", "run `cabinet operator init` (first node) or `cabinet operator join` with a join token")
			logged = true
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// loadNodeTLS loads the node certificate, its key (refusing loose
// permissions) and the cluster CA.
func loadNodeTLS(dataDir string) (tls.Certificate, *x509.CertPool, error) {
	dir := tlsDir(dataDir)
	keyPath := filepath.Join(dir, "node-key.pem")
	if err := tlsutil.CheckKeyFilePerms(keyPath); err != nil {
		return tls.Certificate{}, nil, err
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "node.pem"), keyPath)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("load node certificate: %w", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca.pem"))
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("read cluster CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return tls.Certificate{}, nil, fmt.Errorf("%s holds no certificate", filepath.Join(dir, "ca.pem"))
	}
	return cert, pool, nil
}

func runServer(ctx context.Context, f *serverFlags) error {
	log, err := newLogger(f.logLevel, f.logFormat)
	if err != nil {
		return err
	}
	if n, err := applyMemoryLimit(f.memoryLimit); err != nil {
		return err
	} else if n > 0 {
		log.Info("soft memory limit set", "bytes", n)
	}
	nc, err := waitNodeConfig(ctx, f.dataDir, log)
	if err != nil {
		if ctx.Err() != nil {
			log.Info("stopped before this node was initialised or joined")
			return nil
		}
		return err
	}
	log = log.With("node", nc.NodeID)
	cert, pool, err := loadNodeTLS(f.dataDir)
	if err != nil {
		return err
	}
	pcfg, err := pkcs11Config(nc.HSM)
	if err != nil {
		return err
	}
	pcfg.Logger = log.With("component", "hsm")
	pkcs, err := hsm.OpenPKCS11(ctx, pcfg)
	if err != nil {
		return fmt.Errorf("open HSM token %q: %w", nc.HSM.TokenLabel, err)
	}
	defer pkcs.Close()
	reg := newMetricsRegistry()
	h := newMeteredHSM(pkcs, reg)
	if _, err := h.EnsureIdentity(ctx); err != nil {
		return fmt.Errorf("HSM identity key: %w", err)
	}

	state := fsm.New(fsm.Config{Logger: log.With("component", "fsm")})
	engine, err := keyops.New(keyops.Config{Sealer: wrapSealer(h), CacheSize: f.cacheSize})
	if err != nil {
		return err
	}
	state.OnRestore(engine.Purge)
	// Every applied change to a key drops its cached material on this node at
	// once (CreateKey has nothing cached yet).
	state.OnApply(func(_ uint64, cmd *fsmpb.Command, res *fsmpb.Result) {
		if res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
			return
		}
		if id := res.GetKey().GetKeyId(); id != "" && cmd.GetType() != fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY {
			engine.Forget(id)
		}
	})

	peers := transport.NewPeerClients(tlsutil.ClientConfig(cert, pool))
	defer peers.Close()

	raftListen := nc.RaftAddr
	if f.raftListen != "" {
		raftListen = f.raftListen
	}
	raftLn, err := net.Listen("tcp", raftListen)
	if err != nil {
		return fmt.Errorf("listen for Raft on %s: %w", raftListen, err)
	}
	advertise, err := net.ResolveTCPAddr("tcp", nc.RaftAddr)
	if err != nil {
		return fmt.Errorf("raft address %q: %w", nc.RaftAddr, err)
	}
	stream := tlsutil.NewStreamLayer(raftLn, advertise, tlsutil.NodeServerConfig(cert, pool), tlsutil.NodeClientConfig(cert, pool))
	node, err := cluster.Open(cluster.Config{
		NodeID:       nc.NodeID,
		RaftAddr:     nc.RaftAddr,
		Dir:          filepath.Join(f.dataDir, "raft"),
		StreamLayer:  stream,
		FSM:          state,
		Forwarder:    peers,
		Logger:       log.With("component", "cluster"),
		MaxStaleness: f.maxStaleness,
		// A destruction compacts every node's Raft log (snapshot, truncate,
		// rewrite raft.db) so no file keeps the destroyed material.
		CompactAfter: func(cmd *fsmpb.Command, res *fsmpb.Result) bool {
			// A KEK version removed from a node's HSM: its old blobs and
			// deliveries leave that node's files too.
			switch cmd.GetType() {
			case fsmpb.CommandType_COMMAND_TYPE_DESTROY_KEY, fsmpb.CommandType_COMMAND_TYPE_KEK_REMOVED:
				return res.GetCode() == fsmpb.ResultCode_RESULT_CODE_OK
			}
			return false
		},
		HeartbeatTimeout: f.heartbeat,
		ElectionTimeout:  f.election,
	})
	if err != nil {
		raftLn.Close()
		return err
	}
	defer node.Shutdown()
	if nc.Bootstrap {
		if err := node.Bootstrap(); err != nil {
			return err
		}
	}

	auditPath := filepath.Join(f.dataDir, "audit", "audit.log")
	auditLog, err := audit.Open(auditPath, audit.Options{Node: nc.NodeID, SyncInterval: f.auditSync})
	if err != nil {
		return fmt.Errorf("open the audit log (run `cabinet operator audit verify --file %s`): %w", auditPath, err)
	}
	defer auditLog.Close()
	srv := transport.NewServer(transport.Config{
		NodeID: nc.NodeID, APIAddr: nc.APIAddr, RaftAddr: nc.RaftAddr, Version: Version,
		Cluster: node, State: state, Crypto: engine, HSM: h, Peers: peers, Logger: log,
		MinRotationPeriod: f.minRotation, MinPendingWindow: f.minPending,
		Audit: auditLog, AuditPath: auditPath, RateLimit: f.rateLimit, RateBurst: f.rateBurst,
	})
	apiListen := nc.APIAddr
	if f.apiListen != "" {
		apiListen = f.apiListen
	}
	apiLn, err := net.Listen("tcp", apiListen)
	if err != nil {
		return fmt.Errorf("listen for the API on %s: %w", apiListen, err)
	}
	if f.maxConns > 0 {
		apiLn = netutil.LimitListener(apiLn, f.maxConns)
	}
	reg.MustRegister(newNodeCollector(node, engine, state, filepath.Join(f.dataDir, "raft")))
	reg.MustRegister(newGossipCollector(srv.GossipMembers))
	g := srv.NewGRPCServer(tlsutil.ServerConfig(cert, pool), transport.WithRPCMetrics(transport.NewRPCMetrics(reg)))
	if f.metricsAddr != "" {
		if err := serveMetrics(ctx, f.metricsAddr, reg, log.With("component", "metrics")); err != nil {
			apiLn.Close()
			return err
		}
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- g.Serve(apiLn) }()

	bg, cancelBG := context.WithCancel(ctx)
	defer cancelBG()
	go srv.WatchHealth(bg, time.Second)
	go node.RunLeaderLoop(bg, time.Second, srv.ProposeDue)
	go node.RunLeaderLoop(bg, time.Second, srv.ProposeKEKWork)   // KEK rotation: deliver, activate, re-wrap, retire
	go srv.RunKEKNodeDuties(bg, time.Second)                     // KEK rotation: install, remove from this HSM
	defer srv.StartGossip(bg, log, f.gossip.transport(), node)() // transport/gossip.go: memberlist, gossip key, dead-voter removal
	if _, err := os.Stat(filepath.Join(f.dataDir, initFile)); err == nil {
		go applyPendingInit(bg, log, node, state, f.dataDir)
	}
	if !nc.Bootstrap && !node.InConfiguration() {
		go requestMembership(bg, log, node, peers, nc.JoinAddrs)
	}
	log.Info("cabinet node running", "api_addr", nc.APIAddr, "raft_addr", nc.RaftAddr, "version", Version)

	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err := <-serveErr:
		log.Error("API server stopped", "err", err)
	}
	cancelBG()
	stopped := make(chan struct{})
	go func() { g.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		g.Stop()
	}
	return nil
}

// applyPendingInit proposes the InitCluster command that `operator init`
// left in the data dir, once this (bootstrapped) node leads, then removes
// the file. It is idempotent: the command carries a fixed request id.
func applyPendingInit(ctx context.Context, log *slog.Logger, node *cluster.Node, state *fsm.FSM, dataDir string) {
	path := filepath.Join(dataDir, initFile)
	data, err := os.ReadFile(path)
	if err != nil {
		log.Error("read pending init", "err", err)
		return
	}
	cmd, err := fsm.DecodeCommand(data)
	if err != nil {
		log.Error("pending init is corrupt; re-run `cabinet operator init` on a fresh data dir", "err", err)
		return
	}
	for ctx.Err() == nil {
		if state.Cluster() != nil {
			break
		}
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		res, err := node.Propose(pctx, cmd)
		cancel()
		if err == nil && (res.GetCode() == fsmpb.ResultCode_RESULT_CODE_OK || state.Cluster() != nil) {
			log.Info("cluster initialised", "cluster_id", state.Cluster().GetClusterId())
			break
		}
		if err == nil {
			log.Error("init command refused", "code", res.GetCode(), "message", res.GetMessage())
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(200 * time.Millisecond):
		}
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		log.Warn("remove pending init file", "err", err)
	}
}

// requestMembership asks existing members to add this admitted node to the
// Raft configuration until it is in.
func requestMembership(ctx context.Context, log *slog.Logger, node *cluster.Node, peers *transport.PeerClients, addrs []string) {
	if len(addrs) == 0 {
		log.Error("this node is not in the Raft configuration and knows no peer to ask; re-run `cabinet operator join`")
		return
	}
	queue := append([]string{}, addrs...)
	for i := 0; ctx.Err() == nil; i++ {
		if node.InConfiguration() {
			log.Info("this node is a member of the Raft configuration")
			return
		}
		addr := queue[i%len(queue)]
		cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		resp, err := peers.AddPeer(cctx, addr)
		cancel()
		switch {
		case err != nil:
			log.Warn("asking to be added to the cluster", "peer", addr, "err", err)
		case resp.GetAdded():
			log.Info("added to the Raft configuration", "via", addr)
		case resp.GetLeaderApiAddr() != "":
			queue = append(queue, resp.GetLeaderApiAddr())
			i = len(queue) - 2
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(500 * time.Millisecond):
		}
	}
}
