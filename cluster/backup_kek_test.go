package cluster

import (
	"slices"
	"testing"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// TestReplaceMembershipResetsKEKBookkeeping: a restore into other nodes
// leaves no KEK version counted as held or delivered by nodes that are gone.
func TestReplaceMembershipResetsKEKBookkeeping(t *testing.T) {
	st := &fsmpb.State{Format: 1, Cluster: &fsmpb.ClusterInfo{ClusterId: "c", CurrentKekVersion: 2, KekVersions: []*fsmpb.KEKVersion{
		{Version: 1, State: fsmpb.KEKState_KEK_STATE_RETIRED, CheckValue: []byte{1}, InstalledOn: []string{"old1"}, RemovedFrom: []string{"old1"}},
		{Version: 2, State: fsmpb.KEKState_KEK_STATE_ACTIVE, CheckValue: []byte{2}, InstalledOn: []string{"old1", "old2"}},
		{Version: 3, State: fsmpb.KEKState_KEK_STATE_PENDING, CheckValue: []byte{3}, InstalledOn: []string{"n1"},
			Deliveries: []*fsmpb.KEKDelivery{{NodeId: "old2", Wrapped: []byte("w")}}},
	}, GossipKey: &fsmpb.WrappedBlob{KekVersion: 2, Blob: []byte("g")}, GossipKeyGeneration: 3}}
	if _, err := ReplaceMembership(st, []*fsmpb.NodeRecord{{NodeId: "n1", RaftAddr: "a"}}, true); err != nil {
		t.Fatal(err)
	}
	ks := st.GetCluster().GetKekVersions()
	if len(ks[0].GetRemovedFrom()) != 0 {
		t.Errorf("RETIRED v1 still counts removals by old nodes: %v", ks[0].GetRemovedFrom())
	}
	if !slices.Equal(ks[1].GetInstalledOn(), []string{"n1"}) {
		t.Errorf("ACTIVE v2 holders = %v, want the new member", ks[1].GetInstalledOn())
	}
	if len(ks[2].GetInstalledOn()) != 0 || len(ks[2].GetDeliveries()) != 0 {
		t.Errorf("PENDING v3 kept holders %v / deliveries %v of the old cluster (a reused node id must not count)", ks[2].GetInstalledOn(), ks[2].GetDeliveries())
	}
	if !st.GetCluster().GetGossipKeyRotationDue() {
		t.Error("the restored state keeps the old cluster's gossip key without marking it due for rotation")
	}
}
