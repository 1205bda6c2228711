package audit

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// FuzzVerify feeds arbitrary file contents to Verify: it must not panic, its
// report must be self-consistent, and a file it accepts must reopen and
// take another record that keeps the chain valid.
func FuzzVerify(f *testing.F) {
	good, err := os.ReadFile(writeLog(f, 3))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add(good[:len(good)-20])
	f.Add(bytes.Replace(good, []byte(`"p2"`), []byte(`"p3"`), 1))
	f.Add([]byte{})
	f.Add([]byte("\n"))
	f.Add([]byte("{}\n"))
	f.Add([]byte(`{"seq":1}` + "\n"))
	dir := f.TempDir() // each fuzz worker runs its inputs one after another
	f.Fuzz(func(t *testing.T, data []byte) {
		rep, err := verifyStream(bytes.NewReader(data))
		if err != nil {
			t.Fatalf("Verify: %v", err)
		}
		lines := uint64(bytes.Count(data, []byte("\n")))
		if !rep.OK {
			if rep.FirstBadSeq != rep.Records+1 || rep.Line != int(rep.Records)+1 || rep.Problem == "" {
				t.Fatalf("inconsistent report %+v", rep)
			}
			return
		}
		if rep.Records != lines || (len(data) > 0 && data[len(data)-1] != '\n') {
			t.Fatalf("OK report %+v for %d lines", rep, lines)
		}
		// A verified file reopens and continues its chain (openFile: Open
		// without the fsyncs, which would make fuzzing crawl).
		path := filepath.Join(dir, "audit.log")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		file, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer file.Close()
		l, err := openFile(file, path, Options{Node: "fuzz", Clock: time.Now})
		if err != nil {
			t.Fatalf("Open of a verified file: %v", err)
		}
		if _, err := l.Append(Record{Principal: "p"}); err != nil {
			t.Fatal(err)
		}
		file.Close()
		if rep2, _ := Verify(path); !rep2.OK || rep2.Records != rep.Records+1 {
			t.Fatalf("after one more record: %+v", rep2)
		}
	})
}

// FuzzParseCanonical checks the fast line parser against encoding/json: a
// line it accepts and that re-encodes to itself decodes to the same record.
func FuzzParseCanonical(f *testing.F) {
	r := sample(1)
	r.Time, r.PrevHash, r.Hash = time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC), genesisHash, genesisHash
	r.Principal = "a\"b\\c\n\x01é"
	f.Add(appendLine(nil, &r))
	f.Add([]byte(`{"seq":01,"time":"x"}`))
	f.Fuzz(func(t *testing.T, line []byte) {
		line = bytes.TrimSuffix(line, []byte("\n"))
		fast, ok := parseCanonical(line)
		if !ok || !bytes.Equal(appendLine(nil, &fast), append(line, '\n')) {
			return
		}
		var slow Record
		if err := json.Unmarshal(line, &slow); err != nil {
			t.Fatalf("canonical line %q does not decode: %v", line, err)
		}
		if !reflect.DeepEqual(fast, slow) {
			t.Fatalf("fast parser %+v, encoding/json %+v", fast, slow)
		}
	})
}
