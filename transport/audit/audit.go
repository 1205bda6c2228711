// Package audit keeps a node's audit trail: one append-only file of JSON
// lines, each record hash-chained to the one before, so that editing,
// deleting, reordering or truncating records is detected by Verify.
// DESIGN.md describes the format.
package audit

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"
)

// Record is one audited request. It never holds plaintext, key material or
// ciphertext bodies: only who asked for what and how it ended.
type Record struct {
	Seq        uint64    `json:"seq"`
	Time       time.Time `json:"time"`
	Node       string    `json:"node"`
	Principal  string    `json:"principal"`
	Role       string    `json:"role"`
	Operation  string    `json:"operation"`
	KeyID      string    `json:"key_id"`
	KeyVersion uint32    `json:"key_version"`
	// Outcome is "OK" or the gRPC code name (PermissionDenied, NotFound...).
	Outcome    string `json:"outcome"`
	RequestID  string `json:"request_id"`
	ClientAddr string `json:"client_addr"`
	// PrevHash is the previous record's Hash (64 zeros for the first).
	PrevHash string `json:"prev_hash"`
	// Hash is hex SHA-256(PrevHash bytes || canonical encoding of the
	// other fields).
	Hash string `json:"hash"`
}

// Options configure a Log.
type Options struct {
	// Node is written into every record.
	Node string
	// SyncInterval is how often a background goroutine fsyncs the file
	// when records were written since the last fsync (default 100ms).
	SyncInterval time.Duration
	// Clock stamps records whose Time is zero (default time.Now).
	Clock func() time.Time
}

// DefaultSyncInterval is the fsync batching interval when Options leave it 0.
const DefaultSyncInterval = 100 * time.Millisecond

// MaxTail is the most records one Tail call returns.
const MaxTail = 1000

var (
	// ErrClosed is returned by calls on a closed Log.
	ErrClosed = errors.New("audit: log is closed")
	// ErrCorrupt wraps Open's refusal of a file whose last record is
	// damaged. The file is left as it is: run Verify and decide.
	ErrCorrupt = errors.New("audit log is corrupt")
	// ErrInvalidCount wraps Tail's refusal of a count outside 0..MaxTail.
	ErrInvalidCount = errors.New("invalid record count")
)

// logFile is what Log needs from its file; tests inject faults through it.
type logFile interface {
	io.Writer
	io.ReaderAt
	Sync() error
	Close() error
}

// Log is an open audit file. Append, Tail and Healthy are safe for
// concurrent use.
type Log struct {
	path  string
	node  string
	clock func() time.Time

	// closeMu lets Tail read the file while Close waits for it.
	closeMu sync.RWMutex

	mu      sync.Mutex // serialises Append: file order is chain order
	f       logFile
	closed  bool
	seq     uint64
	prev    [sha256.Size]byte
	prevHex string
	size    int64 // bytes of complete records in the file
	h       hash.Hash
	canon   []byte // scratch buffers reused under mu
	line    []byte

	dirty  atomic.Bool
	health atomic.Pointer[error]
	stop   chan struct{}
	done   chan struct{}
}

// Open creates the file (mode 0600, directory 0700) or reopens it,
// continuing the sequence and chain from its last record. A damaged last
// record (torn write, edit) makes Open fail with ErrCorrupt naming the line;
// the file is never truncated. The file is locked against a second Open
// until Close.
func Open(path string, opts Options) (*Log, error) {
	if opts.SyncInterval <= 0 {
		opts.SyncInterval = DefaultSyncInterval
	}
	if opts.Clock == nil {
		opts.Clock = time.Now
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("audit: create directory: %w", err)
	}
	_, statErr := os.Lstat(path)
	created := errors.Is(statErr, fs.ErrNotExist)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("audit: open: %w", err)
	}
	l, err := openFile(f, path, opts)
	if err != nil {
		f.Close()
		return nil, err
	}
	go l.syncLoop(opts.SyncInterval)
	if created {
		if err := syncDir(filepath.Dir(path)); err != nil {
			l.Close()
			return nil, err
		}
	}
	return l, nil
}

func openFile(f *os.File, path string, opts Options) (*Log, error) {
	if err := lockFile(f); err != nil {
		return nil, fmt.Errorf("audit: lock %s (is another process using it?): %w", path, err)
	}
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("audit: %s is not a regular file", path)
	}
	l := &Log{
		path: path, node: cleanField(opts.Node), clock: opts.Clock,
		f: f, prevHex: genesisHash, size: fi.Size(), h: sha256.New(),
		stop: make(chan struct{}), done: make(chan struct{}),
	}
	if l.size == 0 {
		return l, nil
	}
	last, terr, err := readLastRecord(f, l.size)
	if err != nil {
		return nil, fmt.Errorf("audit: read the last record of %s: %w", path, err)
	}
	if terr != nil {
		line, err := lineNumber(f, terr.at)
		if err != nil {
			return nil, fmt.Errorf("audit: %w", err)
		}
		return nil, fmt.Errorf("%w: %s line %d: %s; run `cabinet operator audit verify --file %s` and decide what to do (the file is never truncated automatically)",
			ErrCorrupt, path, line, terr.problem, path)
	}
	l.seq = last.Seq
	l.prevHex = last.Hash
	l.prev, _ = decodeHash(last.Hash)
	return l, nil
}

// tailError says what is wrong with the last line; at is an offset inside
// it (its line number is one more than the newlines before at).
type tailError struct {
	at      int64
	problem string
}

// readLastRecord reads the final line of f[0:size] and checks it on its own:
// complete, parseable, in canonical form, hash matching its contents. The
// error is for I/O only.
func readLastRecord(f io.ReaderAt, size int64) (Record, *tailError, error) {
	n := min(size, MaxLineBytes+1)
	buf := make([]byte, n)
	if _, err := f.ReadAt(buf, size-n); err != nil {
		return Record{}, nil, err
	}
	complete := buf[len(buf)-1] == '\n'
	body := buf
	if complete {
		body = buf[:len(buf)-1]
	}
	i := lastIndexNewline(body)
	at := size - n + int64(len(body))
	if i < 0 && size > n {
		return Record{}, &tailError{at: at, problem: fmt.Sprintf("last line is longer than %d bytes", MaxLineBytes)}, nil
	}
	line := body[i+1:]
	if !complete {
		return Record{}, &tailError{at: at, problem: "last line is incomplete (no trailing newline): a torn or truncated write"}, nil
	}
	r, err := parseLine(line)
	if err != nil {
		return Record{}, &tailError{at: at, problem: "last line does not parse: " + err.Error()}, nil
	}
	if r.Seq == 0 {
		return Record{}, &tailError{at: at, problem: "last record has seq 0"}, nil
	}
	if p := checkAlone(&r, line, sha256.New()); p != "" {
		return Record{}, &tailError{at: at, problem: "last record (seq " + fmt.Sprint(r.Seq) + "): " + p}, nil
	}
	return r, nil, nil
}

func lastIndexNewline(b []byte) int {
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == '\n' {
			return i
		}
	}
	return -1
}

// lineNumber returns the 1-based number of the line holding offset off.
func lineNumber(r io.ReaderAt, off int64) (int, error) {
	line := 1
	buf := make([]byte, 64<<10)
	for pos := int64(0); pos < off; {
		n, err := r.ReadAt(buf[:min(int64(len(buf)), off-pos)], pos)
		for _, c := range buf[:n] {
			if c == '\n' {
				line++
			}
		}
		pos += int64(n)
		if err != nil && pos < off {
			return 0, err
		}
	}
	return line, nil
}

// Append writes r as the next record: it sets Seq, Time (when zero), Node,
// PrevHash and Hash, writes the line with one write(2) and returns the
// record as written. Strings are made valid UTF-8 and cut to MaxFieldBytes.
// A failed write makes the Log unhealthy for good (see Healthy); from then
// on Append refuses.
func (l *Log) Append(r Record) (Record, error) {
	sanitize(&r)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return Record{}, ErrClosed
	}
	if err := l.Healthy(); err != nil {
		return Record{}, err
	}
	if r.Time.IsZero() {
		r.Time = l.clock()
	}
	r.Time = r.Time.UTC()
	if err := checkTime(r.Time); err != nil {
		return Record{}, err
	}
	r.Seq = l.seq + 1
	r.Node = l.node
	r.PrevHash = l.prevHex
	l.canon = appendCanonical(l.canon[:0], &r)
	sum := chainHash(l.h, &l.prev, l.canon)
	r.Hash = encodeHex(&sum)
	l.line = appendLine(l.line[:0], &r)
	n, err := l.f.Write(l.line)
	if err != nil {
		err = fmt.Errorf("audit: write record %d to %s: %w", r.Seq, l.path, err)
		l.fail(err)
		return Record{}, err
	}
	l.seq, l.prev, l.prevHex = r.Seq, sum, r.Hash
	l.size += int64(n)
	l.dirty.Store(true)
	return r, nil
}

func encodeHex(sum *[sha256.Size]byte) string {
	var b [2 * sha256.Size]byte
	for i, c := range sum {
		b[2*i] = hexDigits[c>>4]
		b[2*i+1] = hexDigits[c&0xf]
	}
	return string(b[:])
}

func (l *Log) fail(err error) {
	l.health.CompareAndSwap(nil, &err)
}

// Healthy returns nil while every write and background fsync has
// succeeded. After the first failure it returns that error until the file is
// reopened: the node must then refuse requests rather than serve unaudited.
// A closed Log reports ErrClosed.
func (l *Log) Healthy() error {
	if p := l.health.Load(); p != nil {
		return *p
	}
	return nil
}

func (l *Log) syncLoop(every time.Duration) {
	defer close(l.done)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
			if l.dirty.Swap(false) {
				if err := l.f.Sync(); err != nil {
					l.fail(fmt.Errorf("audit: fsync %s: %w", l.path, err))
				}
			}
		}
	}
}

// Tail returns the last n records (0 <= n <= MaxTail), oldest first, reading
// backwards from the end of the file.
func (l *Log) Tail(n int) ([]Record, error) {
	if n < 0 || n > MaxTail {
		return nil, fmt.Errorf("audit: %w: %d (must be 0..%d)", ErrInvalidCount, n, MaxTail)
	}
	l.closeMu.RLock()
	defer l.closeMu.RUnlock()
	l.mu.Lock()
	closed, size := l.closed, l.size
	l.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	lines, err := lastLines(l.f, size, n)
	if err != nil {
		return nil, fmt.Errorf("audit: tail %s: %w", l.path, err)
	}
	out := make([]Record, 0, len(lines))
	for _, line := range lines {
		r, err := parseLine(line)
		if err != nil {
			return nil, fmt.Errorf("audit: tail %s: a record does not parse (run verify): %w", l.path, err)
		}
		out = append(out, r)
	}
	return out, nil
}

// lastLines returns the last n lines of r[0:size] (which ends in '\n'),
// oldest first, without their newlines. It reads 64 KiB chunks backwards
// and never more than n+1 maximal lines.
func lastLines(r io.ReaderAt, size int64, n int) ([][]byte, error) {
	if n == 0 || size == 0 {
		return nil, nil
	}
	const chunk = 64 << 10
	limit := int64(n+1) * MaxLineBytes
	var buf []byte
	off := size
	newlines := 0 // in buf, not counting its final byte
	for off > 0 && newlines < n {
		if size-off > limit {
			return nil, fmt.Errorf("a line is longer than %d bytes", MaxLineBytes)
		}
		c := min(int64(chunk), off)
		off -= c
		next := make([]byte, c, int64(len(buf))+c)
		if _, err := r.ReadAt(next, off); err != nil {
			return nil, err
		}
		for _, b := range next {
			if b == '\n' {
				newlines++
			}
		}
		if buf == nil {
			newlines-- // the file's final newline ends the last line
		}
		buf = append(next, buf...)
	}
	body := buf[:len(buf)-1]
	lines := make([][]byte, 0, n)
	for len(lines) < n {
		i := lastIndexNewline(body)
		lines = append(lines, body[i+1:])
		if i < 0 { // the file's first line
			break
		}
		body = body[:i]
	}
	for i, j := 0, len(lines)-1; i < j; i, j = i+1, j-1 {
		lines[i], lines[j] = lines[j], lines[i]
	}
	return lines, nil
}

// Close stops the background fsync, fsyncs a last time and closes the file.
func (l *Log) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return ErrClosed
	}
	l.closed = true
	l.fail(ErrClosed)
	l.mu.Unlock()
	close(l.stop)
	<-l.done
	l.closeMu.Lock()
	defer l.closeMu.Unlock()
	err := l.f.Sync()
	if cerr := l.f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("audit: close %s: %w", l.path, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("audit: fsync directory %s: %w", dir, err)
	}
	return nil
}
