package fsm

// Scale measurement (docs/PERFORMANCE.md, "Scale"). This is a measurement,
// not a check: it only runs with CABINET_SCALE=1 (it needs minutes and
// several GiB at 1M keys), and it asserts nothing about timings.
//
//	CABINET_SCALE=1 CABINET_SCALE_KEYS=10000,100000,1000000 \
//	  go test -run '^TestScale$' -v -timeout 60m ./fsm

import (
	"bufio"
	"context"
	"crypto/rand"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/keyops"
)

// scaleWorkingSet is the number of keys (picked at random out of N) that get
// real sealed material and are used by the encrypt measurement; it fits the
// default unwrap cache (keyops.DefaultCacheSize), so the cache is warm.
const scaleWorkingSet = 1000

type fileSink struct {
	*os.File
}

func (s fileSink) ID() string    { return "file" }
func (s fileSink) Cancel() error { return s.File.Close() }

func heapInuse() uint64 {
	runtime.GC()
	runtime.GC()
	debug.FreeOSMemory()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

func rssBytes() uint64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			kb, _ := strconv.ParseUint(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

// scaleKey returns a realistic AES-256 key record: ~60-byte sealed material
// per version, an alias on every 4th key, 3 versions on every 10th, tags on
// every 8th.
func scaleKey(i int, blob []byte) *fsmpb.KeyRecord {
	id := keyID(i)
	rec := &fsmpb.KeyRecord{
		KeyId: id, Spec: fsmpb.KeySpec_KEY_SPEC_AES_256, Usage: fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT,
		State: fsmpb.KeyState_KEY_STATE_ACTIVE, Origin: fsmpb.KeyOrigin_KEY_ORIGIN_GENERATED,
		CreatedUnixNano: t0 + int64(i), UpdatedUnixNano: t0 + int64(i), CreatedBy: "svc-" + strconv.Itoa(i%50),
	}
	if i%4 == 0 {
		rec.Alias = "app-" + strconv.Itoa(i)
		rec.Description = "key for tenant " + strconv.Itoa(i)
	}
	if i%8 == 0 {
		rec.Tags = map[string]string{"team": "payments", "env": "prod"}
	}
	versions := 1
	if i%10 == 0 {
		versions = 3
	}
	for v := 1; v <= versions; v++ {
		b := make([]byte, len(blob))
		copy(b, blob)
		b[0], b[1], b[2], b[3] = byte(i), byte(i>>8), byte(i>>16), byte(v)
		rec.Versions = append(rec.Versions, &fsmpb.KeyVersion{
			Version: uint32(v), Material: &fsmpb.WrappedBlob{KekVersion: 1, Blob: b},
			CreatedUnixNano: t0 + int64(i), State: fsmpb.KeyVersionState_KEY_VERSION_STATE_ENABLED,
		})
	}
	rec.PrimaryVersion = uint32(versions)
	return rec
}

func TestScale(t *testing.T) {
	if os.Getenv("CABINET_SCALE") != "1" {
		t.Skip("measurement, not a check: set CABINET_SCALE=1 to run (docs/PERFORMANCE.md, Scale)")
	}
	sizes := []int{10_000, 100_000, 1_000_000}
	if s := os.Getenv("CABINET_SCALE_KEYS"); s != "" {
		sizes = nil
		for _, f := range strings.Split(s, ",") {
			n, err := strconv.Atoi(f)
			if err != nil {
				t.Fatal(err)
			}
			sizes = append(sizes, n)
		}
	}
	dir := t.TempDir()
	if d := os.Getenv("CABINET_SCALE_DIR"); d != "" {
		dir = d
	}
	var rows []string
	for _, n := range sizes {
		rows = append(rows, scaleOne(t, n, dir))
	}
	fmt.Println("| keys | heap B/key | RSS B/key | snapshot bytes | snapshot take+persist | restore (read+verify+index) | create-key apply µs | Key() ns | encrypt ops/s (1 goroutine) | encrypt ops/s (GOMAXPROCS) |")
	fmt.Println("|---|---|---|---|---|---|---|---|---|---|")
	for _, r := range rows {
		fmt.Println(r)
	}
}

func scaleOne(t *testing.T, n int, dir string) string {
	ctx := context.Background()
	mem := hsm.NewMemory()
	if _, err := mem.GenerateKEK(ctx, 1); err != nil {
		t.Fatal(err)
	}
	engine, err := keyops.New(keyops.Config{Sealer: mem})
	if err != nil {
		t.Fatal(err)
	}

	// The working set gets real material (sealed by the in-memory HSM).
	rng := mrand.New(mrand.NewPCG(uint64(n), 7))
	ws := make(map[int]bool, scaleWorkingSet)
	for len(ws) < min(scaleWorkingSet, n) {
		ws[rng.IntN(n)] = true
	}
	wsIDs := make([]string, 0, len(ws))

	// Build the snapshot file: the initialised cluster plus n keys.
	path := filepath.Join(dir, fmt.Sprintf("scale-%d.snap", n))
	{
		a := initialised(t)
		st := a.s.ToProto()
		blob := make([]byte, 60)
		_, _ = rand.Read(blob)
		st.Keys = make([]*fsmpb.KeyRecord, 0, n)
		for i := range n {
			rec := scaleKey(i, blob)
			if ws[i] {
				for _, v := range rec.Versions {
					w, _, err := engine.WrapNewMaterial(ctx, rec.KeyId, v.Version, rec.Spec, 1)
					if err != nil {
						t.Fatal(err)
					}
					v.Material = w
				}
				wsIDs = append(wsIDs, rec.KeyId)
			}
			st.Keys = append(st.Keys, rec)
		}
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		w := bufio.NewWriterSize(f, 256<<10)
		if err := WriteSnapshot(w, st); err != nil {
			t.Fatal(err)
		}
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}

	// Restore: read, verify, decode and index (what a restarting node does
	// with its latest snapshot before it can serve).
	heap0, rss0 := heapInuse(), rssBytes()
	fs := New(Config{})
	rc, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := fs.Restore(rc); err != nil {
		t.Fatal(err)
	}
	restore := time.Since(start)
	heap1, rss1 := heapInuse(), rssBytes()
	if fs.KeyCount() != n {
		t.Fatalf("restored %d keys, want %d", fs.KeyCount(), n)
	}
	heapPerKey := float64(heap1-heap0) / float64(n)
	rssPerKey := float64(int64(rss1)-int64(rss0)) / float64(n)

	// Take a snapshot (Snapshot under the lock, then Persist to a file).
	out := filepath.Join(dir, fmt.Sprintf("scale-%d.out", n))
	start = time.Now()
	snap, err := fs.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	freeze := time.Since(start)
	of, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	if err := snap.Persist(fileSink{of}); err != nil {
		t.Fatal(err)
	}
	take := time.Since(start)
	fi, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(out)

	// Apply: create-key commands on top of n keys (must not grow with n).
	a := newApplier(t)
	const applies = 2000
	logs := make([]*fsmpb.Command, applies)
	for i := range logs {
		logs[i] = a.command(typCreate, createKeyPayload(keyID(n+10_000_000+i)), env{requestID: fmt.Sprint("scale-", i)})
	}
	idx := uint64(1_000)
	start = time.Now()
	for _, c := range logs {
		idx++
		fs.Apply(logOf(t, idx, c))
	}
	applyUS := float64(time.Since(start).Microseconds()) / applies

	// Key lookup by id and alias.
	const lookups = 1_000_000
	start = time.Now()
	for i := range lookups {
		j := rng.IntN(n)
		if _, ok := fs.Key(keyID(j)); !ok {
			t.Fatal("missing key")
		}
		_ = i
	}
	keyNS := float64(time.Since(start).Nanoseconds()) / lookups

	// Encrypt 1 KiB with random keys of the working set, looked up in the
	// FSM per request, warm cache.
	pt := make([]byte, 1024)
	encCtx := map[string]string{"tenant": "acme"}
	for _, id := range wsIDs {
		rec, _ := fs.Key(id)
		if _, _, err := engine.Encrypt(ctx, rec, pt, encCtx); err != nil {
			t.Fatal(err)
		}
	}
	encrypt := func(workers int) float64 {
		var ops atomic.Int64
		var wg sync.WaitGroup
		deadline := time.Now().Add(3 * time.Second)
		start := time.Now()
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := mrand.New(mrand.NewPCG(uint64(w), 1))
				var local int64
				for time.Now().Before(deadline) {
					for range 256 {
						rec, ok := fs.Key(wsIDs[r.IntN(len(wsIDs))])
						if !ok {
							panic("missing key")
						}
						if _, _, err := engine.Encrypt(ctx, rec, pt, encCtx); err != nil {
							panic(err)
						}
						local++
					}
				}
				ops.Add(local)
			}()
		}
		wg.Wait()
		return float64(ops.Load()) / time.Since(start).Seconds()
	}
	enc1 := encrypt(1)
	encP := encrypt(runtime.GOMAXPROCS(0))
	cs := engine.CacheStats()

	t.Logf("n=%d heap0=%d heap1=%d rss0=%d rss1=%d freeze=%v cache=%+v", n, heap0, heap1, rss0, rss1, freeze, cs)
	row := fmt.Sprintf("| %d | %.0f | %.0f | %d (%.1f MiB) | %v (freeze %v) | %v | %.1f | %.0f | %.0f | %.0f |",
		n, heapPerKey, rssPerKey, fi.Size(), float64(fi.Size())/(1<<20), take.Round(time.Millisecond), freeze.Round(time.Microsecond),
		restore.Round(time.Millisecond), applyUS, keyNS, enc1, encP)
	t.Log(row)
	fs = nil
	runtime.KeepAlive(fs)
	os.Remove(path)
	return row
}

// TestScaleRequestRecords measures what a created key costs in heap with and
// without its request record (kept RequestRecordTTL = 24 h), 100,000
// CreateKeys each (docs/PERFORMANCE.md, "Request records"):
//
//	CABINET_SCALE=1 go test -run '^TestScaleRequestRecords$' -v ./fsm
func TestScaleRequestRecords(t *testing.T) {
	if os.Getenv("CABINET_SCALE") != "1" {
		t.Skip("measurement, not a check: set CABINET_SCALE=1 to run (docs/PERFORMANCE.md, Scale)")
	}
	const n = 100000
	for _, withID := range []bool{false, true} {
		a := initialised(t)
		runtime.GC()
		var m0, m1 runtime.MemStats
		runtime.ReadMemStats(&m0)
		for i := 0; i < n; i++ {
			e := env{}
			if withID {
				e.requestID = fmt.Sprintf("admin:svc-%d/%026d", i%50, i)
			}
			p := createKeyPayload(keyID(i + 1))
			p.Material.Blob = make([]byte, 60)
			p.Description = "key for tenant " + strconv.Itoa(i)
			if r := a.apply(fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, p, e); r.GetCode() != fsmpb.ResultCode_RESULT_CODE_OK {
				t.Fatal(r)
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&m1)
		t.Logf("request ids %v: %d heap bytes per created key (%d request records)", withID,
			(int64(m1.HeapAlloc)-int64(m0.HeapAlloc))/n, a.s.requests.Len())
		runtime.KeepAlive(a)
	}
}
