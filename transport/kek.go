package transport

import (
	"context"
	"crypto/rsa"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/keyops"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// KEK rotation, the node side (fsm/kek.go holds the states and DESIGN.md
// "KEK rotation" the whole story):
//   - RotateKEK (any node, admin): generate version current+1 in this
//     node's HSM, wrap it for every other node's identity key, propose
//     BEGIN_KEK_ROTATION;
//   - RunKEKNodeDuties (every node): unwrap a delivery meant for this node
//     and report KEK_INSTALLED; destroy RETIRED versions in this node's HSM
//     and report KEK_REMOVED;
//   - ProposeKEKWork (leader loop): deliver to nodes admitted since, activate
//     when every node holds the new version, re-wrap blobs under DRAINING
//     versions in bounded batches, retire a version nothing uses.

const (
	// KEKRewrapBatch is the number of blobs re-sealed per REWRAP_MATERIAL
	// command (one Raft entry of ~KEKRewrapBatch x 100 bytes).
	KEKRewrapBatch = 500
	// kekScanLimit bounds the keys visited under the FSM read lock per batch.
	kekScanLimit = 20000
	// kekWorkBudget bounds one ProposeKEKWork call; the leader loop calls it
	// again a second later.
	kekWorkBudget = 5 * time.Second
)

// kekDriver is the leader's re-wrap position (in memory; a new leader starts
// a fresh pass, which only costs a scan).
type kekDriver struct {
	// hsmMu serialises this node's KEK changes in its own HSM: RotateKEK's
	// generate (and orphan removal) against the node loop's install and
	// remove, so RotateKEK never mistakes a version the loop has just
	// installed for an orphan of a failed attempt.
	hsmMu   sync.Mutex
	mu      sync.Mutex // one ProposeKEKWork / RotateKEK at a time
	version uint32     // the DRAINING version the cursor belongs to
	cursor  string     // last key id of the current pass
	warnMu  sync.Mutex // guards warned only (taken under either lock above)
	warned  map[string]bool
}

func (d *kekDriver) warnOnce(log interface{ Warn(string, ...any) }, key, msg string, args ...any) {
	d.warnMu.Lock()
	defer d.warnMu.Unlock()
	if d.warned == nil {
		d.warned = map[string]bool{}
	}
	if !d.warned[key] {
		d.warned[key] = true
		log.Warn(msg, args...)
	}
}

func autoRequestID(prefix string) string {
	id, err := keyops.NewKeyID()
	if err != nil {
		return ""
	}
	return prefix + "/" + id
}

// nodePrincipal is the principal recorded for commands a node's own loops propose.
func (s *Server) nodePrincipal() string { return "node:" + s.cfg.NodeID }

// RotateKEK starts a KEK rotation (admin).
func (s *Server) RotateKEK(ctx context.Context, req *cabinetpb.RotateKEKRequest) (*cabinetpb.KEKStatusResponse, error) {
	s.kek.mu.Lock()
	defer s.kek.mu.Unlock()
	s.kek.hsmMu.Lock()
	defer s.kek.hsmMu.Unlock()
	ci := s.cfg.State.Cluster() // read under hsmMu: see kekDriver
	if ci == nil {
		return nil, status.Error(codes.Unavailable, "the cluster is not initialised yet")
	}
	// Level 2: REWRAP_MATERIAL carries the gossip key generation check.
	if err := s.requireFeature(fsm.FeatureGossipKeyGenerations, "KEK rotation"); err != nil {
		return nil, err
	}
	var next uint32
	for _, k := range ci.GetKekVersions() {
		if st := k.GetState(); st == fsmpb.KEKState_KEK_STATE_PENDING || st == fsmpb.KEKState_KEK_STATE_DRAINING {
			return nil, status.Errorf(codes.FailedPrecondition,
				"a KEK rotation is already in progress (version %d is %s); follow it with `cabinet operator kek status`",
				k.GetVersion(), fsm.KEKStateName(st))
		}
		next = max(next, k.GetVersion()+1)
	}
	if _, ok := s.cfg.State.Node(s.cfg.NodeID); !ok {
		return nil, status.Errorf(codes.FailedPrecondition, "node %s is not a member yet; ask another node", s.cfg.NodeID)
	}
	kcv, err := s.generateKEK(ctx, next)
	if errors.Is(err, hsm.ErrKEKExists) {
		// The state read above (under hsmMu, so the node loop installed
		// nothing since) has no version `next`: this key was left by an
		// attempt that never reached the state, so nothing is sealed under
		// it. Check again anyway in case a rotation committed meanwhile.
		if s.kekVersionKnown(next) {
			return nil, status.Errorf(codes.FailedPrecondition,
				"a KEK rotation to version %d started meanwhile; follow it with `cabinet operator kek status`", next)
		}
		s.log.Warn("KEK rotation: replacing an unused KEK version left in this node's HSM by an earlier attempt", "kek_version", next)
		if err := s.cfg.HSM.DestroyKEK(ctx, next); err != nil {
			return nil, status.Errorf(codes.Unavailable, "remove the unused KEK version %d from this node's HSM: %v", next, err)
		}
		kcv, err = s.generateKEK(ctx, next)
	}
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "generate KEK version %d in node %s's HSM: %v", next, s.cfg.NodeID, err)
	}
	kek := &fsmpb.KEKVersion{Version: next, CheckValue: kcv, GeneratedBy: s.cfg.NodeID}
	for _, n := range s.cfg.State.Nodes() {
		if n.GetNodeId() == s.cfg.NodeID {
			continue
		}
		d, err := s.deliverKEK(ctx, next, n)
		if err != nil {
			return nil, err
		}
		kek.Deliveries = append(kek.Deliveries, d)
	}
	res, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_BEGIN_KEK_ROTATION, &fsmpb.BeginKEKRotation{Kek: kek},
		requestID(ctx, req.GetRequestId()), principal(ctx))
	if err != nil {
		return nil, err
	}
	s.log.Warn("KEK rotation started", "kek_version", next, "deliveries", len(kek.GetDeliveries()), "by", principal(ctx), "result", res.GetMessage())
	return s.kekStatusResponse(), nil
}

func (s *Server) kekVersionKnown(v uint32) bool {
	for _, k := range s.cfg.State.Cluster().GetKekVersions() {
		if k.GetVersion() == v {
			return true
		}
	}
	return false
}

// generateKEK retries a failed generation twice: SoftHSM 2.6 sometimes fails
// C_GenerateKey (CKR_GENERAL_ERROR, nothing created) while other sessions
// search the token.
func (s *Server) generateKEK(ctx context.Context, v uint32) ([]byte, error) {
	var err error
	for attempt := range 3 {
		var kcv []byte
		if kcv, err = s.cfg.HSM.GenerateKEK(ctx, v); err == nil || errors.Is(err, hsm.ErrKEKExists) {
			return kcv, err
		}
		s.log.Warn("KEK rotation: generate failed; retrying", "kek_version", v, "attempt", attempt+1, "err", err)
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil, err
}

// deliverKEK wraps KEK version v inside this node's HSM for node n's identity key.
func (s *Server) deliverKEK(ctx context.Context, v uint32, n *fsmpb.NodeRecord) (*fsmpb.KEKDelivery, error) {
	pubAny, err := x509.ParsePKIXPublicKey(n.GetIdentityPublicKeyDer())
	pub, ok := pubAny.(*rsa.PublicKey)
	if err != nil || !ok {
		return nil, status.Errorf(codes.Internal, "node %s has no usable identity public key in the state", n.GetNodeId())
	}
	wrapped, err := s.cfg.HSM.WrapKEK(ctx, v, pub)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "wrap KEK version %d for node %s: %v", v, n.GetNodeId(), err)
	}
	return &fsmpb.KEKDelivery{NodeId: n.GetNodeId(), Wrapped: wrapped}, nil
}

// KEKStatus reports the KEK versions and the progress of a rotation.
func (s *Server) KEKStatus(context.Context, *cabinetpb.KEKStatusRequest) (*cabinetpb.KEKStatusResponse, error) {
	if s.cfg.State.Cluster() == nil {
		return nil, status.Error(codes.Unavailable, "the cluster is not initialised yet")
	}
	return s.kekStatusResponse(), nil
}

func (s *Server) kekStatusResponse() *cabinetpb.KEKStatusResponse {
	ci := s.cfg.State.Cluster()
	prog := s.cfg.State.KEKProgress()
	out := &cabinetpb.KEKStatusResponse{CurrentVersion: ci.GetCurrentKekVersion(), Phase: "idle", Done: true}
	var nodes []string
	for _, n := range s.cfg.State.Nodes() {
		nodes = append(nodes, n.GetNodeId())
	}
	out.Nodes = nodes
	missing := func(have []string) []string {
		var m []string
		for _, n := range nodes {
			if !slices.Contains(have, n) {
				m = append(m, n)
			}
		}
		return m
	}
	var parts []string
	for _, k := range ci.GetKekVersions() {
		vs := &cabinetpb.KEKVersionStatus{
			Version: k.GetVersion(), State: fsm.KEKStateName(k.GetState()), CheckValue: hex.EncodeToString(k.GetCheckValue()),
			InstalledOn: k.GetInstalledOn(), RemovedFrom: k.GetRemovedFrom(), SealedBlobs: uint64(prog.SealedBlobs[k.GetVersion()]),
			GeneratedBy: k.GetGeneratedBy(), Created: ts(k.GetCreatedUnixNano()), Activated: ts(k.GetActivatedUnixNano()),
			Retired: ts(k.GetRetiredUnixNano()), Destroyed: ts(k.GetDestroyedUnixNano()),
		}
		switch k.GetState() {
		case fsmpb.KEKState_KEK_STATE_PENDING:
			vs.WaitingFor = missing(k.GetInstalledOn())
			out.Phase, out.Done = "distributing", false
			if len(vs.WaitingFor) == 0 {
				parts = append(parts, fmt.Sprintf("version %d installed on every node; activating", k.GetVersion()))
			} else {
				parts = append(parts, fmt.Sprintf("version %d installed on %d/%d nodes (waiting for %s)",
					k.GetVersion(), len(nodes)-len(vs.WaitingFor), len(nodes), strings.Join(vs.WaitingFor, ", ")))
			}
		case fsmpb.KEKState_KEK_STATE_DRAINING:
			if out.Phase == "idle" {
				out.Phase = "re-wrapping"
			}
			out.Done = false
			parts = append(parts, fmt.Sprintf("version %d: %d blob(s) left to re-wrap under version %d",
				k.GetVersion(), vs.GetSealedBlobs(), ci.GetCurrentKekVersion()))
		case fsmpb.KEKState_KEK_STATE_RETIRED:
			vs.WaitingFor = missing(k.GetRemovedFrom())
			if out.Phase == "idle" {
				out.Phase = "removing"
			}
			out.Done = false
			if len(vs.WaitingFor) == 0 {
				parts = append(parts, fmt.Sprintf("version %d removed from every HSM; finishing", k.GetVersion()))
			} else {
				parts = append(parts, fmt.Sprintf("version %d removed from %d/%d HSMs (waiting for %s)",
					k.GetVersion(), len(nodes)-len(vs.WaitingFor), len(nodes), strings.Join(vs.WaitingFor, ", ")))
			}
		}
		out.Versions = append(out.Versions, vs)
	}
	if out.Done {
		out.Summary = fmt.Sprintf("KEK version %d is current; no rotation in progress (%d blob(s) sealed under it)",
			ci.GetCurrentKekVersion(), prog.SealedBlobs[ci.GetCurrentKekVersion()])
	} else {
		out.Summary = out.Phase + ": " + strings.Join(parts, "; ")
	}
	return out
}

// RunKEKNodeDuties runs this node's part of KEK rotations every `every`
// until ctx ends: install versions delivered to it, remove retired ones.
func (s *Server) RunKEKNodeDuties(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		s.KEKNodeStep(ctx)
		s.FeatureStep(ctx) // the same loop: features.go
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// KEKNodeStep does this node's KEK duties once (see RunKEKNodeDuties).
func (s *Server) KEKNodeStep(ctx context.Context) {
	ci := s.cfg.State.Cluster()
	if ci == nil {
		return
	}
	if _, member := s.cfg.State.Node(s.cfg.NodeID); !member {
		return
	}

	s.kek.hsmMu.Lock()
	defer s.kek.hsmMu.Unlock()
	ci = s.cfg.State.Cluster()
	for _, k := range ci.GetKekVersions() {
		if ctx.Err() != nil {
			return
		}
		var err error
		switch st := k.GetState(); {
		case st == fsmpb.KEKState_KEK_STATE_PENDING || fsm.KEKOpensMaterial(st):
			if !slices.Contains(k.GetInstalledOn(), s.cfg.NodeID) {
				err = s.installKEK(ctx, k)
			}
		case st == fsmpb.KEKState_KEK_STATE_RETIRED:
			if !slices.Contains(k.GetRemovedFrom(), s.cfg.NodeID) {
				err = s.removeKEK(ctx, k)
			}
		}
		if err != nil {
			s.kek.warnOnce(s.log, fmt.Sprint(k.GetVersion(), err), "KEK rotation: this node's step failed; retrying", "kek_version", k.GetVersion(), "err", err)
		}
	}
}

// installKEK makes sure this node's HSM holds version k (unwrapping its
// delivery if needed) and reports it.
func (s *Server) installKEK(ctx context.Context, k *fsmpb.KEKVersion) error {
	v := k.GetVersion()
	got, err := s.cfg.HSM.KEKCheckValue(ctx, v)
	switch {
	case err == nil && subtle.ConstantTimeCompare(got, k.GetCheckValue()) == 1:
		// held: report below
	case err == nil && k.GetState() == fsmpb.KEKState_KEK_STATE_PENDING:
		// A different key under that label: left by a rotation attempt of
		// this node that lost (the state names another generator) or by a
		// restored older state. Nothing is sealed under it.
		s.log.Warn("KEK rotation: this node's HSM holds another key as KEK version; removing it before installing the cluster's", "kek_version", v)
		if err := s.cfg.HSM.DestroyKEK(ctx, v); err != nil {
			return err
		}
		return s.unwrapDelivery(ctx, k)
	case err == nil:
		return fmt.Errorf("KEK version %d in this node's HSM does not match the cluster's check value", v)
	case errors.Is(err, hsm.ErrKEKNotFound):
		return s.unwrapDelivery(ctx, k)
	default:
		return err
	}
	_, err = s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_KEK_INSTALLED,
		&fsmpb.KEKInstalled{Version: v, NodeId: s.cfg.NodeID, CheckValue: k.GetCheckValue()}, autoRequestID("kek-installed"), s.nodePrincipal())
	if err == nil {
		s.log.Info("KEK version held by this node's HSM recorded in the state", "kek_version", v)
	}
	return err
}

func (s *Server) unwrapDelivery(ctx context.Context, k *fsmpb.KEKVersion) error {
	for _, d := range k.GetDeliveries() {
		if d.GetNodeId() != s.cfg.NodeID {
			continue
		}
		kcv, err := s.cfg.HSM.UnwrapKEK(ctx, k.GetVersion(), d.GetWrapped())
		if err != nil {
			return fmt.Errorf("unwrap KEK version %d delivered to this node: %w", k.GetVersion(), err)
		}
		if subtle.ConstantTimeCompare(kcv, k.GetCheckValue()) != 1 {
			_ = s.cfg.HSM.DestroyKEK(ctx, k.GetVersion())
			return fmt.Errorf("KEK version %d delivered to this node does not match the cluster's check value; removed it", k.GetVersion())
		}
		_, err = s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_KEK_INSTALLED,
			&fsmpb.KEKInstalled{Version: k.GetVersion(), NodeId: s.cfg.NodeID, CheckValue: kcv}, autoRequestID("kek-installed"), s.nodePrincipal())
		if err == nil {
			s.log.Info("KEK rotation: KEK version unwrapped in this node's HSM", "kek_version", k.GetVersion())
		}
		return err
	}
	return nil // no delivery yet: the leader makes one
}

// removeKEK destroys RETIRED version k in this node's HSM and reports it.
func (s *Server) removeKEK(ctx context.Context, k *fsmpb.KEKVersion) error {
	if err := s.cfg.HSM.DestroyKEK(ctx, k.GetVersion()); err != nil {
		return fmt.Errorf("destroy KEK version %d in this node's HSM: %w", k.GetVersion(), err)
	}
	_, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_KEK_REMOVED,
		&fsmpb.KEKRemoved{Version: k.GetVersion(), NodeId: s.cfg.NodeID}, autoRequestID("kek-removed"), s.nodePrincipal())
	if err == nil {
		s.log.Warn("KEK rotation: retired KEK version destroyed in this node's HSM", "kek_version", k.GetVersion())
	}
	return err
}

// ProposeKEKWork is the leader's part of KEK rotations (RunLeaderLoop).
func (s *Server) ProposeKEKWork(ctx context.Context) {
	s.kek.mu.Lock()
	defer s.kek.mu.Unlock()
	ci := s.cfg.State.Cluster()
	if ci == nil {
		return
	}
	for _, k := range ci.GetKekVersions() {
		var err error
		if fsm.KEKOpensMaterial(k.GetState()) {
			err = s.deliverMissing(ctx, k) // PENDING: in advancePendingKEK
		}
		switch k.GetState() {
		case fsmpb.KEKState_KEK_STATE_PENDING:
			err = errors.Join(err, s.advancePendingKEK(ctx, k))
		case fsmpb.KEKState_KEK_STATE_DRAINING:
			err = errors.Join(err, s.drainKEK(ctx, k.GetVersion()))
		}
		if err != nil && ctx.Err() == nil {
			s.kek.warnOnce(s.log, fmt.Sprint("leader", k.GetVersion(), err), "KEK rotation: leader step failed; retrying", "kek_version", k.GetVersion(), "err", err)
		}
	}
}

// deliverMissing wraps version k (held by this leader) for members that
// neither hold it nor have a delivery: nodes that joined while it was being
// activated, or were removed and admitted again.
func (s *Server) deliverMissing(ctx context.Context, k *fsmpb.KEKVersion) error {
	var missing []*fsmpb.NodeRecord
	for _, n := range s.cfg.State.Nodes() {
		if !slices.Contains(k.GetInstalledOn(), n.GetNodeId()) &&
			!slices.ContainsFunc(k.GetDeliveries(), func(d *fsmpb.KEKDelivery) bool { return d.GetNodeId() == n.GetNodeId() }) {
			missing = append(missing, n)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	got, err := s.cfg.HSM.KEKCheckValue(ctx, k.GetVersion())
	if err != nil || subtle.ConstantTimeCompare(got, k.GetCheckValue()) != 1 {
		return nil // not held here yet; this node's loop installs it first
	}
	p := &fsmpb.DeliverKEK{Version: k.GetVersion()}
	for _, n := range missing {
		d, err := s.deliverKEK(ctx, k.GetVersion(), n)
		if err != nil {
			return err
		}
		p.Deliveries = append(p.Deliveries, d)
	}
	_, err = s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_DELIVER_KEK, p, autoRequestID("kek-deliver"), s.nodePrincipal())
	return err
}

// advancePendingKEK delivers PENDING version k to members that have neither
// it nor a delivery, and activates it once every member holds it.
func (s *Server) advancePendingKEK(ctx context.Context, k *fsmpb.KEKVersion) error {
	members := s.cfg.State.Nodes()
	installed, reachable := true, false
	for _, n := range members {
		held := slices.Contains(k.GetInstalledOn(), n.GetNodeId())
		installed = installed && held
		reachable = reachable || held ||
			slices.ContainsFunc(k.GetDeliveries(), func(d *fsmpb.KEKDelivery) bool { return d.GetNodeId() == n.GetNodeId() })
	}
	if installed {
		_, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_ACTIVATE_KEK, &fsmpb.ActivateKEK{Version: k.GetVersion()},
			autoRequestID(fmt.Sprintf("kek-activate/%d", k.GetVersion())), s.nodePrincipal())
		if err == nil {
			s.log.Warn("KEK rotation: every node holds the new KEK version; it is now current", "kek_version", k.GetVersion())
		}
		return err
	}
	if _, err := s.cfg.HSM.KEKCheckValue(ctx, k.GetVersion()); !reachable && errors.Is(err, hsm.ErrKEKNotFound) {
		// No member holds it or has a delivery, and this leader cannot make
		// one: it can never become current (e.g. a snapshot taken
		// mid-rotation restored into other nodes). Nothing is sealed under a
		// PENDING version, so give it up; a new rotation can start.
		_, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_ABANDON_KEK_ROTATION, &fsmpb.AbandonKEKRotation{
			Version: k.GetVersion(), Reason: "no member holds it or has a delivery of it"},
			autoRequestID(fmt.Sprintf("kek-abandon/%d", k.GetVersion())), s.nodePrincipal())
		if err == nil {
			s.log.Warn("KEK rotation abandoned: no member holds the pending version or has a delivery of it; start a new one with `cabinet operator kek rotate`", "kek_version", k.GetVersion())
		}
		return err
	}
	return s.deliverMissing(ctx, k)
}

// drainKEK re-wraps blobs sealed under DRAINING version old in batches for
// up to kekWorkBudget, and retires it once nothing is sealed under it.
func (s *Server) drainKEK(ctx context.Context, old uint32) error {
	deadline := time.Now().Add(kekWorkBudget)
	if s.kek.version != old {
		s.kek.version, s.kek.cursor = old, ""
	}
	// The few cluster-wide blobs first.
	if err := s.rewrapClusterBlobs(ctx, old); err != nil {
		return err
	}
	for time.Now().Before(deadline) && ctx.Err() == nil {
		ci := s.cfg.State.Cluster()
		cur := ci.GetCurrentKekVersion()
		items, next := s.cfg.State.MaterialUnderKEK(old, s.kek.cursor, KEKRewrapBatch, kekScanLimit)
		p := &fsmpb.RewrapMaterial{}
		for _, it := range items {
			aad := keyops.MaterialAAD(it.Key.GetKeyId(), it.Version.GetVersion(), it.Key.GetSpec())
			blob, err := s.reseal(ctx, old, cur, it.Version.GetMaterial().GetBlob(), aad)
			if err != nil {
				return fmt.Errorf("re-wrap key %s version %d: %w", it.Key.GetKeyId(), it.Version.GetVersion(), err)
			}
			p.Keys = append(p.Keys, &fsmpb.RewrappedKeyVersion{KeyId: it.Key.GetKeyId(), Version: it.Version.GetVersion(), FromKekVersion: old,
				Material: &fsmpb.WrappedBlob{KekVersion: cur, Blob: blob}})
		}
		// A key with many versions can exceed one command's limit.
		for len(p.Keys) > 0 {
			part := &fsmpb.RewrapMaterial{Keys: p.Keys[:min(len(p.Keys), fsm.MaxRewrapBatch)]}
			p.Keys = p.Keys[len(part.Keys):]
			if _, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_REWRAP_MATERIAL, part, autoRequestID("kek-rewrap"), s.nodePrincipal()); err != nil {
				return err
			}
		}
		if len(items) > 0 {
			s.kek.cursor = items[len(items)-1].Key.GetKeyId()
		}
		if next != "" {
			s.kek.cursor = next
			continue
		}
		// End of a pass.
		s.kek.cursor = ""
		if n := s.cfg.State.KEKProgress().SealedBlobs[old]; n > 0 {
			if len(items) == 0 && s.pendingOnlyClusterBlobs(old) {
				return nil
			}
			continue // created meanwhile: another pass
		}
		_, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_RETIRE_KEK, &fsmpb.RetireKEK{Version: old},
			autoRequestID(fmt.Sprintf("kek-retire/%d", old)), s.nodePrincipal())
		if err == nil {
			s.log.Warn("KEK rotation: nothing is sealed under the old KEK version any more; retired, nodes now remove it from their HSMs", "kek_version", old)
		}
		return err
	}
	return nil
}

// pendingOnlyClusterBlobs reports whether the blobs left under old are all
// cluster-wide ones (re-wrapped at the start of the next call).
func (s *Server) pendingOnlyClusterBlobs(old uint32) bool {
	items, _ := s.cfg.State.MaterialUnderKEK(old, "", 1, 1<<30)
	return len(items) == 0
}

// rewrapClusterBlobs re-wraps the CA key, the gossip key and import tokens'
// private keys sealed under old.
func (s *Server) rewrapClusterBlobs(ctx context.Context, old uint32) error {
	ci := s.cfg.State.Cluster()
	cur := ci.GetCurrentKekVersion()
	p := &fsmpb.RewrapMaterial{}
	n := 0
	if b := ci.GetCaKey(); b.GetKekVersion() == old {
		blob, err := s.reseal(ctx, old, cur, b.GetBlob(), CAKeyAAD(ci.GetClusterId()))
		if err != nil {
			return fmt.Errorf("re-wrap the CA key: %w", err)
		}
		p.CaKey, p.CaKeyFrom = &fsmpb.WrappedBlob{KekVersion: cur, Blob: blob}, old
		n++
	}
	if b := ci.GetGossipKey(); b != nil && b.GetKekVersion() == old {
		blob, err := s.reseal(ctx, old, cur, b.GetBlob(), GossipKeyAAD(ci.GetClusterId()))
		if err != nil {
			return fmt.Errorf("re-wrap the gossip key: %w", err)
		}
		p.GossipKey, p.GossipKeyFrom = &fsmpb.WrappedBlob{KekVersion: cur, Blob: blob}, old
		p.GossipKeyGeneration = fsm.GossipKeyGeneration(ci) // skipped if a rotation lands first
		n++
	}
	for _, tok := range s.cfg.State.ImportTokensUnderKEK(old) {
		if len(p.ImportTokens) >= KEKRewrapBatch {
			break
		}
		blob, err := s.reseal(ctx, old, cur, tok.GetPrivateKey().GetBlob(), keyops.ImportKeyAAD(tok.GetTokenId()))
		if err != nil {
			return fmt.Errorf("re-wrap import token %s: %w", tok.GetTokenId(), err)
		}
		p.ImportTokens = append(p.ImportTokens, &fsmpb.RewrappedImportToken{TokenId: tok.GetTokenId(), FromKekVersion: old,
			PrivateKey: &fsmpb.WrappedBlob{KekVersion: cur, Blob: blob}})
		n++
	}
	if n == 0 {
		return nil
	}
	_, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_REWRAP_MATERIAL, p, autoRequestID("kek-rewrap"), s.nodePrincipal())
	return err
}

// reseal opens blob under KEK version from and seals the plaintext under
// version to, both inside this node's HSM; the plaintext is zeroed.
func (s *Server) reseal(ctx context.Context, from, to uint32, blob, aad []byte) ([]byte, error) {
	pt, err := s.cfg.HSM.Open(ctx, from, blob, aad)
	if err != nil {
		return nil, err
	}
	defer clear(pt)
	return s.cfg.HSM.Seal(ctx, to, pt, aad)
}
