package audit

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
)

// Report is Verify's verdict on a file.
type Report struct {
	// OK is true when every record checks out (an empty file is OK).
	OK bool `json:"ok"`
	// Records counts the good records before the first bad one (all of
	// them when OK).
	Records uint64 `json:"records"`
	// FirstBadSeq is the sequence number the first bad record should have
	// carried (Records+1): for a deleted record, the missing one's; for a
	// swapped pair, the first of the two. Zero when OK.
	FirstBadSeq uint64 `json:"first_bad_seq,omitempty"`
	// Line is the 1-based line of the first bad record. Zero when OK.
	Line int `json:"line,omitempty"`
	// Problem says what is wrong with it.
	Problem string `json:"problem,omitempty"`
}

// Verify reads the file at path from start to end and checks, record by
// record, that each line parses, is in canonical form, carries the next
// sequence number, links to the previous record's hash and hashes to its
// own Hash. It stops at the first bad record. The error is only for I/O:
// a broken chain is a Report with OK false.
func Verify(path string) (Report, error) {
	f, err := os.Open(path)
	if err != nil {
		return Report{}, fmt.Errorf("audit: verify: %w", err)
	}
	defer f.Close()
	rep, err := verifyStream(f)
	if err != nil {
		return Report{}, fmt.Errorf("audit: verify %s: %w", path, err)
	}
	return rep, nil
}

// Verify checks the open log as Verify(path) does, up to the last record
// written when it starts: a record being appended meanwhile is not mistaken
// for a torn line. Appends continue while it runs.
func (l *Log) Verify() (Report, error) {
	l.closeMu.RLock()
	defer l.closeMu.RUnlock()
	l.mu.Lock()
	closed, size := l.closed, l.size
	l.mu.Unlock()
	if closed {
		return Report{}, ErrClosed
	}
	rep, err := verifyStream(io.NewSectionReader(l.f, 0, size))
	if err != nil {
		return Report{}, fmt.Errorf("audit: verify %s: %w", l.path, err)
	}
	return rep, nil
}

// Path returns the file the Log writes.
func (l *Log) Path() string { return l.path }

func verifyStream(r io.Reader) (Report, error) {
	br := bufio.NewReaderSize(r, MaxLineBytes)
	h := sha256.New()
	var canon, enc []byte
	var rep Report
	prev := genesisHash
	bad := func(problem string) (Report, error) {
		rep.FirstBadSeq = rep.Records + 1
		rep.Line = int(rep.Records) + 1
		rep.Problem = problem
		return rep, nil
	}
	for {
		line, err := br.ReadSlice('\n')
		switch {
		case err == nil:
			line = line[:len(line)-1]
		case errors.Is(err, io.EOF):
			if len(line) == 0 {
				rep.OK = true
				return rep, nil
			}
			return bad("incomplete last line (no trailing newline): a torn or truncated write")
		case errors.Is(err, bufio.ErrBufferFull):
			return bad(fmt.Sprintf("line is longer than %d bytes", MaxLineBytes))
		default:
			return Report{}, err
		}
		rec, perr := parseLine(line)
		if perr != nil {
			return bad("does not parse: " + perr.Error())
		}
		if want := rep.Records + 1; rec.Seq != want {
			return bad(fmt.Sprintf("seq %d where %d was expected: a record is missing, repeated or out of order", rec.Seq, want))
		}
		if rec.PrevHash != prev {
			if rep.Records == 0 {
				return bad("prev_hash is not the genesis value (64 zeros): records before it are missing")
			}
			return bad(fmt.Sprintf("prev_hash does not match the hash of record %d: the chain is broken", rep.Records))
		}
		if p := checkRecord(&rec, line, h, &canon, &enc); p != "" {
			return bad(p)
		}
		prev = rec.Hash
		rep.Records++
	}
}

// checkAlone checks what one record proves about itself: its hash matches
// its contents and prev_hash, and line is its canonical form.
func checkAlone(r *Record, line []byte, h hash.Hash) string {
	var canon, enc []byte
	return checkRecord(r, line, h, &canon, &enc)
}

func checkRecord(r *Record, line []byte, h hash.Hash, canon, enc *[]byte) string {
	prev, ok := decodeHash(r.PrevHash)
	if !ok {
		return "prev_hash is not 64 lowercase hex digits"
	}
	if err := checkTime(r.Time); err != nil {
		return "time is out of range"
	}
	*canon = appendCanonical((*canon)[:0], r)
	sum := chainHash(h, &prev, *canon)
	if encodeHex(&sum) != r.Hash {
		return "hash does not match the record's contents: the record was modified"
	}
	*enc = appendLine((*enc)[:0], r)
	if !bytes.Equal((*enc)[:len(*enc)-1], line) {
		return "line is not in canonical form: the record was edited"
	}
	return ""
}
