package fsm

import (
	"bytes"
	"fmt"
	"io"
	"math/rand"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// randomLog builds a seeded sequence of n command entries that exercises
// every handler's success and failure paths, request-id retries, expiry and
// pruning (including leader time jumping forward and stepping back).
func randomLog(t testing.TB, seed int64, n int) []*raft.Log {
	t.Helper()
	rng := rand.New(rand.NewSource(seed))
	pick := func(prefix string, k int) string { return fmt.Sprintf("%s%d", prefix, rng.Intn(k)) }
	now := t0
	logs := make([]*raft.Log, 0, n)
	for i := range n {
		switch r := rng.Intn(20); {
		case r == 0:
			now += int64(30 * time.Hour) // past every TTL
		case r == 1:
			now -= int64(time.Hour) // a new leader with a slower clock
		default:
			now += rng.Int63n(int64(10 * time.Minute))
		}
		var typ fsmpb.CommandType
		var payload proto.Message
		ignorable := false
		switch r := rng.Intn(100); {
		case i == 0 || r < 2:
			typ, payload = typInit, initPayload()
		case r < 45:
			p := createKeyPayload(keyID(rng.Intn(200)))
			p.Spec = fsmpb.KeySpec(rng.Intn(11))
			p.Usage = fsmpb.KeyUsage(rng.Intn(4))
			if rng.Intn(3) == 0 {
				p.Alias = pick("alias-", 40)
			}
			if rng.Intn(4) == 0 {
				p.Tags = map[string]string{pick("t", 5): pick("v", 5), pick("t", 5): "x", "": ""}
				if rng.Intn(2) == 0 {
					delete(p.Tags, "")
				}
			}
			if rng.Intn(10) == 0 {
				p.Material.KekVersion = 2
			}
			typ, payload = typCreate, p
		case r < 60:
			typ, payload = typToken, joinTokenPayload(pick("tok", 8), now+rng.Int63n(int64(4*time.Hour))-int64(time.Hour))
		case r < 75:
			p := admitPayload(pick("tok", 8), pick("n", 12))
			if rng.Intn(5) == 0 {
				p.SecretHash = []byte("wrong")
			}
			if rng.Intn(5) == 0 {
				p.Node.RaftAddr = pick("n", 12) + ".raft:7000"
			}
			typ, payload = typAdmit, p
		case r < 85:
			typ, payload = typRemove, &fsmpb.RemoveNode{NodeId: pick("n", 12)}
		case r < 92:
			typ, payload = typNoop, &fsmpb.Noop{}
		default:
			typ, ignorable = 77, true
		}
		cmd, err := NewCommand(typ, payload, "", pick("user", 3))
		if err != nil {
			t.Fatal(err)
		}
		if rng.Intn(2) == 0 {
			cmd.RequestId = pick("req-", 60)
		}
		if rng.Intn(50) == 0 {
			cmd.Payload = []byte{0x0a, 0xff} // malformed
		}
		cmd.Ignorable = ignorable
		cmd.LeaderTimeUnixNano = now
		logs = append(logs, logOf(t, uint64(i+1), cmd))
	}
	return logs
}

func applyAll(f *FSM, logs []*raft.Log) []interface{} {
	var out []interface{}
	for i := 0; i < len(logs); {
		// Mix single applies and batches: both paths must agree.
		n := 1 + i%5
		if i+n > len(logs) {
			n = len(logs) - i
		}
		if n == 1 {
			out = append(out, f.Apply(logs[i]))
		} else {
			out = append(out, f.ApplyBatch(logs[i:i+n])...)
		}
		i += n
	}
	return out
}

func TestDeterminism(t *testing.T) {
	for _, seed := range []int64{1, 2, 3} {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			logs := randomLog(t, seed, 500)

			a, b := New(Config{}), New(Config{})
			resA := applyAll(a, logs)
			for _, l := range logs {
				b.Apply(l)
			}
			snapA, snapB := snapshotBytes(t, a), snapshotBytes(t, b)
			if !bytes.Equal(snapA, snapB) {
				t.Fatalf("two FSMs fed the same log produced different snapshots")
			}

			// A node that joins halfway through from a snapshot ends identical.
			c := New(Config{})
			applyAll(c, logs[:250])
			d := New(Config{})
			if err := d.Restore(io.NopCloser(bytes.NewReader(snapshotBytes(t, c)))); err != nil {
				t.Fatal(err)
			}
			applyAll(d, logs[250:])
			if !bytes.Equal(snapA, snapshotBytes(t, d)) {
				t.Fatalf("restore-then-replay diverged from a full replay")
			}

			// A bare State (replay without a node) agrees too.
			s := NewState()
			for _, l := range logs {
				cmd, err := DecodeCommand(l.Data)
				if err != nil {
					t.Fatal(err)
				}
				s.Apply(l.Index, cmd)
			}
			stBytes, err := MarshalState(s.ToProto())
			if err != nil {
				t.Fatal(err)
			}
			if sha256Sum(stBytes) != a.Digest() {
				t.Fatalf("State replay diverged from FSM")
			}

			// The log exercised successes and failures, and no message
			// carries key material.
			counts := map[string]int{}
			for i, r := range resA {
				res := r.(*fsmpb.Result)
				cmd, _ := DecodeCommand(logs[i].Data)
				counts[fmt.Sprintf("%s/%s", typeName(cmd.GetType()), res.GetCode())]++
				if strings.Contains(res.GetMessage(), "wrapped-") {
					t.Fatalf("message carries material: %q", res.GetMessage())
				}
			}
			for _, want := range []string{"CREATE_KEY/RESULT_CODE_OK", "CREATE_KEY/RESULT_CODE_INVALID_ARGUMENT",
				"CREATE_KEY/RESULT_CODE_ALREADY_EXISTS", "ADMIT_NODE/RESULT_CODE_OK", "ADMIT_NODE/RESULT_CODE_PERMISSION_DENIED",
				"REMOVE_NODE/RESULT_CODE_OK", "CREATE_JOIN_TOKEN/RESULT_CODE_OK"} {
				if counts[want] == 0 {
					t.Errorf("the random log never produced %s (counts %v)", want, counts)
				}
				if testing.Verbose() {
					t.Logf("%s: %d", want, counts[want])
				}
			}
			if a.Halted() != nil {
				t.Fatalf("halted: %v", a.Halted())
			}
		})
	}
}
