package audit

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// BenchmarkAppend measures Append (one write(2), fsync in the background) with
// 1 and 8 goroutines appending at once; ns/op is per record. The ceiling is
// a bare O_APPEND write(2) of a line of the same length on the same disk.
func BenchmarkAppend(b *testing.B) {
	b.Run("ceiling=write(2)", func(b *testing.B) {
		f, err := os.OpenFile(filepath.Join(b.TempDir(), "bare.log"), os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		r := sample(1)
		r.Time, r.PrevHash, r.Hash = time.Now().UTC(), genesisHash, genesisHash
		line := appendLine(nil, &r)
		for b.Loop() {
			if _, err := f.Write(line); err != nil {
				b.Fatal(err)
			}
		}
	})
	for _, goroutines := range []int{1, 8} {
		b.Run(fmt.Sprintf("goroutines=%d", goroutines), func(b *testing.B) {
			l, err := Open(filepath.Join(b.TempDir(), "audit.log"), Options{Node: "node-1"})
			if err != nil {
				b.Fatal(err)
			}
			defer l.Close()
			r := sample(1)
			b.ReportAllocs()
			b.ResetTimer()
			var wg sync.WaitGroup
			for g := range goroutines {
				n := b.N / goroutines
				if g < b.N%goroutines {
					n++
				}
				wg.Go(func() {
					for range n {
						if _, err := l.Append(r); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
		})
	}
}

// BenchmarkVerify measures Verify per record.
func BenchmarkVerify(b *testing.B) {
	path := writeLog(b, 10000)
	b.ResetTimer()
	for b.Loop() {
		if rep, err := Verify(path); err != nil || !rep.OK {
			b.Fatal(rep, err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/10000, "ns/record")
}
