package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

// benchNode is one cluster member as bench saw it before the run.
type benchNode struct {
	NodeID  string `json:"node_id"`
	APIAddr string `json:"api_addr"`
	Role    string `json:"role"`
	Healthy bool   `json:"healthy"`
	Voter   bool   `json:"voter"`
}

// benchEnv is what every operation's setup and callers share: the
// connections the callers use (spread over the target nodes) and the keys
// made for the run.
type benchEnv struct {
	f         *benchFlags
	runID     string
	principal string // as the server will record it (role:name)
	tlsCfg    *tls.Config
	nodes     []benchNode
	targets   []benchNode

	meter *cpuMeter
	// local is the --local cluster (nil otherwise): failover kills and
	// restarts its processes.
	local *localCluster

	conns []*grpc.ClientConn
	kcs   []cabinetpb.KeyServiceClient
	ocs   []cabinetpb.OperatorServiceClient

	mu      sync.Mutex
	keys    map[string]string   // setup keys by purpose
	keySets map[string][]string // --keys working sets by purpose (bench_keys.go)
	prog    *benchProgress      // setup progress (--keys)
}

func (e *benchEnv) close() {
	for _, c := range e.conns {
		c.Close()
	}
}

// callerConn returns the index of caller i's connection.
func (e *benchEnv) callerConn(i int) int { return i % len(e.conns) }

// setupKC is the client used to prepare keys: the first target.
func (e *benchEnv) setupKC() cabinetpb.KeyServiceClient { return e.kcs[0] }

func (e *benchEnv) clusterInfo() benchCluster {
	ci := benchCluster{Nodes: e.nodes}
	for _, t := range e.targets {
		ci.Targets = append(ci.Targets, t)
	}
	return ci
}

func benchDial(addr string, cfg *tls.Config) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(credentials.NewTLS(cfg.Clone())),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20), grpc.MaxCallSendMsgSize(64<<20)))
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", addr, err)
	}
	return conn, nil
}

// connectBench discovers the cluster from --addr, picks the target nodes and
// opens the callers' connections.
func connectBench(ctx context.Context, f *benchFlags, prog *benchProgress, nodePIDs []int) (*benchEnv, error) {
	cf := &clientFlags{caCert: f.caCert, clientCert: f.clientCert, clientKey: f.clientKey}
	cfg, err := cf.tlsConfig()
	if err != nil {
		return nil, err
	}
	env := &benchEnv{f: f, runID: benchRunID(), tlsCfg: cfg, keys: map[string]string{}, keySets: map[string][]string{}, prog: prog}
	if leaf, err := x509.ParseCertificate(cfg.Certificates[0].Certificate[0]); err == nil {
		id := tlsutil.IdentityFromCert(leaf)
		env.principal = id.Role + ":" + id.Name
	}
	if len(f.addrs) == 0 {
		return nil, errors.New("no --addr given (or use --local)")
	}
	prog.logf("discovering the cluster from %s", strings.Join(f.addrs, ", "))
	env.nodes, err = discoverNodes(ctx, f, cfg)
	if err != nil {
		return nil, err
	}
	env.targets, err = pickTargets(f.target, env.nodes)
	if err != nil {
		return nil, err
	}
	env.meter = newCPUMeter(env.nodes, nodePIDs)
	n := max(f.connections, len(env.targets))
	for i := 0; i < n; i++ {
		conn, err := benchDial(env.targets[i%len(env.targets)].APIAddr, cfg)
		if err != nil {
			env.close()
			return nil, err
		}
		env.conns = append(env.conns, conn)
		env.kcs = append(env.kcs, cabinetpb.NewKeyServiceClient(conn))
		env.ocs = append(env.ocs, cabinetpb.NewOperatorServiceClient(conn))
	}
	var names []string
	for _, t := range env.targets {
		names = append(names, fmt.Sprintf("%s %s (%s)", t.NodeID, t.APIAddr, t.Role))
	}
	prog.logf("target: %s; %d connections, %d callers", strings.Join(names, ", "), len(env.conns), f.concurrency)
	return env, nil
}

// discoverNodes asks the first node that answers for the member list, then
// every member for its own status (role and health).
func discoverNodes(ctx context.Context, f *benchFlags, cfg *tls.Config) ([]benchNode, error) {
	status := func(addr string) (*cabinetpb.StatusResponse, error) {
		conn, err := benchDial(addr, cfg)
		if err != nil {
			return nil, err
		}
		defer conn.Close()
		c, cancel := context.WithTimeout(ctx, f.timeout)
		defer cancel()
		return cabinetpb.NewOperatorServiceClient(conn).Status(c, &cabinetpb.StatusRequest{})
	}
	var addrs []string
	var lastErr error
	for _, a := range f.addrs {
		conn, err := benchDial(a, cfg)
		if err != nil {
			lastErr = err
			continue
		}
		c, cancel := context.WithTimeout(ctx, f.timeout)
		lp, err := cabinetpb.NewOperatorServiceClient(conn).ListPeers(c, &cabinetpb.ListPeersRequest{})
		cancel()
		conn.Close()
		if err != nil {
			lastErr = fmt.Errorf("list peers at %s: %w", a, rpcError(err))
			continue
		}
		for _, p := range lp.GetPeers() {
			if p.GetApiAddr() != "" {
				addrs = append(addrs, p.GetApiAddr())
			}
		}
		break
	}
	if len(addrs) == 0 {
		if lastErr != nil && len(f.addrs) == 1 {
			return nil, lastErr
		}
		addrs = f.addrs // no member list: bench the addresses given
	}
	var nodes []benchNode
	for _, a := range addrs {
		st, err := status(a)
		if err != nil {
			nodes = append(nodes, benchNode{APIAddr: a, Role: "unreachable"})
			lastErr = fmt.Errorf("status of %s: %w", a, rpcError(err))
			continue
		}
		nodes = append(nodes, benchNode{NodeID: st.GetNodeId(), APIAddr: a, Role: st.GetRaftState(), Healthy: st.GetHealthy(), Voter: st.GetVoter()})
	}
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].NodeID < nodes[j].NodeID })
	for _, n := range nodes {
		if n.Role != "unreachable" {
			return nodes, nil
		}
	}
	return nil, fmt.Errorf("no node answered: %w", lastErr)
}

func pickTargets(target string, nodes []benchNode) ([]benchNode, error) {
	var out []benchNode
	switch target {
	case "leader", "follower":
		for _, n := range nodes {
			if n.Role == target && (n.Healthy || target == "leader") {
				return []benchNode{n}, nil
			}
		}
		return nil, fmt.Errorf("--target %s: no healthy node reports itself %s (nodes: %s)", target, target, describeNodes(nodes))
	case "all":
		for _, n := range nodes {
			if n.Healthy {
				out = append(out, n)
			}
		}
		if len(out) == 0 {
			return nil, fmt.Errorf("--target all: no healthy node (nodes: %s)", describeNodes(nodes))
		}
		return out, nil
	}
	if _, _, err := net.SplitHostPort(target); err != nil {
		return nil, fmt.Errorf("--target must be leader, follower, all or host:port, not %q", target)
	}
	for _, n := range nodes {
		if n.APIAddr == target {
			return []benchNode{n}, nil
		}
	}
	return []benchNode{{APIAddr: target, Role: "unknown"}}, nil
}

func describeNodes(nodes []benchNode) string {
	var s []string
	for _, n := range nodes {
		h := ""
		if !n.Healthy {
			h = ", unhealthy"
		}
		s = append(s, fmt.Sprintf("%s %s %s%s", n.NodeID, n.APIAddr, n.Role, h))
	}
	return strings.Join(s, "; ")
}
