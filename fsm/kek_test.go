package fsm

import (
	"slices"
	"testing"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

const (
	typBeginKEK    = fsmpb.CommandType_COMMAND_TYPE_BEGIN_KEK_ROTATION
	typDeliverKEK  = fsmpb.CommandType_COMMAND_TYPE_DELIVER_KEK
	typKEKInstall  = fsmpb.CommandType_COMMAND_TYPE_KEK_INSTALLED
	typActivateKEK = fsmpb.CommandType_COMMAND_TYPE_ACTIVATE_KEK
	typRewrap      = fsmpb.CommandType_COMMAND_TYPE_REWRAP_MATERIAL
	typRetireKEK   = fsmpb.CommandType_COMMAND_TYPE_RETIRE_KEK
	typKEKRemoved  = fsmpb.CommandType_COMMAND_TYPE_KEK_REMOVED
	typAbandonKEK  = fsmpb.CommandType_COMMAND_TYPE_ABANDON_KEK_ROTATION
)

var kcv2 = []byte{9, 9, 9, 9}

// threeNodes returns an initialised state with members n1, n2, n3 and
// `keys` AES keys under KEK version 1.
func threeNodes(t *testing.T, keys int) *applier {
	t.Helper()
	a := initialised(t)
	for _, n := range []string{"n2", "n3"} {
		a.mustOK(fsmpb.CommandType_COMMAND_TYPE_CREATE_JOIN_TOKEN, joinTokenPayload("tok-"+n, t0+int64(1e12)))
		a.mustOK(fsmpb.CommandType_COMMAND_TYPE_ADMIT_NODE, admitPayload("tok-"+n, n))
	}
	for i := range keys {
		a.mustOK(fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKeyPayload(keyID(i)))
	}
	return a
}

func beginV2(gen string, deliverTo ...string) *fsmpb.BeginKEKRotation {
	k := &fsmpb.KEKVersion{Version: 2, CheckValue: kcv2, GeneratedBy: gen}
	for _, n := range deliverTo {
		k.Deliveries = append(k.Deliveries, &fsmpb.KEKDelivery{NodeId: n, Wrapped: []byte("wrapped-kek-for-" + n)})
	}
	return &fsmpb.BeginKEKRotation{Kek: k}
}

func kekOf(t *testing.T, a *applier, v uint32) *fsmpb.KEKVersion {
	t.Helper()
	for _, k := range a.s.cluster.GetKekVersions() {
		if k.GetVersion() == v {
			return k
		}
	}
	t.Fatalf("no KEK version %d", v)
	return nil
}

func rewrapAll(t *testing.T, a *applier, from, to uint32) *fsmpb.Result {
	t.Helper()
	p := &fsmpb.RewrapMaterial{
		CaKey: &fsmpb.WrappedBlob{KekVersion: to, Blob: []byte("rewrapped-ca")}, CaKeyFrom: from,
	}
	for _, rec := range a.s.listKeys("", 0) {
		for _, v := range rec.GetVersions() {
			if v.GetMaterial().GetKekVersion() == from && v.GetMaterial() != nil {
				p.Keys = append(p.Keys, &fsmpb.RewrappedKeyVersion{KeyId: rec.GetKeyId(), Version: v.GetVersion(), FromKekVersion: from,
					Material: &fsmpb.WrappedBlob{KekVersion: to, Blob: []byte("rewrapped-" + rec.GetKeyId())}})
			}
		}
	}
	return a.mustOK(typRewrap, p)
}

// TestKEKRotationLifecycle walks a version through every state and checks
// each refusal on the way.
func TestKEKRotationLifecycle(t *testing.T) {
	a := threeNodes(t, 5)
	if got := a.s.sealedUnder(1); got != 6 { // 5 keys + CA key
		t.Fatalf("sealed under v1 = %d, want 6", got)
	}
	// Refusals before a rotation exists.
	checkResult(t, a.apply(typActivateKEK, &fsmpb.ActivateKEK{Version: 2}, env{}), codePrecondition, "not PENDING")
	checkResult(t, a.apply(typRetireKEK, &fsmpb.RetireKEK{Version: 1}, env{}), codePrecondition, "not DRAINING")
	checkResult(t, a.apply(typBeginKEK, with(beginV2("n1", "n2", "n3"), func(p *fsmpb.BeginKEKRotation) { p.Kek.Version = 3 }), env{}),
		codePrecondition, "must be 2")
	checkResult(t, a.apply(typBeginKEK, beginV2("n9", "n2"), env{}), codeInvalid, "not a member")
	checkResult(t, a.apply(typBeginKEK, beginV2("n1", "n2", "n2"), env{}), codeInvalid, "two KEK deliveries")
	checkResult(t, a.apply(typBeginKEK, beginV2("n1", "n1"), env{}), codeInvalid, "already holds")

	a.mustOK(typBeginKEK, beginV2("n1", "n3")) // n2 gets its delivery later
	k := kekOf(t, a, 2)
	if k.GetState() != kekPending || !slices.Equal(k.GetInstalledOn(), []string{"n1"}) || len(k.GetDeliveries()) != 1 {
		t.Fatalf("after begin: %v", k)
	}
	checkResult(t, a.apply(typBeginKEK, beginV2("n1", "n2", "n3"), env{}), codePrecondition, "already in progress")
	// New material still goes under v1; v2 is not usable yet.
	checkResult(t, a.apply(fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY,
		with(createKeyPayload(keyID(50)), func(p *fsmpb.CreateKey) { p.Material.KekVersion = 2 }), env{}), codePrecondition, "PENDING")

	a.mustOK(typDeliverKEK, &fsmpb.DeliverKEK{Version: 2, Deliveries: []*fsmpb.KEKDelivery{{NodeId: "n2", Wrapped: []byte("w")}}})
	checkResult(t, a.apply(typDeliverKEK, &fsmpb.DeliverKEK{Version: 2, Deliveries: []*fsmpb.KEKDelivery{{NodeId: "n2", Wrapped: []byte("w")}}}, env{}),
		codeInvalid, "already holds")
	checkResult(t, a.apply(typKEKInstall, &fsmpb.KEKInstalled{Version: 2, NodeId: "n2", CheckValue: []byte{1}}, env{}), codePrecondition, "different check value")
	a.mustOK(typKEKInstall, &fsmpb.KEKInstalled{Version: 2, NodeId: "n2", CheckValue: kcv2})
	checkResult(t, a.apply(typActivateKEK, &fsmpb.ActivateKEK{Version: 2}, env{}), codePrecondition, "not installed on n3")
	a.mustOK(typKEKInstall, &fsmpb.KEKInstalled{Version: 2, NodeId: "n3", CheckValue: kcv2})
	a.mustOK(typKEKInstall, &fsmpb.KEKInstalled{Version: 2, NodeId: "n3", CheckValue: kcv2}) // repeat: no-op
	if k := kekOf(t, a, 2); len(k.GetDeliveries()) != 0 || !slices.Equal(k.GetInstalledOn(), []string{"n1", "n2", "n3"}) {
		t.Fatalf("after installs: %v", k)
	}

	a.mustOK(typActivateKEK, &fsmpb.ActivateKEK{Version: 2})
	if a.s.cluster.GetCurrentKekVersion() != 2 || kekOf(t, a, 1).GetState() != kekDraining || kekOf(t, a, 2).GetState() != kekActive {
		t.Fatalf("after activate: %v", a.s.cluster)
	}
	// Material proposed before the activation (under v1) is still accepted.
	a.mustOK(fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKeyPayload(keyID(5)))
	checkResult(t, a.apply(typRetireKEK, &fsmpb.RetireKEK{Version: 1}, env{}), codePrecondition, "7 blob(s) are still sealed under KEK version 1")

	// Re-wrap: a blob whose source changed meanwhile is skipped, not clobbered.
	stale := &fsmpb.RewrapMaterial{Keys: []*fsmpb.RewrappedKeyVersion{{KeyId: keyID(0), Version: 1, FromKekVersion: 3,
		Material: &fsmpb.WrappedBlob{KekVersion: 2, Blob: []byte("x")}}}}
	checkResult(t, a.mustOK(typRewrap, stale), codeOK, "re-wrapped 0, skipped 1")
	wrongTarget := &fsmpb.RewrapMaterial{Keys: []*fsmpb.RewrappedKeyVersion{{KeyId: keyID(0), Version: 1, FromKekVersion: 1,
		Material: &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte("x")}}}}
	checkResult(t, a.apply(typRewrap, wrongTarget, env{}), codePrecondition, "current version is 2")
	checkResult(t, rewrapAll(t, a, 1, 2), codeOK, "re-wrapped 7, skipped 0")
	if n := a.s.sealedUnder(1); n != 0 {
		t.Fatalf("sealed under v1 after re-wrap = %d", n)
	}
	if got := a.s.keys[keyID(3)].GetVersions()[0].GetMaterial(); got.GetKekVersion() != 2 || string(got.GetBlob()) != "rewrapped-"+keyID(3) {
		t.Fatalf("key 3 material = %v", got)
	}

	a.mustOK(typRetireKEK, &fsmpb.RetireKEK{Version: 1})
	checkResult(t, a.apply(fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, createKeyPayload(keyID(6)), env{}), codePrecondition, "RETIRED")
	checkResult(t, a.apply(typKEKInstall, &fsmpb.KEKInstalled{Version: 1, NodeId: "n2", CheckValue: []byte{1, 2, 3, 4}}, env{}), codePrecondition, "RETIRED")
	a.mustOK(typKEKRemoved, &fsmpb.KEKRemoved{Version: 1, NodeId: "n1"})
	a.mustOK(typKEKRemoved, &fsmpb.KEKRemoved{Version: 1, NodeId: "n2"})
	if kekOf(t, a, 1).GetState() != kekRetired {
		t.Fatalf("destroyed before n3 removed it")
	}
	// Removing n3 from the cluster completes the destruction.
	a.mustOK(fsmpb.CommandType_COMMAND_TYPE_REMOVE_NODE, &fsmpb.RemoveNode{NodeId: "n3"})
	if k := kekOf(t, a, 1); k.GetState() != kekDestroyed || k.GetDestroyedUnixNano() == 0 {
		t.Fatalf("after removals: %v", k)
	}
	a.mustOK(typKEKRemoved, &fsmpb.KEKRemoved{Version: 1, NodeId: "n1"}) // late repeat: no-op

	// A second rotation can start now.
	next := beginV2("n1", "n2")
	next.Kek.Version = 3
	a.mustOK(typBeginKEK, next)

	// The state survives a snapshot round trip mid-rotation, refs included.
	st, err := StateFromProto(a.s.ToProto())
	if err != nil {
		t.Fatal(err)
	}
	if st.sealedUnder(2) != a.s.sealedUnder(2) || st.sealedUnder(2) != 7 {
		t.Fatalf("refs after restore: %d vs %d", st.sealedUnder(2), a.s.sealedUnder(2))
	}
}

// TestKEKRewrapImportTokensAndGossipKey: every kind of sealed blob moves.
func TestKEKRewrapImportTokensAndGossipKey(t *testing.T) {
	a := threeNodes(t, 0)
	a.mustOK(fsmpb.CommandType_COMMAND_TYPE_SET_GOSSIP_KEY, &fsmpb.SetGossipKey{GossipKey: &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte("g")}})
	a.mustOK(typImportToken, importTokenPayload("it-abcdefgh", t0+int64(1e12)))
	if n := a.s.sealedUnder(1); n != 3 {
		t.Fatalf("sealed under v1 = %d, want 3 (CA, gossip, import token)", n)
	}
	a.mustOK(typBeginKEK, beginV2("n1", "n2", "n3"))
	for _, n := range []string{"n2", "n3"} {
		a.mustOK(typKEKInstall, &fsmpb.KEKInstalled{Version: 2, NodeId: n, CheckValue: kcv2})
	}
	a.mustOK(typActivateKEK, &fsmpb.ActivateKEK{Version: 2})
	tok := importTokenPayload("it-abcdefgh", 0)
	checkResult(t, a.mustOK(typRewrap, &fsmpb.RewrapMaterial{
		GossipKey: &fsmpb.WrappedBlob{KekVersion: 2, Blob: []byte("g2")}, GossipKeyFrom: 1,
		CaKey: &fsmpb.WrappedBlob{KekVersion: 2, Blob: []byte("c2")}, CaKeyFrom: 1,
		ImportTokens: []*fsmpb.RewrappedImportToken{{TokenId: tok.GetTokenId(), FromKekVersion: 1, PrivateKey: &fsmpb.WrappedBlob{KekVersion: 2, Blob: []byte("t2")}}},
	}), codeOK, "re-wrapped 3, skipped 0")
	if n := a.s.sealedUnder(1); n != 0 {
		t.Fatalf("sealed under v1 = %d after re-wrap", n)
	}
	a.mustOK(typRetireKEK, &fsmpb.RetireKEK{Version: 1})
}

// A gossip key rotation sealed under the DRAINING version that lands
// between the leader reading the key and its re-wrap applying is not undone
// by the re-wrap of the older key (generation check).
func TestKEKRewrapDoesNotUndoGossipKeyRotation(t *testing.T) {
	a := threeNodes(t, 0)
	a.mustOK(fsmpb.CommandType_COMMAND_TYPE_SET_GOSSIP_KEY, &fsmpb.SetGossipKey{GossipKey: &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte("g-gen1")}})
	a.mustOK(typBeginKEK, beginV2("n1", "n2", "n3"))
	for _, n := range []string{"n2", "n3"} {
		a.mustOK(typKEKInstall, &fsmpb.KEKInstalled{Version: 2, NodeId: n, CheckValue: kcv2})
	}
	a.mustOK(typActivateKEK, &fsmpb.ActivateKEK{Version: 2})
	// The leader read generation 1 (under v1) and re-sealed it; meanwhile a
	// rotation built just before activation (under v1, now DRAINING) lands.
	res := a.mustOK(fsmpb.CommandType_COMMAND_TYPE_SET_GOSSIP_KEY, &fsmpb.SetGossipKey{
		GossipKey: &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte("g-gen2")}, ReplacesGeneration: 1})
	if res.GetGossipKeyGeneration() != 2 {
		t.Fatalf("rotation result generation = %d, want 2", res.GetGossipKeyGeneration())
	}
	checkResult(t, a.mustOK(typRewrap, &fsmpb.RewrapMaterial{
		GossipKey: &fsmpb.WrappedBlob{KekVersion: 2, Blob: []byte("g-gen1-under-v2")}, GossipKeyFrom: 1, GossipKeyGeneration: 1,
	}), codeOK, "re-wrapped 0, skipped 1")
	if got := string(a.s.cluster.GetGossipKey().GetBlob()); got != "g-gen2" {
		t.Fatalf("gossip key blob = %q: the re-wrap of generation 1 replaced generation 2", got)
	}
	// The re-wrap of the current generation applies.
	checkResult(t, a.mustOK(typRewrap, &fsmpb.RewrapMaterial{
		GossipKey: &fsmpb.WrappedBlob{KekVersion: 2, Blob: []byte("g-gen2-under-v2")}, GossipKeyFrom: 1, GossipKeyGeneration: 2,
	}), codeOK, "re-wrapped 1, skipped 0")
	if ci := a.s.cluster; string(ci.GetGossipKey().GetBlob()) != "g-gen2-under-v2" || GossipKeyGeneration(ci) != 2 {
		t.Fatalf("after the re-wrap: %q generation %d", ci.GetGossipKey().GetBlob(), GossipKeyGeneration(ci))
	}
}

// TestFSMMaterialUnderKEK pages through material with bounded scans.
func TestFSMMaterialUnderKEK(t *testing.T) {
	f := New(Config{})
	a := threeNodes(t, 25)
	f.state = a.s
	var seen []string
	cursor := ""
	for range 100 {
		items, next := f.MaterialUnderKEK(1, cursor, 4, 7)
		for _, it := range items {
			seen = append(seen, it.Key.GetKeyId())
		}
		if next == "" {
			break
		}
		cursor = next
	}
	if len(seen) != 25 || !slices.IsSorted(seen) || seen[0] != keyID(0) || seen[24] != keyID(24) {
		t.Fatalf("paged %d keys: %v", len(seen), seen)
	}
	if got := f.KEKProgress().SealedBlobs[1]; got != 26 {
		t.Fatalf("progress = %d, want 26", got)
	}
}

// TestAbandonKEKRotation: only a PENDING version can be abandoned; it becomes
// RETIRED (its holders remove it), then a new rotation takes the next number.
func TestAbandonKEKRotation(t *testing.T) {
	a := threeNodes(t, 2)
	checkResult(t, a.apply(typAbandonKEK, &fsmpb.AbandonKEKRotation{Version: 1}, env{}), codePrecondition, "only a PENDING rotation")
	a.mustOK(typBeginKEK, beginV2("n1", "n2", "n3"))
	checkResult(t, a.apply(typAbandonKEK, &fsmpb.AbandonKEKRotation{Version: 2, Reason: string(make([]byte, 2000))}, env{}), codeInvalid, "limit")
	a.mustOK(typAbandonKEK, &fsmpb.AbandonKEKRotation{Version: 2, Reason: "restored elsewhere"})
	k := kekOf(t, a, 2)
	if k.GetState() != kekRetired || len(k.GetDeliveries()) != 0 || a.s.cluster.GetCurrentKekVersion() != 1 {
		t.Fatalf("after abandon: %v (current %d)", k, a.s.cluster.GetCurrentKekVersion())
	}
	for _, n := range []string{"n1", "n2", "n3"} {
		a.mustOK(typKEKRemoved, &fsmpb.KEKRemoved{Version: 2, NodeId: n})
	}
	if kekOf(t, a, 2).GetState() != kekDestroyed {
		t.Fatal("abandoned version not DESTROYED after every member removed it")
	}
	next := beginV2("n1", "n2", "n3")
	next.Kek.Version = 3
	a.mustOK(typBeginKEK, next)
}

// TestKEKRemovedNodeIsForgotten: REMOVE_NODE drops a node from every
// version's holders and deliveries, so a re-admitted node gets the versions
// delivered again (DELIVER_KEK works for ACTIVE versions too) instead of
// being counted as holding them.
func TestKEKRemovedNodeIsForgotten(t *testing.T) {
	a := threeNodes(t, 1)
	a.mustOK(typBeginKEK, beginV2("n1", "n3"))
	a.mustOK(typKEKInstall, &fsmpb.KEKInstalled{Version: 2, NodeId: "n2", CheckValue: kcv2})
	a.mustOK(fsmpb.CommandType_COMMAND_TYPE_REMOVE_NODE, &fsmpb.RemoveNode{NodeId: "n2"})
	a.mustOK(fsmpb.CommandType_COMMAND_TYPE_REMOVE_NODE, &fsmpb.RemoveNode{NodeId: "n3"})
	if k := kekOf(t, a, 2); !slices.Equal(k.GetInstalledOn(), []string{"n1"}) || len(k.GetDeliveries()) != 0 {
		t.Fatalf("after removing n2 and n3: %v", k)
	}
	if v1 := kekOf(t, a, 1); slices.Contains(v1.GetInstalledOn(), "n2") {
		t.Fatalf("v1 still lists the removed n2: %v", v1)
	}
	a.mustOK(typActivateKEK, &fsmpb.ActivateKEK{Version: 2}) // n1 is the only member
	a.mustOK(fsmpb.CommandType_COMMAND_TYPE_CREATE_JOIN_TOKEN, joinTokenPayload("tok-again", t0+int64(1e12)))
	a.mustOK(fsmpb.CommandType_COMMAND_TYPE_ADMIT_NODE, admitPayload("tok-again", "n2"))
	for _, v := range []uint32{1, 2} { // DRAINING and ACTIVE
		a.mustOK(typDeliverKEK, &fsmpb.DeliverKEK{Version: v, Deliveries: []*fsmpb.KEKDelivery{{NodeId: "n2", Wrapped: []byte("w")}}})
	}
	a.mustOK(typKEKInstall, &fsmpb.KEKInstalled{Version: 2, NodeId: "n2", CheckValue: kcv2})
	if k := kekOf(t, a, 2); !slices.Equal(k.GetInstalledOn(), []string{"n1", "n2"}) || len(k.GetDeliveries()) != 0 {
		t.Fatalf("after n2 came back: %v", k)
	}
	checkResult(t, a.apply(typDeliverKEK, &fsmpb.DeliverKEK{Version: 2, Deliveries: []*fsmpb.KEKDelivery{{NodeId: "n2", Wrapped: []byte("w")}}}, env{}),
		codeInvalid, "already holds")
}
