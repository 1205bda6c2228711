package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/internal/testport"
)

// Membership on real processes: a non-voter joins with a region, leadership
// moves on request, gossip reports a killed node dead, the node is removed
// and rejoins with one command, keeping its HSM identity and KEK.

type peerView struct {
	NodeID    string `json:"nodeId"`
	RaftRole  string `json:"raftRole"`
	Voter     bool   `json:"voter"`
	Region    string `json:"region"`
	Gossip    string `json:"gossip"`
	Version   string `json:"version"`
	HsmStatus string `json:"hsmStatus"`
	Reachable bool   `json:"reachable"`
	Level     uint32 `json:"featureLevel"`
}

func (c *testCluster) peers(via *node) (map[string]peerView, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, errOut, err := c.cli(ctx, nil, "operator", "list-peers", "-o", "json", "--addr", via.apiAddr, "--timeout", "8s")
	if err != nil {
		return nil, fmt.Errorf("%v: %s", err, strings.TrimSpace(errOut))
	}
	var resp struct {
		Peers []peerView `json:"peers"`
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil {
		return nil, err
	}
	m := map[string]peerView{}
	for _, p := range resp.Peers {
		m[p.NodeID] = p
	}
	return m, nil
}

// gossipPorts gives every node a Raft port whose derived gossip port (Raft
// port + 100, TCP and UDP) is free and used by no other node.
func (c *testCluster) gossipPorts(t *testing.T) {
	t.Helper()
	taken := map[string]bool{}
	for _, nd := range c.nodes {
		taken[nd.apiAddr] = true
	}
	for _, nd := range c.nodes {
		for attempt := 0; ; attempt++ {
			if attempt > 50 {
				t.Fatal("no Raft port with a free successor")
			}
			addr := freePort(t)
			host, port, _ := net.SplitHostPort(addr)
			p, _ := strconv.Atoi(port)
			next := net.JoinHostPort(host, strconv.Itoa(p+100))
			if taken[addr] || taken[next] || !tcpUDPFree(next) || !testport.Reserve(next) {
				continue
			}
			nd.raftAddr = addr
			taken[addr], taken[next] = true, true
			break
		}
	}
}

func tcpUDPFree(addr string) bool {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return false
	}
	defer ln.Close()
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return false
	}
	pc.Close()
	return true
}

func (c *testCluster) joinNodeArgs(nd, via *node, extra ...string) {
	c.t.Helper()
	token := strings.TrimSpace(c.mustCLI(nil, "operator", "join-token", "create", "--quiet", "--addr", via.apiAddr))
	args := append([]string{"operator", "join", "--token", token, "--peer", via.apiAddr, "--data-dir", nd.dataDir,
		"--node-id", nd.id, "--api-addr", nd.apiAddr, "--raft-addr", nd.raftAddr}, c.hsmFlags(nd)...)
	c.mustCLI(nil, append(args, extra...)...)
}

func (c *testCluster) waitPeers(via *node, timeout time.Duration, what string, cond func(map[string]peerView) error) {
	c.t.Helper()
	waitFor(c.t, timeout, what, func() error {
		ps, err := c.peers(via)
		if err != nil {
			return err
		}
		return cond(ps)
	})
}

func TestMembershipOnRealCluster(t *testing.T) {
	start := time.Now()
	c := newTestCluster(t, 4)
	c.gossipPorts(t)
	n1, n2, n3, n4 := c.nodes[0], c.nodes[1], c.nodes[2], c.nodes[3]
	c.initNode(n1)
	for _, nd := range c.nodes {
		c.start(nd)
	}
	c.waitHealthy(n1, 60*time.Second)
	c.joinNode(n2, n1)
	c.joinNode(n3, n1)
	c.joinNodeArgs(n4, n1, "--non-voter", "--region", "ap-south")
	for _, nd := range c.nodes {
		c.waitHealthy(nd, 60*time.Second)
	}
	c.mustCLI(nil, "key", "create", "--alias", "m", "--addr", n1.apiAddr)
	ct := strings.TrimSpace(c.mustCLI([]byte("kept across rejoin"), "key", "encrypt", "--key", "m", "--addr", n1.apiAddr))

	t.Logf("%s: %s", time.Since(start).Round(time.Millisecond), "formed")
	// list-peers: the replica is a non-voter in its region; gossip sees all.
	c.waitPeers(n2, 30*time.Second, "four members, all alive in gossip", func(ps map[string]peerView) error {
		if len(ps) != 4 {
			return fmt.Errorf("%d peers", len(ps))
		}
		for id, p := range ps {
			if p.Gossip != "alive" || !p.Reachable || p.HsmStatus != "ok" || p.Version == "" || p.Level != fsm.FeatureLevel {
				return fmt.Errorf("%s: %+v (want feature level %d)", id, p, fsm.FeatureLevel)
			}
		}
		if r := ps[n4.id]; r.Voter || r.Region != "ap-south" || r.RaftRole != "follower" {
			return fmt.Errorf("replica: %+v", r)
		}
		if !ps[n2.id].Voter {
			return fmt.Errorf("node2 is not a voter")
		}
		return nil
	})
	if out := c.mustCLI([]byte(ct), "key", "decrypt", "--addr", n4.apiAddr); out != "kept across rejoin" {
		t.Fatalf("replica decrypt = %q", out)
	}
	table := c.mustCLI(nil, "operator", "list-peers", "--addr", n1.apiAddr)
	for _, col := range []string{"REGION", "GOSSIP", "VERSION", "ap-south"} {
		if !strings.Contains(table, col) {
			t.Fatalf("list-peers table lacks %q:\n%s", col, table)
		}
	}

	t.Logf("%s: %s", time.Since(start).Round(time.Millisecond), "peers checked")
	// Leadership transfer, asked through a follower, to a named voter.
	leader, err := c.leader(c.nodes)
	if err != nil {
		t.Fatal(err)
	}
	target := n2
	if leader == n2 {
		target = n3
	}
	via := n1
	if leader == n1 {
		via = n4
	}
	out := c.mustCLI(nil, "operator", "transfer-leadership", "--to", target.id, "--addr", via.apiAddr)
	if !strings.Contains(out, target.id) {
		t.Fatalf("transfer-leadership said %q", out)
	}
	waitFor(t, 15*time.Second, target.id+" leads", func() error {
		st, err := c.status(target)
		if err != nil {
			return err
		}
		if st.RaftState != "leader" {
			return fmt.Errorf("%s is %s", target.id, st.RaftState)
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	if _, errOut, err := c.cli(ctx, nil, "operator", "transfer-leadership", "--to", n4.id, "--addr", target.apiAddr); err == nil || !strings.Contains(errOut, "non-voter") {
		t.Fatalf("transfer to a non-voter: err=%v stderr=%s", err, errOut)
	}
	cancel()

	t.Logf("%s: %s", time.Since(start).Round(time.Millisecond), "transferred")
	// Gossip reports a killed node dead; list-peers flags it.
	victim := n3
	if target == n3 {
		victim = n2
	}
	c.kill(victim)
	c.waitPeers(target, 30*time.Second, victim.id+" dead in gossip", func(ps map[string]peerView) error {
		if g := ps[victim.id].Gossip; g != "dead" {
			return fmt.Errorf("%s gossip %q", victim.id, g)
		}
		return nil
	})
	if table := c.mustCLI(nil, "operator", "list-peers", "--addr", target.apiAddr); !strings.Contains(table, "DEAD") {
		t.Fatalf("list-peers does not flag the dead node:\n%s", table)
	}

	t.Logf("%s: %s", time.Since(start).Round(time.Millisecond), "dead seen")
	// Remove it (through a follower) and bring it back with one command.
	c.mustCLI(nil, "operator", "remove", victim.id, "--addr", n4.apiAddr)
	c.waitPeers(target, 15*time.Second, victim.id+" gone", func(ps map[string]peerView) error {
		if _, ok := ps[victim.id]; ok || len(ps) != 3 {
			return fmt.Errorf("peers %v", ps)
		}
		return nil
	})
	token := strings.TrimSpace(c.mustCLI(nil, "operator", "join-token", "create", "--quiet", "--addr", target.apiAddr))
	ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
	if _, errOut, err := c.cli(ctx, []byte("no\n"), "operator", "rejoin", "--data-dir", victim.dataDir, "--token", token, "--peer", target.apiAddr); err == nil || !strings.Contains(errOut, "not confirmed") {
		t.Fatalf("rejoin without confirmation: err=%v stderr=%s", err, errOut)
	}
	cancel()
	t.Logf("%s: %s", time.Since(start).Round(time.Millisecond), "removed")
	c.mustCLI(nil, "operator", "rejoin", "--data-dir", victim.dataDir, "--token", token, "--peer", target.apiAddr, "--yes")
	c.start(victim)
	c.waitHealthy(victim, 60*time.Second)
	t.Logf("%s: %s", time.Since(start).Round(time.Millisecond), "rejoined healthy")
	c.waitPeers(target, 30*time.Second, victim.id+" back as a voter", func(ps map[string]peerView) error {
		p := ps[victim.id]
		if len(ps) != 4 || !p.Voter || p.Gossip != "alive" {
			return fmt.Errorf("%s: %+v", victim.id, p)
		}
		return nil
	})
	if out := c.mustCLI([]byte(ct), "key", "decrypt", "--addr", victim.apiAddr); out != "kept across rejoin" {
		t.Fatalf("rejoined node decrypt = %q", out)
	}

	// The removal made the leader replace the gossip key (the removed node
	// knew it): generation 2 everywhere, the old key dropped, the rejoined
	// node gossips with the new one. Then an operator rotation to 3.
	c.waitGossipKey(c.nodes, 2)
	out = c.mustCLI(nil, "operator", "gossip", "rotate-key", "--addr", n4.apiAddr)
	if !strings.Contains(out, "generation 3") {
		t.Fatalf("gossip rotate-key said %q", out)
	}
	c.waitGossipKey(c.nodes, 3)
	c.waitPeers(target, 30*time.Second, "everyone alive in gossip under key generation 3", func(ps map[string]peerView) error {
		for id, p := range ps {
			if p.Gossip != "alive" {
				return fmt.Errorf("%s gossip %q", id, p.Gossip)
			}
		}
		if len(ps) != 4 {
			return fmt.Errorf("%d peers", len(ps))
		}
		return nil
	})
	if st := c.mustCLI(nil, "operator", "status", "--addr", n1.apiAddr); !strings.Contains(st, "generation 3, in use") {
		t.Fatalf("operator status lacks the gossip key line:\n%s", st)
	}
	t.Logf("%s: %s", time.Since(start).Round(time.Millisecond), "gossip key rotated twice")
}

// waitGossipKey waits until every node's gossip encrypts with generation
// gen and holds no other key.
func (c *testCluster) waitGossipKey(nodes []*node, gen int) {
	c.t.Helper()
	for _, nd := range nodes {
		waitFor(c.t, 60*time.Second, fmt.Sprintf("%s on gossip key generation %d only", nd.id, gen), func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			out, errOut, err := c.cli(ctx, nil, "operator", "status", "-o", "json", "--addr", nd.apiAddr, "--timeout", "3s")
			if err != nil {
				return fmt.Errorf("%v: %s", err, strings.TrimSpace(errOut))
			}
			var st struct {
				Generation int `json:"gossipKeyGeneration"`
				InUse      int `json:"gossipKeyInUse"`
				Held       int `json:"gossipKeysHeld"`
			}
			if err := json.Unmarshal([]byte(out), &st); err != nil {
				return err
			}
			if st.Generation != gen || st.InUse != gen || st.Held != 1 {
				return fmt.Errorf("%+v", st)
			}
			return nil
		})
	}
}

// With --autoremove-dead-after the leader removes a dead voter of four (the
// voters stay at three); then two of the three voters are lost for good and
// the survivor is recovered with recover-quorum and serves the old keys alone.
func TestAutoremoveAndRecoverQuorum(t *testing.T) {
	t.Setenv("CABINET_AUTOREMOVE_DEAD_AFTER", "2s")
	c := newTestCluster(t, 4)
	c.gossipPorts(t)
	c.startThree(t) // all four, as voters
	n1, n2, n3, n4 := c.nodes[0], c.nodes[1], c.nodes[2], c.nodes[3]
	c.mustCLI(nil, "key", "create", "--alias", "q", "--addr", n1.apiAddr)
	ct := strings.TrimSpace(c.mustCLI([]byte("survives"), "key", "encrypt", "--key", "q", "--addr", n1.apiAddr))

	leader, err := c.leader(c.nodes)
	if err != nil {
		t.Fatal(err)
	}
	victim := n4
	if leader == n4 {
		victim = n3
	}
	c.waitPeers(leader, 30*time.Second, "gossip sees everyone", func(ps map[string]peerView) error {
		for id, p := range ps {
			if p.Gossip != "alive" {
				return fmt.Errorf("%s gossip %q", id, p.Gossip)
			}
		}
		return nil
	})
	c.kill(victim)
	c.waitPeers(leader, 40*time.Second, victim.id+" removed automatically", func(ps map[string]peerView) error {
		if _, ok := ps[victim.id]; ok || len(ps) != 3 {
			return fmt.Errorf("%d peers, %s gossip %q", len(ps), victim.id, ps[victim.id].Gossip)
		}
		return nil
	})

	// Lose two of the three remaining voters; keep a survivor.
	survivor := n1
	if victim == n1 {
		survivor = n2
	}
	var lost []*node
	for _, nd := range c.nodes {
		if nd != victim && nd != survivor {
			lost = append(lost, nd)
			c.kill(nd)
		}
	}
	c.stop(survivor)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, errOut, err := c.cli(ctx, nil, "operator", "recover-quorum", "--data-dir", survivor.dataDir); err == nil || !strings.Contains(errOut, "--yes-i-understand") {
		t.Fatalf("recover-quorum without confirmation: err=%v stderr=%s", err, errOut)
	}
	out, errOut, err := c.cli(ctx, nil, "operator", "recover-quorum", "--data-dir", survivor.dataDir, "--survivors", survivor.id, "--yes-i-understand")
	if err != nil {
		t.Fatalf("recover-quorum: %v\n%s\n%s", err, out, errOut)
	}
	if !strings.Contains(errOut, "drop   "+lost[0].id) || !strings.Contains(out, "cabinet operator remove "+lost[1].id) {
		t.Fatalf("recover-quorum output:\n%s\n%s", out, errOut)
	}
	c.start(survivor)
	c.waitHealthy(survivor, 60*time.Second)
	if got := c.mustCLI([]byte(ct), "key", "decrypt", "--addr", survivor.apiAddr); got != "survives" {
		t.Fatalf("decrypt after recovery = %q", got)
	}
	for _, nd := range lost {
		c.mustCLI(nil, "operator", "remove", nd.id, "--addr", survivor.apiAddr)
	}
	c.mustCLI(nil, "key", "create", "--alias", "after", "--addr", survivor.apiAddr)
}
