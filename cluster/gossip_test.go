package cluster

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// freeGossipAddr returns a 127.0.0.1 port free for both TCP and UDP.
func freeGossipAddr(t *testing.T) string {
	t.Helper()
	for range 20 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		pc, err := net.ListenPacket("udp", addr)
		ln.Close()
		if err == nil {
			pc.Close()
			return addr
		}
	}
	t.Fatal("no free TCP+UDP port")
	return ""
}

func startTestGossip(t *testing.T, id string, key []byte) (*Gossip, string) {
	t.Helper()
	addr := freeGossipAddr(t)
	g, err := StartGossip(GossipConfig{NodeID: id, BindAddr: addr, Key: key, ClusterID: "c-test", Fast: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = g.Shutdown() })
	return g, addr
}

func TestGossipDetectsDeadMember(t *testing.T) {
	key := bytes.Repeat([]byte{7}, 32)
	g1, a1 := startTestGossip(t, "node1", key)
	g2, _ := startTestGossip(t, "node2", key)
	g3, _ := startTestGossip(t, "node3", key)
	for _, g := range []*Gossip{g2, g3} {
		if _, err := g.Join([]string{a1}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, "everyone alive", func() error {
		for _, id := range []string{"node2", "node3"} {
			if h := g1.Health(id); h != GossipAlive {
				return fmt.Errorf("%s is %s", id, h)
			}
		}
		if h := g3.Health("node2"); h != GossipAlive {
			return fmt.Errorf("node3 sees node2 %s", h)
		}
		return nil
	})
	if h := g1.Health("nobody"); h != GossipUnknown {
		t.Fatalf("unknown member health = %s", h)
	}
	_ = g3.Shutdown() // a crash: no leave message
	waitFor(t, 20*time.Second, "node3 dead", func() error {
		if h := g1.Health("node3"); h != GossipDead {
			return fmt.Errorf("node3 is %s", h)
		}
		return nil
	})
	if _, dead := g1.DeadSince("node3"); !dead {
		t.Fatal("DeadSince(node3) = false")
	}
	if _, dead := g1.DeadSince("node2"); dead {
		t.Fatal("DeadSince(node2) = true")
	}
}

// Only holders of the key gossip: a member with another key cannot join.
func TestGossipRefusesWrongKey(t *testing.T) {
	g1, a1 := startTestGossip(t, "node1", bytes.Repeat([]byte{1}, 32))
	g2, _ := startTestGossip(t, "intruder", bytes.Repeat([]byte{2}, 32))
	if _, err := g2.Join([]string{a1}); err == nil {
		t.Fatal("join with the wrong key succeeded")
	}
	if h := g1.Health("intruder"); h != GossipUnknown {
		t.Fatalf("intruder health = %s", h)
	}
	if _, err := StartGossip(GossipConfig{NodeID: "n", BindAddr: freeGossipAddr(t), Key: []byte("short")}); err == nil {
		t.Fatal("a short key was accepted")
	}
}

// A rotation as transport drives it: every member adds the new key, then
// switches to it, then drops the old one. Members stay alive throughout, a
// holder of only the old key is refused afterwards, and the keyring does
// not depend on the caller's buffer (callers clear theirs).
func TestGossipKeyRotation(t *testing.T) {
	k1, k2 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)
	g1, a1 := startTestGossip(t, "node1", k1)
	g2, _ := startTestGossip(t, "node2", k1)
	if _, err := g2.Join([]string{a1}); err != nil {
		t.Fatal(err)
	}
	bothAlive := func(what string) {
		t.Helper()
		waitFor(t, 10*time.Second, what, func() error {
			if h := g1.Health("node2"); h != GossipAlive {
				return fmt.Errorf("node1 sees node2 %s", h)
			}
			if h := g2.Health("node1"); h != GossipAlive {
				return fmt.Errorf("node2 sees node1 %s", h)
			}
			return nil
		})
	}
	bothAlive("both alive under k1")
	for _, g := range []*Gossip{g1, g2} {
		buf := bytes.Clone(k2)
		if err := g.AddKey(buf); err != nil {
			t.Fatal(err)
		}
		clear(buf)
		if g.KeyCount() != 2 || g.IsPrimary(k2) {
			t.Fatalf("after AddKey: %d keys, k2 primary %v", g.KeyCount(), g.IsPrimary(k2))
		}
	}
	buf := bytes.Clone(k2)
	if err := g1.UseKey(buf); err != nil {
		t.Fatal(err)
	}
	clear(buf)
	if !g1.IsPrimary(k2) {
		t.Fatal("UseKey did not make k2 primary (or kept the caller's cleared buffer)")
	}
	// node1 encrypts with k2, node2 still with k1: both decrypt both.
	g3, _ := startTestGossip(t, "node3", k2)
	if _, err := g3.Join([]string{a1}); err != nil {
		t.Fatalf("a k2 member cannot join node1 during the switch: %v", err)
	}
	if err := g2.UseKey(k2); err != nil {
		t.Fatal(err)
	}
	for _, g := range []*Gossip{g1, g2} {
		if n, err := g.DropOldKeys(); err != nil || n != 1 || g.KeyCount() != 1 || !g.IsPrimary(k2) {
			t.Fatalf("DropOldKeys: removed %d, %v; %d keys left", n, err, g.KeyCount())
		}
	}
	bothAlive("both alive under k2 only")
	waitFor(t, 10*time.Second, "node2 sees node3", func() error {
		if h := g2.Health("node3"); h != GossipAlive {
			return fmt.Errorf("node3 is %s", h)
		}
		return nil
	})
	// Several rotations in a row (keys 3, 4, 5 while 2 is primary): one
	// DropOldKeys leaves only the last.
	for i := byte(3); i <= 5; i++ {
		if err := g1.AddKey(bytes.Repeat([]byte{i}, 32)); err != nil {
			t.Fatal(err)
		}
	}
	k5 := bytes.Repeat([]byte{5}, 32)
	if err := g1.UseKey(k5); err != nil {
		t.Fatal(err)
	}
	if n, err := g1.DropOldKeys(); err != nil || n != 3 || g1.KeyCount() != 1 || !g1.IsPrimary(k5) {
		t.Fatalf("DropOldKeys of 4 keys: removed %d, %v; %d keys left", n, err, g1.KeyCount())
	}
	if err := g1.UseKey(k2); err != nil { // back to the members' key
		t.Fatal(err)
	}
	old, _ := startTestGossip(t, "stale", k1)
	if _, err := old.Join([]string{a1}); err == nil {
		t.Fatal("a member holding only the dropped key joined")
	}
	if h := g1.Health("stale"); h != GossipUnknown {
		t.Fatalf("stale member health = %s", h)
	}
}

func TestDeriveGossipAddr(t *testing.T) {
	got, err := DeriveGossipAddr("10.0.0.1:7201")
	if err != nil || got != "10.0.0.1:7301" {
		t.Fatalf("got %q, %v", got, err)
	}
	if _, err := DeriveGossipAddr("10.0.0.1"); err == nil {
		t.Fatal("address without port accepted")
	}
}

func TestSafeToRemoveVoter(t *testing.T) {
	voters := func(ids ...string) []Server {
		var out []Server
		for _, id := range ids {
			out = append(out, Server{ID: id, Voter: true})
		}
		return out
	}
	five := voters("a", "b", "c", "d", "e")
	cases := []struct {
		name    string
		servers []Server
		id      string
		down    map[string]bool
		ok      bool
	}{
		{"dead voter of five", five, "e", map[string]bool{"e": true}, true},
		{"two dead of five, removing one", five, "e", map[string]bool{"d": true, "e": true}, true},
		{"three voters never shrink", voters("a", "b", "c"), "c", map[string]bool{"c": true}, false},
		{"four to three", voters("a", "b", "c", "d"), "d", map[string]bool{"d": true}, true},
		{"four to three with another down", voters("a", "b", "c", "d"), "d", map[string]bool{"c": true, "d": true}, true},
		{"majority would be lost", five, "e", map[string]bool{"b": true, "c": true, "d": true, "e": true}, false},
		{"non-voter always", append(voters("a", "b", "c"), Server{ID: "r"}), "r", map[string]bool{"r": true}, true},
		{"unknown", five, "z", nil, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := SafeToRemoveVoter(tc.servers, tc.id, tc.down, 3)
			if (err == nil) != tc.ok {
				t.Fatalf("SafeToRemoveVoter = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

func TestTransferLeadershipAndNonvoter(t *testing.T) {
	c := newTestCluster(t, 3)
	leader := c.waitLeader()
	var target *testNode
	for _, tn := range c.nodes {
		if tn != leader {
			target = tn
			break
		}
	}
	ctx := context.Background()
	if err := target.node.TransferLeadershipTo(ctx, leader.id); err != ErrNotLeader {
		t.Fatalf("transfer on a follower = %v, want ErrNotLeader", err)
	}
	if err := leader.node.TransferLeadershipTo(ctx, "nobody"); err == nil {
		t.Fatal("transfer to an unknown node succeeded")
	}
	if err := leader.node.TransferLeadershipTo(ctx, target.id); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "target leads", func() error {
		if !target.node.IsLeader() {
			return fmt.Errorf("%s is %s", target.id, target.node.Status().State)
		}
		return nil
	})
	// Remove a follower and add it back as a non-voter: it keeps receiving
	// the log but no longer votes.
	var replica *testNode
	for _, tn := range c.nodes {
		if tn != target {
			replica = tn
			break
		}
	}
	if err := target.node.RemoveServer(ctx, replica.id); err != nil {
		t.Fatal(err)
	}
	if err := target.node.AddNonvoter(ctx, replica.id, replica.raftLn.Addr().String()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "replica is a non-voter", func() error {
		if replica.node.Status().Voter {
			return fmt.Errorf("%s still votes", replica.id)
		}
		return nil
	})
	if err := target.node.TransferLeadershipTo(ctx, replica.id); err == nil {
		t.Fatal("transfer to a non-voter succeeded")
	}
	c.mustPropose(target, fsmpb.CommandType_COMMAND_TYPE_NOOP, &fsmpb.Noop{}, "")
	c.waitConverged()
}

// Two of three voters are lost for good: the survivor, stopped, gets a new
// configuration with RecoverCluster and leads alone with its state intact.
func TestRecoverClusterAfterLosingQuorum(t *testing.T) {
	c := newTestCluster(t, 3)
	leader := c.waitLeader()
	c.mustPropose(leader, fsmpb.CommandType_COMMAND_TYPE_NOOP, &fsmpb.Noop{}, "before")
	c.waitConverged()
	survivor := c.nodes[0]
	for _, tn := range c.nodes {
		c.stop(tn)
	}
	dir := survivor.dir
	recs, err := ReadNodeRecords(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 3 {
		t.Fatalf("node records = %d, want 3", len(recs))
	}
	var addr string
	for _, r := range recs {
		if r.GetNodeId() == survivor.id {
			addr = r.GetRaftAddr()
		}
	}
	if err := RecoverCluster(RecoverConfig{NodeID: survivor.id, Dir: dir, Servers: []Server{{ID: survivor.id, RaftAddr: addr, Voter: true}}}); err != nil {
		t.Fatal(err)
	}
	if err := RecoverCluster(RecoverConfig{NodeID: survivor.id, Dir: filepath.Join(dir, "nope")}); err == nil {
		t.Fatal("recover without servers succeeded")
	}
	c.restart(survivor)
	waitFor(t, 10*time.Second, "survivor leads alone", func() error {
		if !survivor.node.IsLeader() {
			return fmt.Errorf("state %s", survivor.node.Status().State)
		}
		return nil
	})
	if n, ok := survivor.fsm.Node("node2"); !ok || n == nil {
		t.Fatal("state lost in recovery")
	}
	c.mustPropose(survivor, fsmpb.CommandType_COMMAND_TYPE_NOOP, &fsmpb.Noop{}, "after")
}
