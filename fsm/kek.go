package fsm

import (
	"bytes"
	"fmt"
	"slices"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// KEK rotation (see DESIGN.md, "KEK rotation"). A version moves
// PENDING -> ACTIVE -> DRAINING -> RETIRED -> DESTROYED:
//
//   - BEGIN_KEK_ROTATION: a node generated version current+1 in its HSM and
//     wrapped it for every other node's identity key (deliveries);
//   - DELIVER_KEK: deliveries for members that hold a PENDING, ACTIVE or
//     DRAINING version neither installed nor delivered (admitted since, or
//     re-admitted after a removal, which forgets a node's entries);
//   - KEK_INSTALLED: a node holds the version (check value matched);
//   - ACTIVATE_KEK: every node holds it; it becomes current, the old current
//     version DRAINING, deliveries are dropped;
//   - REWRAP_MATERIAL: blobs under a DRAINING version re-sealed under the
//     current one (compare-and-set per blob);
//   - RETIRE_KEK: nothing is sealed under the DRAINING version any more;
//   - KEK_REMOVED: a node destroyed a RETIRED version in its HSM; when every
//     node has, it is DESTROYED.
//
// Every step is proposed by a node's or the leader's background loop and is
// safe to repeat: a step that already happened is a no-op.

const (
	kekPending   = fsmpb.KEKState_KEK_STATE_PENDING
	kekActive    = fsmpb.KEKState_KEK_STATE_ACTIVE
	kekDraining  = fsmpb.KEKState_KEK_STATE_DRAINING
	kekRetired   = fsmpb.KEKState_KEK_STATE_RETIRED
	kekDestroyed = fsmpb.KEKState_KEK_STATE_DESTROYED

	// MaxRewrapBatch bounds the items of one REWRAP_MATERIAL command.
	MaxRewrapBatch = 2000
	// maxWrappedKEKLen bounds one delivery (an RSA-OAEP block of a 4096-bit
	// identity key is 512 bytes).
	maxWrappedKEKLen = 2048
	// maxAbandonReasonLen bounds ABANDON_KEK_ROTATION's reason.
	maxAbandonReasonLen = 1024
)

// KEKStateName is the short name of a KEK version state (PENDING, ...).
func KEKStateName(st fsmpb.KEKState) string {
	return strings.TrimPrefix(st.String(), "KEK_STATE_")
}

// KEKOpensMaterial reports whether nodes hold a KEK version in that state
// and may open material with it (ACTIVE, DRAINING; PENDING versions are
// held by some nodes but nothing is sealed under them).
func KEKOpensMaterial(st fsmpb.KEKState) bool {
	return st == kekActive || st == kekDraining
}

// countKEKRefs adds delta to the reference count of the KEK version of each
// version's material of rec.
func (s *State) countKEKRefs(rec *fsmpb.KeyRecord, delta int) {
	for _, v := range rec.GetVersions() {
		if m := v.GetMaterial(); m != nil {
			n := s.kekRefs[m.GetKekVersion()] + delta
			if n == 0 {
				delete(s.kekRefs, m.GetKekVersion())
			} else {
				s.kekRefs[m.GetKekVersion()] = n
			}
		}
	}
}

// sealedUnder counts every blob sealed under KEK version v: key materials,
// the CA key, the gossip key and import tokens' private keys.
func (s *State) sealedUnder(v uint32) int {
	n := s.kekRefs[v]
	if s.cluster.GetCaKey().GetKekVersion() == v {
		n++
	}
	if g := s.cluster.GetGossipKey(); g != nil && g.GetKekVersion() == v {
		n++
	}
	s.importSealed.Ascend(func(tok *fsmpb.ImportToken) bool {
		if tok.GetPrivateKey().GetKekVersion() == v {
			n++
		}
		return true
	})
	return n
}

// kekIndex returns the position of version v in the cluster's KEK list, or -1.
func (s *State) kekIndex(v uint32) int {
	for i, k := range s.cluster.GetKekVersions() {
		if k.GetVersion() == v {
			return i
		}
	}
	return -1
}

// kekInState returns the first version in state st, or nil.
func (s *State) kekInState(st fsmpb.KEKState) *fsmpb.KEKVersion {
	for _, k := range s.cluster.GetKekVersions() {
		if k.GetState() == st {
			return k
		}
	}
	return nil
}

// withKEK stores a changed copy of version index i (and a new ClusterInfo:
// stored records are immutable).
func (s *State) withKEK(i int, change func(k *fsmpb.KEKVersion)) {
	ci := proto.CloneOf(s.cluster)
	change(ci.KekVersions[i])
	s.cluster = ci
}

func insertSorted(list []string, v string) []string {
	i, found := slices.BinarySearch(list, v)
	if found {
		return list
	}
	return slices.Insert(list, i, v)
}

func (s *State) missingNodes(have []string) []string {
	var out []string
	for _, n := range s.sortedNodes() {
		if _, ok := slices.BinarySearch(have, n.GetNodeId()); !ok {
			out = append(out, n.GetNodeId())
		}
	}
	return out
}

func (s *State) rotationInProgress() *fsmpb.KEKVersion {
	if k := s.kekInState(kekPending); k != nil {
		return k
	}
	return s.kekInState(kekDraining)
}

func (s *State) checkDeliveries(ds []*fsmpb.KEKDelivery, exclude map[string]bool) *fsmpb.Result {
	seen := map[string]bool{}
	for _, d := range ds {
		id := d.GetNodeId()
		switch {
		case s.nodes[id] == nil:
			return failf(codeInvalid, "KEK delivery for node %+q, which is not a member", truncate(id))
		case seen[id]:
			return failf(codeInvalid, "two KEK deliveries for node %+q", truncate(id))
		case exclude[id]:
			return failf(codeInvalid, "node %+q already holds the KEK or has a delivery", truncate(id))
		case len(d.GetWrapped()) == 0 || len(d.GetWrapped()) > maxWrappedKEKLen:
			return failf(codeInvalid, "KEK delivery for node %+q is %d bytes; it must be 1-%d", truncate(id), len(d.GetWrapped()), maxWrappedKEKLen)
		}
		seen[id] = true
	}
	return nil
}

func sortDeliveries(ds []*fsmpb.KEKDelivery) {
	slices.SortFunc(ds, func(a, b *fsmpb.KEKDelivery) int { return strings.Compare(a.GetNodeId(), b.GetNodeId()) })
}

func (s *State) applyBeginKEKRotation(c *cmdContext, p *fsmpb.BeginKEKRotation) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	if k := s.rotationInProgress(); k != nil {
		return failf(codePrecondition, "a KEK rotation is already in progress (version %d is %s); see `cabinet operator kek status`",
			k.GetVersion(), KEKStateName(k.GetState()))
	}
	kek := p.GetKek()
	var maxV uint32
	for _, k := range s.cluster.GetKekVersions() {
		maxV = max(maxV, k.GetVersion())
	}
	gen := kek.GetGeneratedBy()
	switch {
	case kek == nil:
		return failf(codeInvalid, "KEK version is required")
	case kek.GetVersion() != maxV+1:
		return failf(codePrecondition, "the new KEK version must be %d, got %d", maxV+1, kek.GetVersion())
	case len(kek.GetCheckValue()) == 0 || len(kek.GetCheckValue()) > maxCheckValueLen:
		return failf(codeInvalid, "KEK check value must be 1-%d bytes", maxCheckValueLen)
	case s.nodes[gen] == nil:
		return failf(codeInvalid, "the generating node %+q is not a member", truncate(gen))
	}
	if res := s.checkDeliveries(kek.GetDeliveries(), map[string]bool{gen: true}); res != nil {
		return res
	}
	rec := &fsmpb.KEKVersion{
		Version:         kek.GetVersion(),
		CheckValue:      kek.GetCheckValue(),
		CreatedUnixNano: c.time,
		State:           kekPending,
		InstalledOn:     []string{gen},
		Deliveries:      kek.GetDeliveries(),
		GeneratedBy:     gen,
	}
	sortDeliveries(rec.Deliveries)
	ci := proto.CloneOf(s.cluster)
	ci.KekVersions = append(ci.KekVersions, rec)
	s.cluster = ci
	return &fsmpb.Result{Message: fmt.Sprintf("KEK version %d is PENDING: delivered to %d node(s)", rec.GetVersion(), len(rec.GetDeliveries()))}
}

func (s *State) applyDeliverKEK(_ *cmdContext, p *fsmpb.DeliverKEK) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	i := s.kekIndex(p.GetVersion())
	if i < 0 || (s.cluster.KekVersions[i].GetState() != kekPending && !KEKOpensMaterial(s.cluster.KekVersions[i].GetState())) {
		return failf(codePrecondition, "KEK version %d is not PENDING, ACTIVE or DRAINING", p.GetVersion())
	}
	k := s.cluster.KekVersions[i]
	have := map[string]bool{}
	for _, id := range k.GetInstalledOn() {
		have[id] = true
	}
	for _, d := range k.GetDeliveries() {
		have[d.GetNodeId()] = true
	}
	if res := s.checkDeliveries(p.GetDeliveries(), have); res != nil {
		return res
	}
	s.withKEK(i, func(k *fsmpb.KEKVersion) {
		k.Deliveries = append(k.Deliveries, p.GetDeliveries()...)
		sortDeliveries(k.Deliveries)
	})
	return &fsmpb.Result{}
}

func (s *State) applyKEKInstalled(_ *cmdContext, p *fsmpb.KEKInstalled) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	i := s.kekIndex(p.GetVersion())
	if i < 0 {
		return failf(codeNotFound, "KEK version %d does not exist", p.GetVersion())
	}
	k := s.cluster.KekVersions[i]
	switch {
	case k.GetState() != kekPending && !KEKOpensMaterial(k.GetState()):
		return failf(codePrecondition, "KEK version %d is %s", p.GetVersion(), KEKStateName(k.GetState()))
	case s.nodes[p.GetNodeId()] == nil:
		return failf(codeInvalid, "node %+q is not a member", truncate(p.GetNodeId()))
	case !bytes.Equal(p.GetCheckValue(), k.GetCheckValue()):
		return failf(codePrecondition, "node %+q reports a different check value for KEK version %d", truncate(p.GetNodeId()), p.GetVersion())
	}
	s.withKEK(i, func(k *fsmpb.KEKVersion) {
		k.InstalledOn = insertSorted(k.InstalledOn, p.GetNodeId())
		k.Deliveries = slices.DeleteFunc(k.Deliveries, func(d *fsmpb.KEKDelivery) bool { return d.GetNodeId() == p.GetNodeId() })
	})
	return &fsmpb.Result{}
}

func (s *State) applyActivateKEK(c *cmdContext, p *fsmpb.ActivateKEK) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	i := s.kekIndex(p.GetVersion())
	if i < 0 || s.cluster.KekVersions[i].GetState() != kekPending {
		return failf(codePrecondition, "KEK version %d is not PENDING", p.GetVersion())
	}
	if missing := s.missingNodes(s.cluster.KekVersions[i].GetInstalledOn()); len(missing) > 0 {
		return failf(codePrecondition, "KEK version %d is not installed on %s yet", p.GetVersion(), strings.Join(missing, ", "))
	}
	ci := proto.CloneOf(s.cluster)
	for _, k := range ci.KekVersions {
		if k.GetState() == kekActive {
			k.State = kekDraining
		}
	}
	k := ci.KekVersions[i]
	k.State = kekActive
	k.ActivatedUnixNano = c.time
	k.Deliveries = nil
	ci.CurrentKekVersion = k.GetVersion()
	s.cluster = ci
	return &fsmpb.Result{Message: fmt.Sprintf("KEK version %d is ACTIVE", k.GetVersion())}
}

// rewrapTarget checks the destination of a re-wrapped blob (the current
// version) and that its source version is DRAINING.
func (s *State) rewrapTarget(what string, from uint32, b *fsmpb.WrappedBlob) (ok bool, res *fsmpb.Result) {
	if res := checkBlob(what, b); res != nil {
		return false, res
	}
	if b.GetKekVersion() != s.cluster.GetCurrentKekVersion() {
		return false, failf(codePrecondition, "%s is re-wrapped under KEK version %d, but the current version is %d",
			what, b.GetKekVersion(), s.cluster.GetCurrentKekVersion())
	}
	i := s.kekIndex(from)
	return i >= 0 && s.cluster.KekVersions[i].GetState() == kekDraining, nil
}

func (s *State) applyRewrapMaterial(_ *cmdContext, p *fsmpb.RewrapMaterial) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	if n := len(p.GetKeys()) + len(p.GetImportTokens()); n > MaxRewrapBatch {
		return failf(codeInvalid, "%d items in one re-wrap batch; the limit is %d", n, MaxRewrapBatch)
	}
	// Validate everything first: a command applies whole or not at all.
	for _, it := range p.GetKeys() {
		if _, res := s.rewrapTarget("key material", it.GetFromKekVersion(), it.GetMaterial()); res != nil {
			return res
		}
	}
	for _, it := range p.GetImportTokens() {
		if _, res := s.rewrapTarget("import token private key", it.GetFromKekVersion(), it.GetPrivateKey()); res != nil {
			return res
		}
	}
	done, skipped := 0, 0
	ci := s.cluster
	if p.GetCaKey() != nil {
		ok, res := s.rewrapTarget("CA key", p.GetCaKeyFrom(), p.GetCaKey())
		if res != nil {
			return res
		}
		if ok && ci.GetCaKey().GetKekVersion() == p.GetCaKeyFrom() {
			ci = proto.CloneOf(ci)
			ci.CaKey = p.GetCaKey()
			done++
		} else {
			skipped++
		}
	}
	if p.GetGossipKey() != nil {
		ok, res := s.rewrapTarget("gossip key", p.GetGossipKeyFrom(), p.GetGossipKey())
		if res != nil {
			return res
		}
		sameKey := p.GetGossipKeyGeneration() == 0 || p.GetGossipKeyGeneration() == GossipKeyGeneration(ci)
		if ok && sameKey && ci.GetGossipKey() != nil && ci.GetGossipKey().GetKekVersion() == p.GetGossipKeyFrom() {
			if ci == s.cluster {
				ci = proto.CloneOf(ci)
			}
			ci.GossipKey = p.GetGossipKey()
			done++
		} else {
			skipped++
		}
	}
	s.cluster = ci
	// Key materials: one clone per key record.
	changed := map[string]*fsmpb.KeyRecord{}
	var order []string
	for _, it := range p.GetKeys() {
		ok, _ := s.rewrapTarget("key material", it.GetFromKekVersion(), it.GetMaterial())
		rec := changed[it.GetKeyId()]
		if rec == nil {
			rec = s.keys[it.GetKeyId()]
		}
		var kv *fsmpb.KeyVersion
		for _, v := range rec.GetVersions() {
			if v.GetVersion() == it.GetVersion() {
				kv = v
			}
		}
		if !ok || kv.GetMaterial() == nil || kv.GetMaterial().GetKekVersion() != it.GetFromKekVersion() {
			skipped++
			continue
		}
		if changed[it.GetKeyId()] == nil {
			rec = proto.CloneOf(rec)
			changed[it.GetKeyId()] = rec
			order = append(order, it.GetKeyId())
		}
		for _, v := range rec.Versions {
			if v.GetVersion() == it.GetVersion() {
				v.Material = it.GetMaterial()
			}
		}
		done++
	}
	for _, id := range order {
		s.putKey(changed[id])
	}
	for _, it := range p.GetImportTokens() {
		ok, _ := s.rewrapTarget("import token private key", it.GetFromKekVersion(), it.GetPrivateKey())
		tok, found := s.importToken(it.GetTokenId())
		if !ok || !found || tok.GetPrivateKey() == nil || tok.GetPrivateKey().GetKekVersion() != it.GetFromKekVersion() {
			skipped++
			continue
		}
		tok = proto.CloneOf(tok)
		tok.PrivateKey = it.GetPrivateKey()
		s.putImportToken(tok)
		done++
	}
	return &fsmpb.Result{Message: fmt.Sprintf("re-wrapped %d, skipped %d (changed meanwhile)", done, skipped)}
}

func (s *State) applyRetireKEK(c *cmdContext, p *fsmpb.RetireKEK) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	i := s.kekIndex(p.GetVersion())
	if i < 0 || s.cluster.KekVersions[i].GetState() != kekDraining {
		return failf(codePrecondition, "KEK version %d is not DRAINING", p.GetVersion())
	}
	if n := s.sealedUnder(p.GetVersion()); n > 0 {
		return failf(codePrecondition, "%d blob(s) are still sealed under KEK version %d", n, p.GetVersion())
	}
	s.withKEK(i, func(k *fsmpb.KEKVersion) {
		k.State = kekRetired
		k.RetiredUnixNano = c.time
	})
	s.settleRetiredKEKs(c.time)
	return &fsmpb.Result{Message: fmt.Sprintf("KEK version %d is RETIRED", p.GetVersion())}
}

func (s *State) applyKEKRemoved(c *cmdContext, p *fsmpb.KEKRemoved) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	i := s.kekIndex(p.GetVersion())
	switch {
	case i < 0:
		return failf(codeNotFound, "KEK version %d does not exist", p.GetVersion())
	case s.cluster.KekVersions[i].GetState() == kekDestroyed:
		return &fsmpb.Result{} // every node has already reported
	case s.cluster.KekVersions[i].GetState() != kekRetired:
		return failf(codePrecondition, "KEK version %d is %s, not RETIRED", p.GetVersion(), KEKStateName(s.cluster.KekVersions[i].GetState()))
	case s.nodes[p.GetNodeId()] == nil:
		return failf(codeInvalid, "node %+q is not a member", truncate(p.GetNodeId()))
	}
	s.withKEK(i, func(k *fsmpb.KEKVersion) {
		k.RemovedFrom = insertSorted(k.RemovedFrom, p.GetNodeId())
	})
	s.settleRetiredKEKs(c.time)
	return &fsmpb.Result{}
}

func (s *State) applyAbandonKEKRotation(c *cmdContext, p *fsmpb.AbandonKEKRotation) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	i := s.kekIndex(p.GetVersion())
	if i < 0 || s.cluster.KekVersions[i].GetState() != kekPending {
		return failf(codePrecondition, "KEK version %d is not PENDING; only a PENDING rotation can be abandoned", p.GetVersion())
	}
	if len(p.GetReason()) > maxAbandonReasonLen {
		return failf(codeInvalid, "reason is %d bytes; the limit is %d", len(p.GetReason()), maxAbandonReasonLen)
	}
	s.withKEK(i, func(k *fsmpb.KEKVersion) {
		k.State = kekRetired
		k.RetiredUnixNano = c.time
		k.Deliveries = nil
	})
	s.settleRetiredKEKs(c.time)
	return &fsmpb.Result{Message: fmt.Sprintf("KEK rotation to version %d abandoned; members that hold it remove it", p.GetVersion())}
}

// forgetKEKHolder drops a removed node from every version's holders and
// deliveries: if it comes back (a new HSM, or the same one), it reports or
// receives each version again instead of being counted as holding it.
func (s *State) forgetKEKHolder(id string) {
	if s.cluster == nil {
		return
	}
	for i, k := range s.cluster.GetKekVersions() {
		_, held := slices.BinarySearch(k.GetInstalledOn(), id)
		delivered := slices.ContainsFunc(k.GetDeliveries(), func(d *fsmpb.KEKDelivery) bool { return d.GetNodeId() == id })
		if !held && !delivered {
			continue
		}
		s.withKEK(i, func(k *fsmpb.KEKVersion) {
			k.InstalledOn = slices.DeleteFunc(k.InstalledOn, func(n string) bool { return n == id })
			k.Deliveries = slices.DeleteFunc(k.Deliveries, func(d *fsmpb.KEKDelivery) bool { return d.GetNodeId() == id })
		})
	}
}

// settleRetiredKEKs marks RETIRED versions that every member removed as
// DESTROYED (after KEK_REMOVED, RETIRE_KEK and REMOVE_NODE).
func (s *State) settleRetiredKEKs(now int64) {
	if s.cluster == nil {
		return
	}
	for i, k := range s.cluster.GetKekVersions() {
		if k.GetState() == kekRetired && len(s.missingNodes(k.GetRemovedFrom())) == 0 {
			s.withKEK(i, func(k *fsmpb.KEKVersion) {
				k.State = kekDestroyed
				k.DestroyedUnixNano = now
			})
		}
	}
}

// checkStoredKEKs validates a snapshot's KEK list: one ACTIVE version, the
// current one.
func checkStoredKEKs(c *fsmpb.ClusterInfo) error {
	active := 0
	for _, k := range c.GetKekVersions() {
		if k.GetState() == kekActive {
			active++
			if k.GetVersion() != c.GetCurrentKekVersion() {
				return fmt.Errorf("state: KEK version %d is ACTIVE but the current version is %d", k.GetVersion(), c.GetCurrentKekVersion())
			}
		}
	}
	if active != 1 {
		return fmt.Errorf("state: %d ACTIVE KEK versions; exactly one must be", active)
	}
	return nil
}

// ---- reads for the rotation loops (FSM methods take the lock) ----

// KEKProgress is what a node knows about KEK versions beyond ClusterInfo.
type KEKProgress struct {
	// SealedBlobs counts blobs sealed under each version still referenced.
	SealedBlobs map[uint32]int
}

// KEKProgress returns the number of blobs sealed under each KEK version
// that is PENDING, ACTIVE or DRAINING.
func (f *FSM) KEKProgress() KEKProgress {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := KEKProgress{SealedBlobs: map[uint32]int{}}
	for _, k := range f.state.cluster.GetKekVersions() {
		if k.GetState() == kekPending || KEKOpensMaterial(k.GetState()) {
			out.SealedBlobs[k.GetVersion()] = f.state.sealedUnder(k.GetVersion())
		}
	}
	return out
}

// SealedMaterial is one key version's material for re-wrapping.
type SealedMaterial struct {
	Key     *fsmpb.KeyRecord
	Version *fsmpb.KeyVersion
}

// MaterialUnderKEK returns up to limit key versions whose material is sealed
// under KEK version kek, from keys with ids greater than afterID in id
// order, visiting at most scan keys (so the read lock is held briefly), and
// the id to continue after ("" when the end was reached).
func (f *FSM) MaterialUnderKEK(kek uint32, afterID string, limit, scan int) ([]SealedMaterial, string) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []SealedMaterial
	next := ""
	visited := 0
	f.state.keyOrder.AscendGreaterOrEqual(&fsmpb.KeyRecord{KeyId: afterID}, func(rec *fsmpb.KeyRecord) bool {
		if rec.GetKeyId() == afterID {
			return true
		}
		if len(out) >= limit || visited >= scan {
			next = afterID
			return false
		}
		visited++
		for _, v := range rec.GetVersions() {
			if v.GetMaterial().GetKekVersion() == kek && v.GetMaterial() != nil {
				out = append(out, SealedMaterial{Key: rec, Version: v})
			}
		}
		afterID = rec.GetKeyId()
		return true
	})
	return out, next
}

// ImportTokensUnderKEK returns import tokens whose private key is sealed
// under KEK version kek.
func (f *FSM) ImportTokensUnderKEK(kek uint32) []*fsmpb.ImportToken {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []*fsmpb.ImportToken
	f.state.importSealed.Ascend(func(tok *fsmpb.ImportToken) bool {
		if tok.GetPrivateKey().GetKekVersion() == kek {
			out = append(out, tok)
		}
		return true
	})
	return out
}
