package audit

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock returns a fixed start time advanced by one millisecond per call.
func fakeClock() func() time.Time {
	var mu sync.Mutex
	t := time.Date(2025, 3, 1, 12, 0, 0, 123456789, time.FixedZone("CET", 3600))
	return func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		t = t.Add(time.Millisecond)
		return t
	}
}

func openLog(t testing.TB, path string) *Log {
	t.Helper()
	l, err := Open(path, Options{Node: "node-1", Clock: fakeClock(), SyncInterval: 10 * time.Millisecond})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func sample(i int) Record {
	return Record{
		Principal: fmt.Sprintf("p%d", i), Role: "admin", Operation: "/cabinet.v1.KeyService/Encrypt",
		KeyID: "k-0123456789abcdefghijklmnop", KeyVersion: uint32(i % 7), Outcome: "OK",
		RequestID: fmt.Sprintf("req-%d", i), ClientAddr: "127.0.0.1:5555",
	}
}

// writeLog creates a closed log of n records and returns its path.
func writeLog(t testing.TB, n int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit", "audit.log")
	l := openLog(t, path)
	for i := 1; i <= n; i++ {
		if _, err := l.Append(sample(i)); err != nil {
			t.Fatalf("Append %d: %v", i, err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return path
}

func readLines(t testing.TB, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.SplitAfter(string(b), "\n")[:bytes.Count(b, []byte("\n"))]
}

func writeLines(t *testing.T, path string, lines []string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(strings.Join(lines, "")), 0o600); err != nil {
		t.Fatal(err)
	}
}

func mustVerify(t *testing.T, path string) Report {
	t.Helper()
	rep, err := Verify(path)
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	return rep
}

// flipHex changes the first hex digit after key in line.
func flipHex(line, key string) string {
	i := strings.Index(line, key) + len(key)
	c := byte('a')
	if line[i] == 'a' {
		c = 'b'
	}
	return line[:i] + string(c) + line[i+1:]
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestAppendRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "audit")
	path := filepath.Join(dir, "audit.log")
	l := openLog(t, path)
	var want []Record
	for i := 1; i <= 3; i++ {
		r, err := l.Append(sample(i))
		if err != nil {
			t.Fatal(err)
		}
		if r.Seq != uint64(i) || r.Node != "node-1" || r.Time.Location() != time.UTC || len(r.Hash) != 64 {
			t.Fatalf("record %d = %+v", i, r)
		}
		want = append(want, r)
	}
	if want[0].PrevHash != genesisHash || want[1].PrevHash != want[0].Hash || want[2].PrevHash != want[1].Hash {
		t.Fatalf("records are not chained: %+v", want)
	}
	got, err := l.Tail(3)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Tail = %+v\nwant %+v", got, want)
	}
	// An explicit time is kept (in UTC).
	at := time.Date(2024, 1, 2, 3, 4, 5, 6, time.UTC)
	r := sample(4)
	r.Time = at
	if r, err = l.Append(r); err != nil || !r.Time.Equal(at) {
		t.Fatalf("Append with time: %v %v", r.Time, err)
	}
	line := readLines(t, path)[0]
	for _, f := range []string{`"seq":1,`, `"key_id":`, `"key_version":1,`, `"request_id":"req-1"`, `"client_addr":`, `"prev_hash":"000`, `"time":"2025-03-01T11:00:00.124456789Z"`} {
		if !strings.Contains(line, f) {
			t.Errorf("line lacks %s: %s", f, line)
		}
	}
	for p, mode := range map[string]os.FileMode{path: 0o600, dir: 0o700} {
		if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != mode {
			t.Errorf("%s: mode %v, want %v (%v)", p, fi.Mode().Perm(), mode, err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if rep := mustVerify(t, path); !rep.OK || rep.Records != 4 {
		t.Fatalf("Verify = %+v", rep)
	}
}

func TestReopenContinuesChain(t *testing.T) {
	path := writeLog(t, 2)
	l := openLog(t, path)
	last, err := l.Tail(1)
	if err != nil {
		t.Fatal(err)
	}
	r, err := l.Append(sample(3))
	if err != nil {
		t.Fatal(err)
	}
	if r.Seq != 3 || r.PrevHash != last[0].Hash {
		t.Fatalf("after reopen: seq %d prev %s, want 3 and %s", r.Seq, r.PrevHash, last[0].Hash)
	}
	l.Close()
	if rep := mustVerify(t, path); !rep.OK || rep.Records != 3 {
		t.Fatalf("Verify = %+v", rep)
	}
}

func TestOpenIsExclusive(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	openLog(t, path)
	if _, err := Open(path, Options{}); err == nil || !strings.Contains(err.Error(), "another process") {
		t.Fatalf("second Open = %v, want an in-use error", err)
	}
}

func TestVerifyDetects(t *testing.T) {
	const n = 10
	tests := []struct {
		name    string
		edit    func(lines []string) []string
		badSeq  uint64
		problem string
	}{
		{"field modified", func(l []string) []string {
			l[4] = strings.Replace(l[4], `"principal":"p5"`, `"principal":"mallory"`, 1)
			return l
		}, 5, "hash does not match"},
		{"key version modified", func(l []string) []string {
			l[4] = strings.Replace(l[4], `"key_version":5`, `"key_version":6`, 1)
			return l
		}, 5, "hash does not match"},
		{"time modified", func(l []string) []string {
			l[4] = strings.Replace(l[4], `T11:00:00.128`, `T11:00:00.129`, 1)
			return l
		}, 5, "hash does not match"},
		{"record deleted", func(l []string) []string { return append(l[:4:4], l[5:]...) }, 5, "seq 6 where 5"},
		{"first record deleted", func(l []string) []string { return l[1:] }, 1, "seq 2 where 1"},
		{"records swapped", func(l []string) []string { l[4], l[5] = l[5], l[4]; return l }, 5, "seq 6 where 5"},
		{"truncated mid-line", func(l []string) []string { l[n-1] = l[n-1][:40]; return l }, n, "incomplete last line"},
		{"truncated in the middle", func(l []string) []string { l[4] = l[4][:40]; return l }, 5, "does not parse"},
		{"newline lost", func(l []string) []string { l[n-1] = strings.TrimSuffix(l[n-1], "\n"); return l }, n, "incomplete last line"},
		{"hash replaced", func(l []string) []string { l[4] = flipHex(l[4], `"hash":"`); return l }, 5, "hash does not match"},
		{"prev_hash replaced", func(l []string) []string { l[4] = flipHex(l[4], `"prev_hash":"`); return l }, 5, "prev_hash does not match the hash of record 4"},
		{"genesis replaced", func(l []string) []string { l[0] = flipHex(l[0], `"prev_hash":"`); return l }, 1, "genesis"},
		{"whitespace added", func(l []string) []string { l[4] = strings.Replace(l[4], `{"seq"`, `{ "seq"`, 1); return l }, 5, "canonical"},
		{"unknown field added", func(l []string) []string { l[4] = strings.Replace(l[4], `{"seq":5`, `{"x":1,"seq":5`, 1); return l }, 5, "canonical"},
		{"key case changed", func(l []string) []string { l[4] = strings.Replace(l[4], `"role"`, `"Role"`, 1); return l }, 5, "canonical"},
		{"time zone rewritten", func(l []string) []string {
			l[4] = strings.Replace(l[4], `T11:00:00.128456789Z`, `T12:00:00.128456789+01:00`, 1)
			return l
		}, 5, "canonical"},
		{"garbage line inserted", func(l []string) []string { return append(l[:3:3], append([]string{"hello\n"}, l[3:]...)...) }, 4, "does not parse"},
		{"blank line inserted", func(l []string) []string { return append(l[:3:3], append([]string{"\n"}, l[3:]...)...) }, 4, "does not parse"},
		{"line too long", func(l []string) []string { l[4] = strings.Repeat("x", MaxLineBytes+1) + "\n"; return l }, 5, "longer than"},
		{"record duplicated", func(l []string) []string { return append(l[:5:5], l[4:]...) }, 6, "seq 5 where 6"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeLog(t, n)
			writeLines(t, path, tt.edit(readLines(t, path)))
			rep := mustVerify(t, path)
			if rep.OK || rep.FirstBadSeq != tt.badSeq || rep.Line != int(tt.badSeq) || rep.Records != tt.badSeq-1 || !strings.Contains(rep.Problem, tt.problem) {
				t.Fatalf("Verify = %+v, want first bad seq %d (%q)", rep, tt.badSeq, tt.problem)
			}
		})
	}
}

func TestVerifyGoodAndEmpty(t *testing.T) {
	if rep := mustVerify(t, writeLog(t, 50)); !rep.OK || rep.Records != 50 || rep.FirstBadSeq != 0 || rep.Problem != "" {
		t.Fatalf("Verify = %+v", rep)
	}
	if rep := mustVerify(t, writeLog(t, 0)); !rep.OK || rep.Records != 0 {
		t.Fatalf("Verify of an empty log = %+v", rep)
	}
	if _, err := Verify(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Fatal("Verify of a missing file succeeded")
	}
}

func TestOpenRefusesCorruptTail(t *testing.T) {
	for name, edit := range map[string]func(l []string) []string{
		"truncated":  func(l []string) []string { l[5] = l[5][:30]; return l },
		"modified":   func(l []string) []string { l[5] = strings.Replace(l[5], `"p6"`, `"p7"`, 1); return l },
		"garbage":    func(l []string) []string { l[5] = "{}\n"; return l },
		"long line":  func(l []string) []string { l[5] = strings.Repeat("x", 2*MaxLineBytes) + "\n"; return l },
		"no newline": func(l []string) []string { l[5] = strings.TrimSuffix(l[5], "\n"); return l },
	} {
		t.Run(name, func(t *testing.T) {
			path := writeLog(t, 6)
			writeLines(t, path, edit(readLines(t, path)))
			before, _ := os.ReadFile(path)
			_, err := Open(path, Options{Node: "node-1"})
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "line 6") {
				t.Fatalf("Open = %v, want ErrCorrupt naming line 6", err)
			}
			if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
				t.Fatal("Open changed a corrupt file")
			}
		})
	}
}

// faultyFile fails Write or Sync on demand.
type faultyFile struct {
	logFile
	mu                sync.Mutex
	writeErr, syncErr error
}

func (f *faultyFile) Write(b []byte) (int, error) {
	f.mu.Lock()
	err := f.writeErr
	f.mu.Unlock()
	if err != nil {
		return 0, err
	}
	return f.logFile.Write(b)
}

func (f *faultyFile) Sync() error {
	f.mu.Lock()
	err := f.syncErr
	f.mu.Unlock()
	if err != nil {
		return err
	}
	return f.logFile.Sync()
}

func TestWriteFailureIsSticky(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path)
	if _, err := l.Append(sample(1)); err != nil {
		t.Fatal(err)
	}
	// Swap the file for a read-only descriptor on the same path: the next
	// write(2) fails with EBADF.
	ro, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	l.mu.Lock()
	rw := l.f
	l.f = ro
	l.mu.Unlock()
	rw.Close()
	if _, err := l.Append(sample(2)); err == nil {
		t.Fatal("Append to a read-only file succeeded")
	}
	if l.Healthy() == nil {
		t.Fatal("Healthy is nil after a failed write")
	}
	if _, err := l.Append(sample(3)); err == nil {
		t.Fatal("Append after a failure succeeded")
	}
	if got, err := l.Tail(10); err != nil || len(got) != 1 {
		t.Fatalf("Tail after failure = %d records, %v", len(got), err)
	}
}

func TestSyncFailureMakesUnhealthy(t *testing.T) {
	l := openLog(t, filepath.Join(t.TempDir(), "audit.log"))
	ff := &faultyFile{logFile: l.f, syncErr: errors.New("EIO")}
	l.mu.Lock()
	l.f = ff
	l.mu.Unlock()
	if err := l.Healthy(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Append(sample(1)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the background fsync to fail", func() bool { return l.Healthy() != nil })
	if !strings.Contains(l.Healthy().Error(), "fsync") {
		t.Fatalf("Healthy = %v", l.Healthy())
	}
	if _, err := l.Append(sample(2)); err == nil {
		t.Fatal("Append after a failed fsync succeeded")
	}
}

func TestClose(t *testing.T) {
	l := openLog(t, filepath.Join(t.TempDir(), "audit.log"))
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Append(sample(1)); !errors.Is(err, ErrClosed) {
		t.Fatalf("Append after Close = %v", err)
	}
	if _, err := l.Tail(1); !errors.Is(err, ErrClosed) {
		t.Fatalf("Tail after Close = %v", err)
	}
	if !errors.Is(l.Healthy(), ErrClosed) {
		t.Fatalf("Healthy after Close = %v", l.Healthy())
	}
}

func TestConcurrentAppend(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path)
	const workers, each = 8, 200
	var wg sync.WaitGroup
	seqs := make(chan uint64, workers*each)
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				r, err := l.Append(sample(w*each + i))
				if err != nil {
					t.Error(err)
					return
				}
				seqs <- r.Seq
			}
		})
	}
	wg.Go(func() { // a reader alongside the writers
		for range 20 {
			if _, err := l.Tail(50); err != nil {
				t.Error(err)
			}
		}
	})
	wg.Go(func() { // and a verifier
		for range 5 {
			if rep, err := l.Verify(); err != nil || !rep.OK {
				t.Errorf("Log.Verify during appends = %+v, %v", rep, err)
			}
		}
	})
	wg.Wait()
	close(seqs)
	seen := map[uint64]bool{}
	for s := range seqs {
		if seen[s] {
			t.Fatalf("seq %d returned twice", s)
		}
		seen[s] = true
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if rep := mustVerify(t, path); !rep.OK || rep.Records != workers*each {
		t.Fatalf("Verify = %+v", rep)
	}
}

func TestTail(t *testing.T) {
	l := openLog(t, filepath.Join(t.TempDir(), "audit.log"))
	if got, err := l.Tail(10); err != nil || len(got) != 0 {
		t.Fatalf("Tail of an empty log = %v, %v", got, err)
	}
	const n = 1500 // ~700 KB: many 64 KiB chunks
	for i := 1; i <= n; i++ {
		r := sample(i)
		r.RequestID = strings.Repeat("r", i%400)
		if _, err := l.Append(r); err != nil {
			t.Fatal(err)
		}
	}
	for _, count := range []int{0, 1, 2, 7, 999, MaxTail} {
		got, err := l.Tail(count)
		if err != nil || len(got) != count {
			t.Fatalf("Tail(%d) = %d records, %v", count, len(got), err)
		}
		for i, r := range got {
			if want := uint64(n - count + 1 + i); r.Seq != want || r.Principal != fmt.Sprintf("p%d", want) {
				t.Fatalf("Tail(%d)[%d] = seq %d %s, want %d", count, i, r.Seq, r.Principal, want)
			}
		}
	}
	for _, bad := range []int{-1, MaxTail + 1} {
		if _, err := l.Tail(bad); !errors.Is(err, ErrInvalidCount) {
			t.Fatalf("Tail(%d) = %v", bad, err)
		}
	}
	short := openLog(t, writeLog(t, 3))
	if got, err := short.Tail(10); err != nil || len(got) != 3 || got[0].Seq != 1 {
		t.Fatalf("Tail(10) of 3 records = %+v, %v", got, err)
	}
}

func TestHostileFields(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path)
	r := sample(1)
	r.Principal = "bad\xff\xfeutf8 \"quoted\" \\ \n\t\x00 <tag> &amp; \u2028"
	r.RequestID = strings.Repeat("é", 1000)
	got, err := l.Append(r)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.RequestID) > MaxFieldBytes || !strings.HasSuffix(got.RequestID, "…") {
		t.Fatalf("long request id kept %d bytes", len(got.RequestID))
	}
	tail, err := l.Tail(1)
	if err != nil || !reflect.DeepEqual(tail[0], got) {
		t.Fatalf("Tail = %+v, %v\nwant %+v", tail, err, got)
	}
	l.Close()
	if rep := mustVerify(t, path); !rep.OK {
		t.Fatalf("Verify = %+v", rep)
	}
}

func TestCanonicalEncodingIsUnambiguous(t *testing.T) {
	a := Record{Principal: "ab", Role: "c"}
	b := Record{Principal: "a", Role: "bc"}
	if bytes.Equal(appendCanonical(nil, &a), appendCanonical(nil, &b)) {
		t.Fatal("shifting a byte between fields leaves the encoding unchanged")
	}
}
