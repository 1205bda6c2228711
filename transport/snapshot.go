package transport

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// Snapshots and recovery export (OperatorService SnapshotSave,
// SnapshotRestore, RecoveryExport).
//
// A snapshot is taken and restored on the leader. Any node accepts the call:
// a follower relays it to the leader's OperatorService with its node
// certificate, which is why the two snapshot methods also admit the node
// role (a node already holds the whole state and may propose any command,
// so this gives it nothing new). A relayed call is never relayed again.

// SnapshotCluster is what the snapshot handlers need from the Raft node
// (cluster.Node) beyond Cluster.
type SnapshotCluster interface {
	OpenSnapshot(ctx context.Context) (cluster.SnapshotInfo, io.ReadCloser, error)
	RestoreSnapshot(ctx context.Context, data []byte) (uint64, error)
	Servers() ([]cluster.Server, error)
}

// snapshotChunkSize is the data carried per SnapshotChunk.
const snapshotChunkSize = 256 << 10

// maxSnapshotStream bounds what SnapshotRestore accepts (the fsm format's
// limit plus its header and checksum).
const maxSnapshotStream = fsm.MaxSnapshotStateBytes + 64

// RecoveryBundleFormat is the RecoveryBundle format this server writes.
const RecoveryBundleFormat = 1

// MinRecoveryKeyBits is the smallest recovery public key accepted.
const MinRecoveryKeyBits = 4096

func (s *Server) snapshotCluster() (SnapshotCluster, error) {
	sc, ok := s.cfg.Cluster.(SnapshotCluster)
	if !ok {
		return nil, status.Error(codes.Unimplemented, "this node cannot take or restore snapshots")
	}
	return sc, nil
}

// leaderPeer returns an OperatorService client on the leader, for relaying a
// snapshot call; a relayed call (node role) is refused instead of relayed
// again.
func (s *Server) leaderPeer(ctx context.Context) (cabinetpb.OperatorServiceClient, error) {
	if id, _ := IdentityFrom(ctx); id.Role == roleNode {
		return nil, status.Errorf(codes.Unavailable, "node %s is not the leader any more; retry", s.cfg.NodeID)
	}
	lid, addr := s.cfg.Cluster.Leader()
	if lid == "" || addr == "" {
		return nil, status.Error(codes.Unavailable, cluster.ErrNoLeader.Error())
	}
	if s.cfg.Peers == nil {
		return nil, status.Error(codes.Unavailable, "this node cannot reach the leader (no peer clients); call the leader directly")
	}
	conn, err := s.cfg.Peers.conn(addr)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "reach the leader %s: %v", lid, err)
	}
	return cabinetpb.NewOperatorServiceClient(conn), nil
}

// SnapshotSave streams a snapshot taken on the leader: the first chunk
// carries the metadata, the last one the hex SHA-256 of all data bytes.
func (s *Server) SnapshotSave(_ *cabinetpb.SnapshotSaveRequest, stream cabinetpb.OperatorService_SnapshotSaveServer) error {
	ctx := stream.Context()
	sc, err := s.snapshotCluster()
	if err != nil {
		return err
	}
	if !s.cfg.Cluster.IsLeader() {
		peer, err := s.leaderPeer(ctx)
		if err != nil {
			return err
		}
		up, err := peer.SnapshotSave(ctx, &cabinetpb.SnapshotSaveRequest{})
		if err != nil {
			return relayError(err)
		}
		for {
			chunk, err := up.Recv()
			if err == io.EOF {
				return nil
			}
			if err != nil {
				return relayError(err)
			}
			if err := stream.Send(chunk); err != nil {
				return err
			}
		}
	}
	ci := s.cfg.State.Cluster()
	if ci == nil {
		return status.Error(codes.Unavailable, "the cluster is not initialised yet")
	}
	info, rc, err := sc.OpenSnapshot(ctx)
	if err != nil {
		return toStatus(err)
	}
	defer rc.Close()
	meta := &cabinetpb.SnapshotMeta{Index: info.Index, Term: info.Term, Size: uint64(info.Size),
		ClusterId: ci.GetClusterId(), TakenAt: timestamppb.New(s.cfg.Clock())}
	h := sha256.New()
	buf := make([]byte, snapshotChunkSize)
	var sent int64
	first := true
	for {
		n, rerr := io.ReadFull(rc, buf)
		if n > 0 {
			h.Write(buf[:n])
			sent += int64(n)
			chunk := &cabinetpb.SnapshotChunk{Data: buf[:n]}
			if first {
				chunk.Meta, first = meta, false
			}
			if err := stream.Send(chunk); err != nil {
				return err
			}
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			break
		}
		if rerr != nil {
			return status.Errorf(codes.Internal, "read snapshot: %v", rerr)
		}
	}
	if sent != info.Size {
		return status.Errorf(codes.Internal, "snapshot is %d bytes, its metadata says %d", sent, info.Size)
	}
	last := &cabinetpb.SnapshotChunk{Sha256: hex.EncodeToString(h.Sum(nil))}
	if first {
		last.Meta = meta
	}
	if err := stream.Send(last); err != nil {
		return err
	}
	s.log.Info("snapshot streamed", "index", info.Index, "term", info.Term, "bytes", info.Size)
	return nil
}

// relayError passes the leader's status on; "not leader" becomes Unavailable
// so the client retries.
func relayError(err error) error {
	st, ok := status.FromError(err)
	if !ok {
		return status.Errorf(codes.Unavailable, "relay to the leader: %v", err)
	}
	if st.Code() == codes.Aborted {
		return status.Error(codes.Unavailable, st.Message())
	}
	return err
}

// receiveSnapshot reads a whole SnapshotRestore stream and checks its
// framing: metadata first, size and SHA-256 as announced.
func receiveSnapshot(stream cabinetpb.OperatorService_SnapshotRestoreServer) (*cabinetpb.SnapshotMeta, []byte, error) {
	var meta *cabinetpb.SnapshotMeta
	var data bytes.Buffer
	var sum string
	for {
		chunk, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, nil, err
		}
		if sum != "" {
			return nil, nil, status.Error(codes.InvalidArgument, "snapshot stream: data after the chunk carrying the checksum")
		}
		if chunk.GetMeta() != nil {
			if meta != nil || data.Len() > 0 {
				return nil, nil, status.Error(codes.InvalidArgument, "snapshot stream: metadata must come once, in the first chunk")
			}
			meta = chunk.GetMeta()
			if meta.GetSize() == 0 || meta.GetSize() > maxSnapshotStream {
				return nil, nil, status.Errorf(codes.InvalidArgument, "snapshot stream: size %d out of range", meta.GetSize())
			}
		} else if meta == nil {
			return nil, nil, status.Error(codes.InvalidArgument, "snapshot stream: the first chunk must carry the metadata")
		}
		if uint64(data.Len()+len(chunk.GetData())) > meta.GetSize() {
			return nil, nil, status.Errorf(codes.InvalidArgument, "snapshot stream: more data than the %d bytes announced", meta.GetSize())
		}
		data.Write(chunk.GetData())
		sum = chunk.GetSha256()
	}
	switch {
	case meta == nil:
		return nil, nil, status.Error(codes.InvalidArgument, "snapshot stream is empty")
	case uint64(data.Len()) != meta.GetSize():
		return nil, nil, status.Errorf(codes.InvalidArgument, "snapshot stream: %d bytes received, %d announced (truncated upload)", data.Len(), meta.GetSize())
	case sum == "":
		return nil, nil, status.Error(codes.InvalidArgument, "snapshot stream: the last chunk must carry the SHA-256")
	}
	got := sha256.Sum256(data.Bytes())
	want, err := hex.DecodeString(sum)
	if err != nil || subtle.ConstantTimeCompare(got[:], want) != 1 {
		return nil, nil, status.Errorf(codes.InvalidArgument, "snapshot stream: SHA-256 mismatch (sent %.16s…, received data hashes to %.16s…)", sum, hex.EncodeToString(got[:]))
	}
	return meta, data.Bytes(), nil
}

// SnapshotRestore replaces the cluster's state with an uploaded snapshot.
// The snapshot must be intact and consistent, belong to this cluster, and
// every KEK version it uses must be the one this cluster's HSMs hold (a
// snapshot of another cluster is restored into new HSMs with `cabinet
// operator recovery restore`). The running cluster's members replace the
// snapshot's node records: membership is the cluster's, not the backup's.
func (s *Server) SnapshotRestore(stream cabinetpb.OperatorService_SnapshotRestoreServer) error {
	ctx := stream.Context()
	sc, err := s.snapshotCluster()
	if err != nil {
		return err
	}
	meta, data, err := receiveSnapshot(stream)
	if err != nil {
		return err
	}
	st, err := fsm.ReadSnapshot(bytes.NewReader(data))
	if err == nil {
		_, err = fsm.StateFromProto(st)
	}
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "refusing to restore: %v", err)
	}
	if !s.cfg.Cluster.IsLeader() {
		peer, err := s.leaderPeer(ctx)
		if err != nil {
			return err
		}
		up, err := peer.SnapshotRestore(ctx)
		if err != nil {
			return relayError(err)
		}
		if err := sendSnapshot(up.Send, meta, data); err != nil {
			if _, rerr := up.CloseAndRecv(); rerr != nil {
				return relayError(rerr)
			}
			return status.Errorf(codes.Unavailable, "relay to the leader: %v", err)
		}
		resp, err := up.CloseAndRecv()
		if err != nil {
			return relayError(err)
		}
		return stream.SendAndClose(resp)
	}
	ci := s.cfg.State.Cluster()
	if ci == nil {
		return status.Error(codes.FailedPrecondition, "the cluster is not initialised; to build a new cluster from a snapshot use `cabinet operator recovery restore`")
	}
	snapCI := st.GetCluster()
	if snapCI.GetClusterId() != ci.GetClusterId() {
		return status.Errorf(codes.FailedPrecondition, "the snapshot is of cluster %q, this is cluster %q; restore another cluster's snapshot into new nodes with `cabinet operator recovery restore`",
			snapCI.GetClusterId(), ci.GetClusterId())
	}
	// During a KEK rotation nodes are installing or destroying versions the
	// snapshot may need, and only this (the leader's) HSM is checked below.
	for _, k := range ci.GetKekVersions() {
		if st := k.GetState(); st == fsmpb.KEKState_KEK_STATE_PENDING || st == fsmpb.KEKState_KEK_STATE_DRAINING || st == fsmpb.KEKState_KEK_STATE_RETIRED {
			return status.Errorf(codes.FailedPrecondition,
				"refusing to restore during a KEK rotation (version %d is %s); wait until `cabinet operator kek status` shows idle",
				k.GetVersion(), fsm.KEKStateName(st))
		}
	}
	s.kek.hsmMu.Lock() // this node's loop destroys no KEK while restoring
	defer s.kek.hsmMu.Unlock()
	if err := s.checkSnapshotKEKs(ctx, st); err != nil {
		return err
	}
	var nodes []*fsmpb.NodeRecord
	servers, err := sc.Servers()
	if err != nil {
		return toStatus(err)
	}
	for _, srv := range servers {
		if rec, ok := s.cfg.State.Node(srv.ID); ok {
			nodes = append(nodes, rec)
		}
	}
	keys := len(st.GetKeys())
	restored, err := cluster.ReplaceMembership(st, nodes, false)
	if err != nil {
		return status.Errorf(codes.InvalidArgument, "refusing to restore: %v", err)
	}
	idx, err := sc.RestoreSnapshot(ctx, restored)
	if err != nil {
		if errors.Is(err, fsm.ErrCorruptSnapshot) {
			return status.Errorf(codes.InvalidArgument, "refusing to restore: %v", err)
		}
		return toStatus(err)
	}
	s.log.Warn("cluster state restored from a snapshot", "snapshot_index", meta.GetIndex(), "snapshot_term", meta.GetTerm(),
		"keys", keys, "new_index", idx, "by", principal(ctx))
	return stream.SendAndClose(&cabinetpb.SnapshotRestoreResponse{Index: idx, Keys: uint64(keys)})
}

// checkSnapshotKEKs: every KEK version the snapshot lists as active or
// seals material under must be held by this node's HSM with the snapshot's
// check value.
func (s *Server) checkSnapshotKEKs(ctx context.Context, st *fsmpb.State) error {
	want := map[uint32][]byte{}
	for _, k := range st.GetCluster().GetKekVersions() {
		if fsm.KEKOpensMaterial(k.GetState()) {
			want[k.GetVersion()] = k.GetCheckValue()
		}
	}
	used := map[uint32]bool{st.GetCluster().GetCaKey().GetKekVersion(): true}
	for _, k := range st.GetKeys() {
		for _, v := range k.GetVersions() {
			if m := v.GetMaterial(); m != nil {
				used[m.GetKekVersion()] = true
			}
		}
	}
	for v := range used {
		if _, ok := want[v]; !ok {
			var cv []byte
			for _, k := range st.GetCluster().GetKekVersions() {
				if k.GetVersion() == v {
					cv = k.GetCheckValue()
				}
			}
			if cv == nil {
				return status.Errorf(codes.InvalidArgument, "refusing to restore: material is sealed under KEK version %d, which the snapshot does not list", v)
			}
			want[v] = cv
		}
	}
	var missing []string
	for v, cv := range want {
		got, err := s.cfg.HSM.KEKCheckValue(ctx, v)
		if err != nil || subtle.ConstantTimeCompare(got, cv) != 1 {
			missing = append(missing, fmt.Sprint(v))
		}
	}
	if len(missing) > 0 {
		return status.Errorf(codes.FailedPrecondition, "refusing to restore: this cluster's HSM does not hold the snapshot's KEK version(s) %s; restore into new nodes with `cabinet operator recovery restore` and a recovery bundle",
			strings.Join(missing, ", "))
	}
	return nil
}

// sendSnapshot sends data in SnapshotChunk framing: meta first, SHA-256 last.
func sendSnapshot(send func(*cabinetpb.SnapshotChunk) error, meta *cabinetpb.SnapshotMeta, data []byte) error {
	sum := sha256.Sum256(data)
	for off := 0; ; off += snapshotChunkSize {
		end := min(off+snapshotChunkSize, len(data))
		chunk := &cabinetpb.SnapshotChunk{Data: data[off:end]}
		if off == 0 {
			chunk.Meta = meta
		}
		if end == len(data) {
			chunk.Sha256 = hex.EncodeToString(sum[:])
			return send(chunk)
		}
		if err := send(chunk); err != nil {
			return err
		}
	}
}

// oaepHasher is implemented by the HSM providers (hsm.RecoveryKEKUnwrapper).
type oaepHasher interface{ OAEPHash() crypto.Hash }

// RecoveryExport wraps every active KEK version under an operator's offline
// RSA recovery public key (at least 4096 bits) with this node's HSM.
func (s *Server) RecoveryExport(ctx context.Context, req *cabinetpb.RecoveryExportRequest) (*cabinetpb.RecoveryBundle, error) {
	pubAny, err := x509.ParsePKIXPublicKey(req.GetRecoveryPublicKeyDer())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, "recovery_public_key_der is not a PKIX public key (make one with `cabinet operator recovery keygen`)")
	}
	pub, ok := pubAny.(*rsa.PublicKey)
	if !ok || pub.N.BitLen() < MinRecoveryKeyBits {
		return nil, status.Errorf(codes.InvalidArgument, "the recovery key must be RSA with at least %d bits", MinRecoveryKeyBits)
	}
	ci := s.cfg.State.Cluster()
	if ci == nil {
		return nil, status.Error(codes.Unavailable, "the cluster is not initialised yet")
	}
	if _, ok, why := s.kekStatus(ctx); !ok {
		return nil, status.Errorf(codes.Unavailable, "node %s cannot export: %s", s.cfg.NodeID, why)
	}
	fp := sha256.Sum256(req.GetRecoveryPublicKeyDer())
	hash := "sha1"
	if h, ok := s.cfg.HSM.(oaepHasher); ok && h.OAEPHash() == crypto.SHA256 {
		hash = "sha256"
	}
	out := &cabinetpb.RecoveryBundle{
		Format: RecoveryBundleFormat, ClusterId: ci.GetClusterId(), CurrentKekVersion: ci.GetCurrentKekVersion(),
		RecoveryKeyFingerprint: hex.EncodeToString(fp[:]), OaepHash: hash, CreatedAt: timestamppb.New(s.cfg.Clock()),
	}
	for _, k := range ci.GetKekVersions() {
		if !fsm.KEKOpensMaterial(k.GetState()) {
			continue
		}
		got, err := s.cfg.HSM.KEKCheckValue(ctx, k.GetVersion())
		if err != nil || subtle.ConstantTimeCompare(got, k.GetCheckValue()) != 1 {
			return nil, status.Errorf(codes.Unavailable, "KEK version %d in node %s's HSM is missing or does not match the cluster's check value", k.GetVersion(), s.cfg.NodeID)
		}
		wrapped, err := s.cfg.HSM.WrapKEK(ctx, k.GetVersion(), pub)
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "wrap KEK version %d under the recovery key: %v", k.GetVersion(), err)
		}
		out.Keks = append(out.Keks, &cabinetpb.RecoveryKEK{Version: k.GetVersion(), Wrapped: wrapped, CheckValue: k.GetCheckValue()})
	}
	s.log.Warn("KEK exported under a recovery key", "versions", len(out.Keks), "recovery_key_fingerprint", out.RecoveryKeyFingerprint, "by", principal(ctx))
	return out, nil
}
