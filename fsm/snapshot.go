package fsm

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// Snapshot file layout (all of it, nothing before or after):
//
//	magic    8 bytes   "CBSNAP1\n"
//	length   8 bytes   big-endian length N of the state bytes
//	state    N bytes   fsmpb.State, deterministic protobuf
//	checksum 32 bytes  SHA-256 of the N state bytes
const snapshotMagic = "CBSNAP1\n"

// MaxSnapshotStateBytes bounds the state section a reader accepts, so a
// corrupt length cannot make it allocate without limit (protobuf messages are
// capped at 2 GiB anyway).
const MaxSnapshotStateBytes = 2<<30 - 1

// ErrCorruptSnapshot is wrapped by every ReadSnapshot error that means the
// bytes are not an intact Cabinet snapshot.
var ErrCorruptSnapshot = errors.New("corrupt snapshot")

// MarshalState returns the deterministic protobuf bytes of st: the bytes a
// snapshot stores and Digest hashes.
func MarshalState(st *fsmpb.State) ([]byte, error) {
	b, err := deterministic.Marshal(st)
	if err != nil {
		return nil, fmt.Errorf("marshal state: %w", err)
	}
	if len(b) > MaxSnapshotStateBytes {
		return nil, fmt.Errorf("marshal state: %d bytes exceeds the snapshot limit of %d", len(b), MaxSnapshotStateBytes)
	}
	return b, nil
}

// WriteSnapshot writes st in the snapshot format. For a canonical snapshot
// pass State.ToProto() (or FSM.StateProto()), whose fields are sorted.
func WriteSnapshot(w io.Writer, st *fsmpb.State) error {
	b, err := MarshalState(st)
	if err != nil {
		return err
	}
	return writeSnapshotBytes(w, b)
}

func writeSnapshotBytes(w io.Writer, stateBytes []byte) error {
	var hdr [len(snapshotMagic) + 8]byte
	copy(hdr[:], snapshotMagic)
	binary.BigEndian.PutUint64(hdr[len(snapshotMagic):], uint64(len(stateBytes)))
	sum := sha256.Sum256(stateBytes)
	for _, part := range [][]byte{hdr[:], stateBytes, sum[:]} {
		if _, err := w.Write(part); err != nil {
			return fmt.Errorf("write snapshot: %w", err)
		}
	}
	return nil
}

// ReadSnapshot reads and verifies a snapshot written by WriteSnapshot. Any
// damage (wrong magic, bad length, truncation, checksum mismatch, trailing
// bytes, undecodable state) returns an error wrapping ErrCorruptSnapshot and
// saying what was wrong; the state is decoded only after the checksum
// matched. It does not check the state's consistency: StateFromProto does.
func ReadSnapshot(r io.Reader) (*fsmpb.State, error) {
	br := bufio.NewReader(r)
	var hdr [len(snapshotMagic) + 8]byte
	if n, err := io.ReadFull(br, hdr[:]); err != nil {
		if !isEOF(err) {
			return nil, fmt.Errorf("read snapshot: %w", err)
		}
		return nil, corrupt("truncated: header is %d bytes, want %d", n, len(hdr))
	}
	if string(hdr[:len(snapshotMagic)]) != snapshotMagic {
		return nil, corrupt("bad magic %s: not a Cabinet snapshot, or a newer format", hex.EncodeToString(hdr[:len(snapshotMagic)]))
	}
	size := binary.BigEndian.Uint64(hdr[len(snapshotMagic):])
	if size > MaxSnapshotStateBytes {
		return nil, corrupt("state length %d exceeds the limit of %d", size, MaxSnapshotStateBytes)
	}
	// Grow with the data actually present rather than trusting the length,
	// but start from a bounded guess (at most 64 MiB) so a large snapshot is
	// not copied through a dozen doublings.
	var buf bytes.Buffer
	buf.Grow(int(min(size, 64<<20)))
	if n, err := io.CopyN(&buf, br, int64(size)); err != nil {
		if !isEOF(err) {
			return nil, fmt.Errorf("read snapshot: %w", err)
		}
		return nil, corrupt("truncated: header announces %d state bytes, found %d", size, n)
	}
	var sum [sha256.Size]byte
	if n, err := io.ReadFull(br, sum[:]); err != nil {
		if !isEOF(err) {
			return nil, fmt.Errorf("read snapshot: %w", err)
		}
		return nil, corrupt("truncated: checksum is %d bytes, want %d", n, sha256.Size)
	}
	want := sha256.Sum256(buf.Bytes())
	if subtle.ConstantTimeCompare(sum[:], want[:]) != 1 {
		return nil, corrupt("checksum mismatch: stored %s, computed %s", hex.EncodeToString(sum[:]), hex.EncodeToString(want[:]))
	}
	if _, err := br.ReadByte(); err != io.EOF {
		if err != nil {
			return nil, fmt.Errorf("read snapshot: %w", err)
		}
		return nil, corrupt("unexpected data after the checksum")
	}
	st := &fsmpb.State{}
	if err := proto.Unmarshal(buf.Bytes(), st); err != nil {
		return nil, corrupt("state does not decode: %v", err)
	}
	return st, nil
}

func isEOF(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

func corrupt(format string, a ...any) error {
	return fmt.Errorf("%w: %s", ErrCorruptSnapshot, fmt.Sprintf(format, a...))
}
