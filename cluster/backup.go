package cluster

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// Backup file layout (`cabinet operator snapshot save FILE`), all of it:
//
//	magic     8 bytes   "CBBACK1\n"
//	hdrlen    4 bytes   big-endian length H of the header (<= 64 KiB)
//	header    H bytes   JSON BackupHeader
//	data      N bytes   the snapshot in fsm's format (N = header.size); it
//	                    carries its own SHA-256 of the state
//	checksum  32 bytes  SHA-256 of every byte before it (magic .. data)
//
// The outer checksum makes the header (index, term, cluster) tamper-evident
// too; the inner one is what a Raft snapshot carries and FSM.Restore checks.
const backupMagic = "CBBACK1\n"

const (
	maxBackupHeader = 64 << 10
	// BackupFormat is the header format this package writes and reads.
	BackupFormat = 1
)

// ErrCorruptBackup is wrapped by every ReadBackup error that means the
// bytes are not an intact Cabinet snapshot file.
var ErrCorruptBackup = errors.New("corrupt snapshot file")

// BackupHeader is the metadata at the start of a snapshot file.
type BackupHeader struct {
	Format    int       `json:"format"`
	ClusterID string    `json:"cluster_id"`
	Index     uint64    `json:"index"`
	Term      uint64    `json:"term"`
	TakenAt   time.Time `json:"taken_at"`
	Size      int64     `json:"size"`
}

// BackupWriter streams a snapshot file: the header first, then the data as it
// arrives, then (Close) the checksum.
type BackupWriter struct {
	w       io.Writer
	h       hash.Hash
	size    int64
	written int64
}

// NewBackupWriter writes the magic and header to w.
func NewBackupWriter(w io.Writer, hdr BackupHeader) (*BackupWriter, error) {
	hdr.Format = BackupFormat
	if hdr.Size < 0 || hdr.Size > fsm.MaxSnapshotStateBytes+64 {
		return nil, fmt.Errorf("snapshot size %d out of range", hdr.Size)
	}
	hb, err := json.Marshal(hdr)
	if err != nil {
		return nil, err
	}
	bw := &BackupWriter{w: w, h: sha256.New(), size: hdr.Size}
	var pre [len(backupMagic) + 4]byte
	copy(pre[:], backupMagic)
	binary.BigEndian.PutUint32(pre[len(backupMagic):], uint32(len(hb)))
	if err := bw.put(pre[:]); err != nil {
		return nil, err
	}
	if err := bw.put(hb); err != nil {
		return nil, err
	}
	return bw, nil
}

func (b *BackupWriter) put(p []byte) error {
	b.h.Write(p)
	if _, err := b.w.Write(p); err != nil {
		return fmt.Errorf("write snapshot file: %w", err)
	}
	return nil
}

// Write appends snapshot data; more than the header's size is an error.
func (b *BackupWriter) Write(p []byte) (int, error) {
	if b.written+int64(len(p)) > b.size {
		return 0, fmt.Errorf("snapshot data exceeds the announced %d bytes", b.size)
	}
	if err := b.put(p); err != nil {
		return 0, err
	}
	b.written += int64(len(p))
	return len(p), nil
}

// Close checks that exactly the announced size was written and appends the
// checksum. It does not close the underlying writer.
func (b *BackupWriter) Close() error {
	if b.written != b.size {
		return fmt.Errorf("snapshot data is %d bytes, the header announced %d", b.written, b.size)
	}
	if _, err := b.w.Write(b.h.Sum(nil)); err != nil {
		return fmt.Errorf("write snapshot file: %w", err)
	}
	return nil
}

// Backup is a verified snapshot file.
type Backup struct {
	Header BackupHeader
	// Data is the snapshot in fsm's format, as Raft stores and restores it.
	Data []byte
	// State is Data decoded; it passed fsm.StateFromProto's checks.
	State *fsmpb.State
	// Checksum is the hex SHA-256 trailer of the file.
	Checksum string
}

// StateDigest is the hex SHA-256 of the state (the fsm snapshot's trailer,
// equal to fsm.FSM.Digest of a node holding exactly this state).
func (b *Backup) StateDigest() string {
	if len(b.Data) < sha256.Size {
		return ""
	}
	return hex.EncodeToString(b.Data[len(b.Data)-sha256.Size:])
}

// ReadBackup reads and verifies a snapshot file: magic, header, length,
// outer checksum, then the inner snapshot (fsm.ReadSnapshot) and the state's
// consistency (fsm.StateFromProto), and that the header's cluster id matches
// the state's. Any damage returns an error wrapping ErrCorruptBackup that
// says what is wrong.
func ReadBackup(r io.Reader) (*Backup, error) {
	br := bufio.NewReader(r)
	h := sha256.New()
	var pre [len(backupMagic) + 4]byte
	if n, err := io.ReadFull(br, pre[:]); err != nil {
		if !isEOF(err) {
			return nil, fmt.Errorf("read snapshot file: %w", err)
		}
		return nil, corruptBackup("truncated: %d bytes, not even a header", n)
	}
	if string(pre[:len(backupMagic)]) != backupMagic {
		if string(pre[:len(backupMagic)]) == "CBSNAP1\n" {
			return nil, corruptBackup("this is a raw Raft snapshot, not a file written by `cabinet operator snapshot save`")
		}
		return nil, corruptBackup("bad magic %q: not a Cabinet snapshot file, or a newer format", pre[:len(backupMagic)])
	}
	h.Write(pre[:])
	hl := binary.BigEndian.Uint32(pre[len(backupMagic):])
	if hl == 0 || hl > maxBackupHeader {
		return nil, corruptBackup("header length %d out of range (1..%d)", hl, maxBackupHeader)
	}
	hb := make([]byte, hl)
	if _, err := io.ReadFull(br, hb); err != nil {
		if !isEOF(err) {
			return nil, fmt.Errorf("read snapshot file: %w", err)
		}
		return nil, corruptBackup("truncated in the header")
	}
	h.Write(hb)
	var hdr BackupHeader
	dec := json.NewDecoder(bytes.NewReader(hb))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&hdr); err != nil {
		return nil, corruptBackup("header does not decode: %v", err)
	}
	if hdr.Format != BackupFormat {
		return nil, corruptBackup("header format %d; this binary reads format %d", hdr.Format, BackupFormat)
	}
	if hdr.Size <= 0 || hdr.Size > fsm.MaxSnapshotStateBytes+64 {
		return nil, corruptBackup("announced snapshot size %d out of range", hdr.Size)
	}
	var data bytes.Buffer
	if n, err := io.CopyN(&data, br, hdr.Size); err != nil {
		if !isEOF(err) {
			return nil, fmt.Errorf("read snapshot file: %w", err)
		}
		return nil, corruptBackup("truncated: header announces %d snapshot bytes, found %d", hdr.Size, n)
	}
	h.Write(data.Bytes())
	var sum [sha256.Size]byte
	if _, err := io.ReadFull(br, sum[:]); err != nil {
		if !isEOF(err) {
			return nil, fmt.Errorf("read snapshot file: %w", err)
		}
		return nil, corruptBackup("truncated: the checksum at the end is missing")
	}
	if want := h.Sum(nil); subtle.ConstantTimeCompare(sum[:], want) != 1 {
		return nil, corruptBackup("checksum mismatch: the file says %s, its contents hash to %s (damaged in storage or transit)",
			hex.EncodeToString(sum[:]), hex.EncodeToString(want))
	}
	if _, err := br.ReadByte(); err != io.EOF {
		if err != nil {
			return nil, fmt.Errorf("read snapshot file: %w", err)
		}
		return nil, corruptBackup("unexpected data after the checksum")
	}
	st, err := fsm.ReadSnapshot(bytes.NewReader(data.Bytes()))
	if err != nil {
		return nil, corruptBackup("%v", err)
	}
	if _, err := fsm.StateFromProto(st); err != nil {
		return nil, corruptBackup("state is inconsistent: %v", err)
	}
	if got := st.GetCluster().GetClusterId(); got != hdr.ClusterID {
		return nil, corruptBackup("header names cluster %q, the state holds cluster %q", hdr.ClusterID, got)
	}
	return &Backup{Header: hdr, Data: data.Bytes(), State: st, Checksum: hex.EncodeToString(sum[:])}, nil
}

func isEOF(err error) bool { return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) }

func corruptBackup(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrCorruptBackup, fmt.Sprintf(format, a...))
}

// StateSummary counts what a state holds, for `snapshot inspect` and
// restore reports.
type StateSummary struct {
	ClusterID  string         `json:"cluster_id"`
	Keys       int            `json:"keys"`
	ByState    map[string]int `json:"keys_by_state"`
	BySpec     map[string]int `json:"keys_by_spec"`
	Versions   int            `json:"key_versions"`
	KEKs       []KEKSummary   `json:"kek_versions"`
	CurrentKEK uint32         `json:"current_kek_version"`
	Nodes      []string       `json:"nodes"`
	Grants     int            `json:"grants"`
	Denied     int            `json:"denied_principals"`
}

// KEKSummary is one KEK version of a state.
type KEKSummary struct {
	Version    uint32 `json:"version"`
	State      string `json:"state"`
	CheckValue string `json:"check_value"`
	// Keys is how many key versions hold material sealed under it.
	Keys int `json:"sealed_key_versions"`
}

// Summarize counts keys by state and spec, and lists KEK versions and nodes.
func Summarize(st *fsmpb.State) StateSummary {
	s := StateSummary{
		ClusterID: st.GetCluster().GetClusterId(), Keys: len(st.GetKeys()),
		ByState: map[string]int{}, BySpec: map[string]int{},
		CurrentKEK: st.GetCluster().GetCurrentKekVersion(),
		Grants:     len(st.GetGrants()), Denied: len(st.GetDeniedPrincipals()),
	}
	sealed := map[uint32]int{}
	for _, k := range st.GetKeys() {
		s.ByState[strings.TrimPrefix(k.GetState().String(), "KEY_STATE_")]++
		s.BySpec[strings.TrimPrefix(k.GetSpec().String(), "KEY_SPEC_")]++
		s.Versions += len(k.GetVersions())
		for _, v := range k.GetVersions() {
			if m := v.GetMaterial(); m != nil {
				sealed[m.GetKekVersion()]++
			}
		}
	}
	for _, k := range st.GetCluster().GetKekVersions() {
		s.KEKs = append(s.KEKs, KEKSummary{Version: k.GetVersion(), State: strings.TrimPrefix(k.GetState().String(), "KEK_STATE_"),
			CheckValue: hex.EncodeToString(k.GetCheckValue()), Keys: sealed[k.GetVersion()]})
	}
	sort.Slice(s.KEKs, func(i, j int) bool { return s.KEKs[i].Version < s.KEKs[j].Version })
	for _, n := range st.GetNodes() {
		s.Nodes = append(s.Nodes, n.GetNodeId())
	}
	return s
}

// ReplaceMembership sets st's node records to nodes (sorted by id, as the
// snapshot format requires), drops its join tokens if dropJoinTokens, checks
// the result and returns it in fsm's snapshot format. A restore uses it so
// the state names the nodes that actually run the cluster, not the ones that
// ran when the snapshot was taken. st is modified.
func ReplaceMembership(st *fsmpb.State, nodes []*fsmpb.NodeRecord, dropJoinTokens bool) ([]byte, error) {
	sorted := append([]*fsmpb.NodeRecord(nil), nodes...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].GetNodeId() < sorted[j].GetNodeId() })
	st.Nodes = sorted
	resetKEKBookkeeping(st, sorted)
	if ci := st.GetCluster(); ci.GetGossipKey() != nil {
		// The snapshot's gossip key was known to the nodes that ran when
		// it was taken: the new leader replaces it.
		ci.GossipKeyRotationDue = true
	}
	if dropJoinTokens {
		st.JoinTokens = nil
	}
	var buf bytes.Buffer
	if err := fsm.WriteSnapshot(&buf, st); err != nil {
		return nil, err
	}
	check, err := fsm.ReadSnapshot(bytes.NewReader(buf.Bytes()))
	if err != nil {
		return nil, err
	}
	if _, err := fsm.StateFromProto(check); err != nil {
		return nil, fmt.Errorf("state after replacing its members: %w", err)
	}
	return buf.Bytes(), nil
}

// resetKEKBookkeeping makes the KEK versions' per-node lists name the new
// members: ACTIVE and DRAINING versions are held by every member (a restore
// checks that its HSM holds them; a restore is refused while a rotation is
// in progress, so every member holds what the cluster uses); a PENDING
// version's holders and deliveries named the old nodes, so it starts with
// none (the leader then abandons it); a RETIRED version must be removed by
// the new members again (an idempotent destroy).
func resetKEKBookkeeping(st *fsmpb.State, members []*fsmpb.NodeRecord) {
	ids := make([]string, 0, len(members))
	for _, n := range members {
		ids = append(ids, n.GetNodeId())
	}
	for _, k := range st.GetCluster().GetKekVersions() {
		switch k.GetState() {
		case fsmpb.KEKState_KEK_STATE_ACTIVE, fsmpb.KEKState_KEK_STATE_DRAINING:
			k.InstalledOn = append([]string(nil), ids...)
			k.Deliveries = nil
		case fsmpb.KEKState_KEK_STATE_PENDING:
			k.InstalledOn, k.Deliveries = nil, nil
		case fsmpb.KEKState_KEK_STATE_RETIRED:
			k.RemovedFrom = nil
		}
	}
}
