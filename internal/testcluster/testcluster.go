// Package testcluster runs an in-process Cabinet cluster for tests and
// runnable examples: N nodes, each with the real fsm, keyops engine, Raft
// node (hashicorp/raft over the TLS stream layer on 127.0.0.1, raft-boltdb
// in a temporary directory) and the real gRPC API with mutual TLS, backed by
// in-memory HSM providers (hsm.NewMemory) that share one cluster KEK,
// transferred from node 1's provider to the others by RSA-OAEP wrapping as
// in `cabinet operator join`.
//
// It assembles the pieces the way cmd/cabinet's `operator init`, `operator
// join` and `server` do, without the join RPC: the CA, node certificates
// and an admin client certificate are made directly; node 1 bootstraps
// Raft and applies InitCluster; the others are admitted with join-token
// commands and added as voters. Auditing is off (transport.Config.Audit is
// nil) and the leader loop (rotation, destruction) runs as on a server.
//
//	tc := testcluster.Start(t, testcluster.Config{})
//	c, _ := client.New(tc.Endpoints(), client.WithTLSFiles(tc.CAFile(), tc.AdminCertFile(), tc.AdminKeyFile()))
package testcluster

import (
	"context"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/keyops"
	"github.com/cabinet-kms/cabinet/transport"
	"github.com/cabinet-kms/cabinet/transport/audit"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

// Config configures a cluster; the zero value is a 3-node cluster.
type Config struct {
	// Nodes is the number of nodes (default 3).
	Nodes int
	// MaxStaleness is how long a follower serves crypto without a fresh
	// from the leader (default 2s, as on a server).
	MaxStaleness time.Duration
	// Logger receives every node's logs (default: discarded).
	Logger *slog.Logger
	// Dir is where data and credentials go (default: a new temporary
	// directory that Close removes).
	Dir string
	// APIAddr, when set, is node 1's API address (an IP literal; it goes
	// into the node certificate). Default: a free port on 127.0.0.1.
	APIAddr string
	// Audit gives every node a hash-chained audit log in its directory, as
	// a server has (default off: tests that do not look at it save the I/O).
	Audit bool
}

// Cluster is a running in-process cluster. Its methods are safe for
// concurrent use.
type Cluster struct {
	cfg       Config
	dir       string
	removeDir bool
	clusterID string
	ca        *tlsutil.CA
	log       *slog.Logger

	caFile, adminCert, adminKey string
	adminTLS                    *tls.Config

	mu     sync.Mutex
	nodes  []*node
	closed bool
}

// node is one member; run is nil while it is stopped.
type node struct {
	id        string
	dir       string
	apiAddr   string
	raftAddr  string
	hsm       *hsm.Memory
	cert      tls.Certificate
	pub       *rsa.PublicKey
	pubDER    []byte
	run       *running
	listeners [2]net.Listener // reserved ports until the first start
}

// running is what Stop tears down.
type running struct {
	fsm    *fsm.FSM
	raft   *cluster.Node
	grpc   *grpc.Server
	peers  *transport.PeerClients
	cancel context.CancelFunc
	wg     sync.WaitGroup
	audit  *audit.Log
}

// Start starts a cluster and waits until every node is healthy; it fails tb
// on error and closes the cluster in tb.Cleanup.
func Start(tb testing.TB, cfg Config) *Cluster {
	tb.Helper()
	if cfg.Dir == "" {
		cfg.Dir = tb.TempDir()
	}
	c, err := New(cfg)
	if err != nil {
		tb.Fatalf("testcluster: %v", err)
	}
	tb.Cleanup(c.Close)
	return c
}

// New starts a cluster and waits until every node is healthy. For TestMain
// (no testing.TB): call Close when done.
func New(cfg Config) (_ *Cluster, err error) {
	if cfg.Nodes == 0 {
		cfg.Nodes = 3
	}
	if cfg.MaxStaleness == 0 {
		cfg.MaxStaleness = cluster.DefaultMaxStaleness
	}
	c := &Cluster{cfg: cfg, dir: cfg.Dir, clusterID: "c-test", log: cfg.Logger}
	if c.log == nil {
		c.log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if c.dir == "" {
		if c.dir, err = os.MkdirTemp("", "cabinet-testcluster-"); err != nil {
			return nil, err
		}
		c.removeDir = true
	}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	if err := c.makeCredentials(cfg.Nodes); err != nil {
		return nil, err
	}
	if err := c.shareKEK(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := c.form(ctx); err != nil {
		return nil, err
	}
	if err := c.WaitHealthy(ctx); err != nil {
		return nil, err
	}
	return c, nil
}

// makeCredentials creates the CA, the admin's files, and each node's
// addresses (reserved ports on 127.0.0.1), certificate and HSM.
func (c *Cluster) makeCredentials(n int) error {
	now := time.Now()
	ca, err := tlsutil.NewCA(c.clusterID, now)
	if err != nil {
		return err
	}
	c.ca = ca
	adminDir := filepath.Join(c.dir, "admin")
	if err := os.MkdirAll(adminDir, 0o700); err != nil {
		return err
	}
	der, key, err := ca.IssueClient("admin", tlsutil.RoleAdmin, now)
	if err != nil {
		return err
	}
	c.caFile, c.adminCert, c.adminKey = filepath.Join(adminDir, "ca.pem"), filepath.Join(adminDir, "admin.pem"), filepath.Join(adminDir, "admin-key.pem")
	if err := tlsutil.WriteCertPEM(c.caFile, ca.CertDER); err != nil {
		return err
	}
	if err := tlsutil.WriteCertPEM(c.adminCert, der); err != nil {
		return err
	}
	if err := tlsutil.WriteKeyPEM(c.adminKey, key); err != nil {
		return err
	}
	adminPair, err := tlsutil.KeyPair(key, der)
	if err != nil {
		return err
	}
	c.adminTLS = tlsutil.ClientConfig(adminPair, ca.Pool())

	for i := 1; i <= n; i++ {
		nd := &node{id: fmt.Sprintf("node%d", i), dir: filepath.Join(c.dir, fmt.Sprintf("node%d", i)), hsm: hsm.NewMemory()}
		c.nodes = append(c.nodes, nd)
		ips := []net.IP{net.ParseIP("127.0.0.1")}
		for j := range nd.listeners {
			addr := "127.0.0.1:0"
			if i == 1 && j == 0 && c.cfg.APIAddr != "" {
				addr = c.cfg.APIAddr
				host, _, err := net.SplitHostPort(addr)
				if err != nil || net.ParseIP(host) == nil {
					return fmt.Errorf("API address %q must be IP:port", addr)
				}
				ips = append(ips, net.ParseIP(host))
			}
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return err
			}
			nd.listeners[j] = ln
		}
		nd.apiAddr, nd.raftAddr = nd.listeners[0].Addr().String(), nd.listeners[1].Addr().String()
		key, csr, err := tlsutil.NewNodeKey(nd.id)
		if err != nil {
			return err
		}
		der, err := ca.IssueNode(csr, nd.id, ips, now)
		if err != nil {
			return err
		}
		if nd.cert, err = tlsutil.KeyPair(key, der, ca.CertDER); err != nil {
			return err
		}
	}
	return nil
}

// shareKEK gives every node an HSM identity key, generates KEK version 1
// in node 1's HSM and transfers it to the others wrapped under their
// identity keys, as `operator join` does.
func (c *Cluster) shareKEK() error {
	ctx := context.Background()
	errs := make([]error, len(c.nodes))
	var wg sync.WaitGroup
	for i, nd := range c.nodes {
		wg.Go(func() { // RSA-3072 generation takes a while: in parallel
			pub, err := nd.hsm.EnsureIdentity(ctx)
			if err == nil {
				nd.pub = pub
				nd.pubDER, err = x509.MarshalPKIXPublicKey(pub)
			}
			errs[i] = err
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("HSM identities: %w", err)
	}
	first := c.nodes[0].hsm
	if _, err := first.GenerateKEK(ctx, 1); err != nil {
		return err
	}
	for _, nd := range c.nodes[1:] {
		wrapped, err := first.WrapKEK(ctx, 1, nd.pub)
		if err != nil {
			return fmt.Errorf("wrap the KEK for %s: %w", nd.id, err)
		}
		if _, err := nd.hsm.UnwrapKEK(ctx, 1, wrapped); err != nil {
			return fmt.Errorf("unwrap the KEK in %s: %w", nd.id, err)
		}
	}
	return nil
}

// form starts node 1, bootstraps Raft, applies InitCluster, then admits
// and adds every other node.
func (c *Cluster) form(ctx context.Context) error {
	first := c.nodes[0]
	if err := c.start(first); err != nil {
		return err
	}
	if err := first.run.raft.Bootstrap(); err != nil {
		return err
	}
	if err := poll(ctx, "node1 to lead", func() error {
		if !first.run.raft.IsLeader() {
			return errors.New("not leader yet")
		}
		return nil
	}); err != nil {
		return err
	}
	caKey, err := c.ca.KeyPKCS8()
	if err != nil {
		return err
	}
	sealedCA, err := first.hsm.Seal(ctx, 1, caKey, transport.CAKeyAAD(c.clusterID))
	clear(caKey)
	if err != nil {
		return err
	}
	kcv, err := first.hsm.KEKCheckValue(ctx, 1)
	if err != nil {
		return err
	}
	if err := c.propose(ctx, first, fsmpb.CommandType_COMMAND_TYPE_INIT_CLUSTER, &fsmpb.InitCluster{
		ClusterId: c.clusterID,
		CaCertDer: c.ca.CertDER,
		CaKey:     &fsmpb.WrappedBlob{KekVersion: 1, Blob: sealedCA},
		Kek:       &fsmpb.KEKVersion{Version: 1, CheckValue: kcv, CreatedUnixNano: time.Now().UnixNano(), State: fsmpb.KEKState_KEK_STATE_ACTIVE},
		FirstNode: &fsmpb.NodeRecord{NodeId: first.id, ApiAddr: first.apiAddr, RaftAddr: first.raftAddr, IdentityPublicKeyDer: first.pubDER, Voter: true,
			FeatureLevel: fsm.FeatureLevel},
	}, "init/"+c.clusterID); err != nil {
		return err
	}
	for _, nd := range c.nodes[1:] {
		tok, err := cluster.NewJoinToken(tlsutil.Fingerprint(c.ca.CertDER))
		if err != nil {
			return err
		}
		if err := c.propose(ctx, first, fsmpb.CommandType_COMMAND_TYPE_CREATE_JOIN_TOKEN, &fsmpb.CreateJoinToken{
			TokenId: tok.ID, SecretHash: tok.SecretHash(), ExpiresUnixNano: time.Now().Add(time.Hour).UnixNano(),
		}, "token/"+nd.id); err != nil {
			return err
		}
		if err := c.propose(ctx, first, fsmpb.CommandType_COMMAND_TYPE_ADMIT_NODE, &fsmpb.AdmitNode{
			TokenId: tok.ID, SecretHash: tok.SecretHash(),
			Node: &fsmpb.NodeRecord{NodeId: nd.id, ApiAddr: nd.apiAddr, RaftAddr: nd.raftAddr, IdentityPublicKeyDer: nd.pubDER, Voter: true,
				FeatureLevel: fsm.FeatureLevel},
		}, "admit/"+nd.id); err != nil {
			return err
		}
		if err := c.start(nd); err != nil {
			return err
		}
		if err := first.run.raft.AddVoter(ctx, nd.id, nd.raftAddr); err != nil {
			return fmt.Errorf("add %s as a voter: %w", nd.id, err)
		}
	}
	return nil
}

func (c *Cluster) propose(ctx context.Context, via *node, typ fsmpb.CommandType, payload proto.Message, reqID string) error {
	cmd, err := fsm.NewCommand(typ, payload, reqID, "admin:testcluster")
	if err != nil {
		return err
	}
	res, err := via.run.raft.Propose(ctx, cmd)
	if err != nil {
		return fmt.Errorf("propose %v: %w", typ, err)
	}
	if res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
		return fmt.Errorf("propose %v: %v %s", typ, res.GetCode(), res.GetMessage())
	}
	return nil
}

// listen reuses the port reserved at creation the first time, then listens
// on the same address again (Restart).
func (nd *node) listen(i int, addr string) (net.Listener, error) {
	if ln := nd.listeners[i]; ln != nil {
		nd.listeners[i] = nil
		return ln, nil
	}
	return net.Listen("tcp", addr)
}

// start opens a node's state, Raft and API as runServer does.
func (c *Cluster) start(nd *node) (err error) {
	log := c.log.With("node", nd.id)
	pool := c.ca.Pool()
	state := fsm.New(fsm.Config{Logger: log.With("component", "fsm")})
	engine, err := keyops.New(keyops.Config{Sealer: nd.hsm})
	if err != nil {
		return err
	}
	state.OnRestore(engine.Purge)
	state.OnApply(func(_ uint64, cmd *fsmpb.Command, res *fsmpb.Result) {
		if res.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
			return
		}
		if id := res.GetKey().GetKeyId(); id != "" && cmd.GetType() != fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY {
			engine.Forget(id)
		}
	})
	r := &running{fsm: state, peers: transport.NewPeerClients(tlsutil.ClientConfig(nd.cert, pool))}
	defer func() {
		if err != nil {
			r.stop()
		}
	}()
	raftLn, err := nd.listen(1, nd.raftAddr)
	if err != nil {
		return fmt.Errorf("%s: listen for Raft: %w", nd.id, err)
	}
	stream := tlsutil.NewStreamLayer(raftLn, raftLn.Addr(), tlsutil.NodeServerConfig(nd.cert, pool), tlsutil.NodeClientConfig(nd.cert, pool))
	r.raft, err = cluster.Open(cluster.Config{
		NodeID: nd.id, RaftAddr: nd.raftAddr, Dir: filepath.Join(nd.dir, "raft"),
		StreamLayer: stream, FSM: state, Forwarder: r.peers, Logger: log.With("component", "cluster"),
		MaxStaleness: c.cfg.MaxStaleness,
		CompactAfter: func(cmd *fsmpb.Command, res *fsmpb.Result) bool {
			return cmd.GetType() == fsmpb.CommandType_COMMAND_TYPE_DESTROY_KEY && res.GetCode() == fsmpb.ResultCode_RESULT_CODE_OK
		},
		// The server's defaults: shorter timeouts make elections flap when
		// -race tests share a busy machine.
		HeartbeatTimeout: time.Second, ElectionTimeout: time.Second, LeaderLeaseTimeout: 500 * time.Millisecond,
	})
	if err != nil {
		raftLn.Close()
		return fmt.Errorf("%s: %w", nd.id, err)
	}
	tcfg := transport.Config{
		NodeID: nd.id, APIAddr: nd.apiAddr, RaftAddr: nd.raftAddr, Version: "testcluster",
		Cluster: r.raft, State: state, Crypto: engine, HSM: nd.hsm, Peers: r.peers, Logger: log,
	}
	if c.cfg.Audit {
		tcfg.AuditPath = filepath.Join(nd.dir, "audit", "audit.log")
		if r.audit, err = audit.Open(tcfg.AuditPath, audit.Options{Node: nd.id}); err != nil {
			return fmt.Errorf("%s: audit log: %w", nd.id, err)
		}
		tcfg.Audit = r.audit
	}
	srv := transport.NewServer(tcfg)
	apiLn, err := nd.listen(0, nd.apiAddr)
	if err != nil {
		return fmt.Errorf("%s: listen for the API: %w", nd.id, err)
	}
	r.grpc = srv.NewGRPCServer(tlsutil.ServerConfig(nd.cert, pool))
	bg, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	r.wg.Go(func() { _ = r.grpc.Serve(apiLn) })
	r.wg.Go(func() { srv.WatchHealth(bg, 200*time.Millisecond) })
	r.wg.Go(func() { r.raft.RunLeaderLoop(bg, time.Second, srv.ProposeDue) })
	r.wg.Go(func() { r.raft.RunLeaderLoop(bg, time.Second, srv.ProposeKEKWork) })
	r.wg.Go(func() { srv.RunKEKNodeDuties(bg, 200*time.Millisecond) })
	nd.run = r
	return nil
}

// stop ends the API at once (open calls fail as if the process died), then
// Raft; safe on a partly started node.
func (r *running) stop() {
	if r.grpc != nil {
		r.grpc.Stop()
	}
	if r.cancel != nil {
		r.cancel()
	}
	if r.raft != nil {
		_ = r.raft.Shutdown()
	}
	r.wg.Wait()
	r.peers.Close()
	if r.audit != nil {
		r.audit.Close()
	}
}

// Endpoints returns the API addresses of every node, node 1 first.
func (c *Cluster) Endpoints() []string {
	out := make([]string, len(c.nodes))
	for i, nd := range c.nodes {
		out[i] = nd.apiAddr
	}
	return out
}

// Endpoint returns node i's API address (0-based).
func (c *Cluster) Endpoint(i int) string { return c.nodes[i].apiAddr }

// CAFile is the cluster CA certificate (PEM).
func (c *Cluster) CAFile() string { return c.caFile }

// AdminCertFile is the admin client certificate (PEM).
func (c *Cluster) AdminCertFile() string { return c.adminCert }

// AdminKeyFile is the admin client key (PEM, mode 0600).
func (c *Cluster) AdminKeyFile() string { return c.adminKey }

// Env returns the CLI's environment for this cluster as KEY=value pairs:
// CABINET_ADDR (every endpoint, comma-separated), CABINET_CACERT,
// CABINET_CLIENT_CERT and CABINET_CLIENT_KEY.
func (c *Cluster) Env() []string {
	return []string{
		"CABINET_ADDR=" + strings.Join(c.Endpoints(), ","),
		"CABINET_CACERT=" + c.caFile,
		"CABINET_CLIENT_CERT=" + c.adminCert,
		"CABINET_CLIENT_KEY=" + c.adminKey,
	}
}

// Leader returns the index of the node that leads now, or -1.
func (c *Cluster) Leader() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, nd := range c.nodes {
		if nd.run != nil && nd.run.raft.IsLeader() {
			return i
		}
	}
	return -1
}

// Stop stops node i (0-based) abruptly: its API closes every connection,
// then its Raft node shuts down. Its data and HSM are kept for Restart.
func (c *Cluster) Stop(i int) {
	c.mu.Lock()
	nd := c.nodes[i]
	r := nd.run
	nd.run = nil
	c.mu.Unlock()
	if r != nil {
		r.stop()
	}
}

// Restart starts a stopped node i again on the same addresses and data.
// It does not wait for health; see WaitHealthy.
func (c *Cluster) Restart(i int) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errors.New("testcluster: closed")
	}
	nd := c.nodes[i]
	if nd.run != nil {
		return fmt.Errorf("testcluster: %s is running", nd.id)
	}
	return c.start(nd)
}

// WaitHealthy waits until every running node reports healthy through the
// API (Status with the admin certificate: KEK verified, leader contact
// fresh) and all of them applied the same index.
func (c *Cluster) WaitHealthy(ctx context.Context) error {
	conns := map[string]*grpc.ClientConn{}
	defer func() {
		for _, cc := range conns {
			cc.Close()
		}
	}()
	return poll(ctx, "a healthy cluster", func() error {
		c.mu.Lock()
		var addrs []string
		for _, nd := range c.nodes {
			if nd.run != nil {
				addrs = append(addrs, nd.apiAddr)
			}
		}
		c.mu.Unlock()
		var applied []uint64
		for _, a := range addrs {
			cc, ok := conns[a]
			if !ok {
				var err error
				if cc, err = grpc.NewClient(a, grpc.WithTransportCredentials(credentials.NewTLS(c.adminTLS))); err != nil {
					return err
				}
				conns[a] = cc
			}
			sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			st, err := cabinetpb.NewOperatorServiceClient(cc).Status(sctx, &cabinetpb.StatusRequest{})
			cancel()
			if err != nil {
				return fmt.Errorf("%s: %w", a, err)
			}
			if !st.GetHealthy() {
				return fmt.Errorf("%s (%s) unhealthy: %v", a, st.GetNodeId(), st.GetUnhealthyReasons())
			}
			applied = append(applied, st.GetAppliedIndex())
		}
		for _, idx := range applied[1:] {
			if idx != applied[0] {
				return fmt.Errorf("applied indexes differ: %v", applied)
			}
		}
		return nil
	})
}

// Close stops every node and removes the directory New created.
func (c *Cluster) Close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	nodes := c.nodes
	c.mu.Unlock()
	var wg sync.WaitGroup
	for i := range nodes {
		wg.Go(func() { c.Stop(i) })
	}
	wg.Wait()
	for _, nd := range nodes {
		for _, ln := range nd.listeners {
			if ln != nil {
				ln.Close()
			}
		}
		nd.hsm.Close()
	}
	if c.removeDir {
		os.RemoveAll(c.dir)
	}
}

// poll calls cond every 25ms until it returns nil or ctx ends.
func poll(ctx context.Context, what string, cond func() error) error {
	var last error
	for {
		if last = cond(); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("testcluster: timed out waiting for %s: %w", what, last)
		case <-time.After(25 * time.Millisecond):
		}
	}
}
