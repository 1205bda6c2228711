package integration

// Restart-to-serving with N keys (docs/PERFORMANCE.md, "Scale"). This is a
// measurement, not a check: it only runs with CABINET_SCALE=1 and asserts
// nothing about timings.
//
//	CABINET_SCALE=1 CABINET_SCALE_KEYS=10000,100000,1000000 \
//	  go test -run '^TestScaleRestart$' -v -timeout 60m ./integration
//
// It starts a real single-node cluster (SoftHSM), takes a Raft snapshot
// through `cabinet operator snapshot save`, stops the server, and writes a
// newer Raft snapshot into the node's own snapshot store
// (DATA/raft/snapshots): the same Raft index, term and configuration and the
// same cluster state, plus N synthetic AES-256 key records. Then it starts
// `cabinet server` again and times process start -> `cabinet operator
// status` reports healthy with N keys, and reads the server's VmRSS.

import (
	"bufio"
	"crypto/rand"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

func scaleRecord(i int, blob []byte, t0 int64) *fsmpb.KeyRecord {
	rec := &fsmpb.KeyRecord{
		KeyId: fmt.Sprintf("k-scale%020d", i), Spec: fsmpb.KeySpec_KEY_SPEC_AES_256, Usage: fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT,
		State: fsmpb.KeyState_KEY_STATE_ACTIVE, Origin: fsmpb.KeyOrigin_KEY_ORIGIN_GENERATED,
		CreatedUnixNano: t0 + int64(i), UpdatedUnixNano: t0 + int64(i), CreatedBy: "svc-" + strconv.Itoa(i%50),
	}
	if i%4 == 0 {
		rec.Alias = "scale-" + strconv.Itoa(i)
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

func procRSS(pid int) uint64 { return procStatus(pid, "VmRSS:") }

func procStatus(pid int, field string) uint64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, field) {
			kb, _ := strconv.ParseUint(strings.Fields(l)[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

func TestScaleRestart(t *testing.T) {
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
	c := newTestCluster(t, 1)
	nd := c.nodes[0]
	c.initNode(nd)
	c.start(nd)
	c.waitHealthy(nd, 60*time.Second)
	c.mustCLI(nil, "operator", "snapshot", "save", filepath.Join(c.root, "base.snap"), "--addr", nd.apiAddr)
	c.stop(nd)

	raftDir := filepath.Join(nd.dataDir, "raft")
	store, err := raft.NewFileSnapshotStore(raftDir, 1, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	metas, err := store.List()
	if err != nil || len(metas) == 0 {
		t.Fatalf("no raft snapshot in %s: %v", raftDir, err)
	}
	base := metas[0]
	_, rc, err := store.Open(base.ID)
	if err != nil {
		t.Fatal(err)
	}
	baseState, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}

	restart := func(label string, want int) {
		start := time.Now()
		c.start(nd)
		c.waitHealthy(nd, 10*time.Minute)
		took := time.Since(start)
		st, err := c.status(nd)
		if err != nil {
			t.Fatal(err)
		}
		rss := procRSS(nd.cmd.Process.Pid)
		time.Sleep(3 * time.Second)
		rss3 := procRSS(nd.cmd.Process.Pid)
		hwm := procStatus(nd.cmd.Process.Pid, "VmHWM:")
		// A snapshot through the API (Raft snapshot + Persist + stream to
		// the CLI), then the server's peak RSS.
		snapStart := time.Now()
		c.mustCLI(nil, "operator", "snapshot", "save", filepath.Join(c.root, "scale.snap"), "--addr", nd.apiAddr, "--force")
		snapTook := time.Since(snapStart)
		hwmSnap := procStatus(nd.cmd.Process.Pid, "VmHWM:")
		t.Logf("SCALE restart %s: keys=%s (want %d) restart-to-healthy=%v rss-at-healthy=%.1f MiB rss+3s=%.1f MiB peak-rss-before-snapshot=%.1f MiB; snapshot save via CLI %v, peak-rss-after-snapshot=%.1f MiB",
			label, st.KeyCount, want, took.Round(time.Millisecond), float64(rss)/(1<<20), float64(rss3)/(1<<20), float64(hwm)/(1<<20),
			snapTook.Round(time.Millisecond), float64(hwmSnap)/(1<<20))
		c.stop(nd)
	}
	restart("baseline", 0)

	_, trans := raft.NewInmemTransport(raft.ServerAddress(nd.raftAddr))
	defer trans.Close()
	blob := make([]byte, 60)
	_, _ = rand.Read(blob)
	t0 := time.Now().UnixNano()
	for _, n := range sizes {
		st, err := fsm.ReadSnapshot(strings.NewReader(string(baseState)))
		if err != nil {
			t.Fatal(err)
		}
		for i := range n {
			st.Keys = append(st.Keys, scaleRecord(i, blob, t0))
		}
		s, err := fsm.StateFromProto(st)
		if err != nil {
			t.Fatal(err)
		}
		st = s.ToProto() // sorted, as a node writes it
		// The newest snapshot's Raft position (restart() took one through
		// the CLI); the cluster state of the first one plus n keys.
		metas, err := store.List()
		if err != nil || len(metas) == 0 {
			t.Fatalf("list snapshots: %v", err)
		}
		base := metas[0]
		sink, err := store.Create(base.Version, base.Index, base.Term, base.Configuration, base.ConfigurationIndex, trans)
		if err != nil {
			t.Fatal(err)
		}
		w := bufio.NewWriterSize(sink, 256<<10)
		if err := fsm.WriteSnapshot(w, st); err != nil {
			t.Fatal(err)
		}
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		if err := sink.Close(); err != nil {
			t.Fatal(err)
		}
		metas, _ = store.List()
		log.Printf("seeded %d keys: snapshot %s, %d bytes", n, metas[0].ID, metas[0].Size)
		restart(fmt.Sprintf("n=%d snapshot=%d bytes", n, metas[0].Size), n)
	}
}
