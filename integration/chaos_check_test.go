package integration

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"
	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// ---- checker 1: linearizability of the key registry ----
//
// Per logical key (a porcupine partition) the model is the key's existence,
// state and primary version. Observations that must be linearizable:
// acknowledged writes (their responses carry the key after the write) and
// STRONG encrypts (ok: the key is ACTIVE and the version is the primary;
// FailedPrecondition: it is not ACTIVE). A write whose outcome is unknown
// may take effect at any point after its call (return = +inf). Definite
// write errors have no effect and constrain nothing (a state rule may have
// refused it). Bounded-staleness reads are not linearizable by design and
// are checked by the revocation bound instead.

type regState struct {
	Created bool
	State   string
	Primary uint32
}

type regOutput struct {
	Outcome string
	Code    string
	Version uint32
	State   string
}

func registryModel() porcupine.Model {
	return porcupine.Model{
		Partition: func(h []porcupine.Operation) [][]porcupine.Operation {
			by := map[string][]porcupine.Operation{}
			var order []string
			for _, op := range h {
				k := op.Metadata.(string)
				if _, ok := by[k]; !ok {
					order = append(order, k)
				}
				by[k] = append(by[k], op)
			}
			var out [][]porcupine.Operation
			for _, k := range order {
				out = append(out, by[k])
			}
			return out
		},
		Init: func() interface{} { return regState{} },
		Step: func(s, in, out interface{}) (bool, interface{}) {
			st, kind, o := s.(regState), in.(string), out.(regOutput)
			return registryStep(st, kind, o)
		},
		DescribeOperation: func(in, out interface{}) string {
			o := out.(regOutput)
			if o.Outcome == "ok" {
				return fmt.Sprintf("%s -> v%d %s", in, o.Version, o.State)
			}
			return fmt.Sprintf("%s -> %s %s", in, o.Outcome, o.Code)
		},
		DescribeState: func(s interface{}) string {
			st := s.(regState)
			if !st.Created {
				return "absent"
			}
			return fmt.Sprintf("%s v%d", st.State, st.Primary)
		},
	}
}

func registryStep(st regState, kind string, o regOutput) (bool, regState) {
	unknown := o.Outcome == "unknown"
	if o.Outcome == "fail" && kind != "encrypt-strong" {
		// A definite refusal has no effect. FailedPrecondition is the state
		// rule speaking (README: only ACTIVE keys rotate, revoked keys cannot
		// be enabled or disabled), so it must match the state at some point
		// of the call; other definite errors constrain nothing.
		if o.Code != "FailedPrecondition" || !st.Created {
			return true, st
		}
		switch kind {
		case "rotate":
			return st.State != "ACTIVE", st
		case "disable", "enable":
			return st.State != "ACTIVE" && st.State != "DISABLED", st
		}
		return true, st
	}
	switch kind {
	case "create":
		if st.Created {
			return unknown, st // a second creation of one logical key
		}
		v := o.Version
		if unknown {
			v = 1
		}
		return true, regState{Created: true, State: "ACTIVE", Primary: v}
	}
	if !st.Created {
		return unknown, st
	}
	next := st
	switch kind {
	case "rotate":
		next.Primary = st.Primary + 1
		if unknown {
			if st.State != "ACTIVE" {
				return true, st
			}
			return true, next
		}
		return o.Version == next.Primary && o.State == st.State, next
	case "disable", "enable":
		want := map[string]string{"disable": "DISABLED", "enable": "ACTIVE"}[kind]
		if st.State != "ACTIVE" && st.State != "DISABLED" {
			return unknown, st // revoked keys cannot be toggled
		}
		next.State = want
		return unknown || (o.State == want && o.Version == st.Primary), next
	case "revoke":
		next.State = "DEACTIVATED"
		return unknown || (o.State == "DEACTIVATED" && o.Version == st.Primary), next
	case "encrypt-strong":
		switch o.Outcome {
		case "ok":
			return st.State == "ACTIVE" && o.Version == st.Primary, st
		case "fail":
			if o.Code == "FailedPrecondition" {
				return st.State != "ACTIVE", st
			}
			if o.Code == "NotFound" {
				return false, st
			}
		}
		return true, st
	}
	return true, st
}

func porcupineOps(h chaosHistory) []porcupine.Operation {
	var ops []porcupine.Operation
	for _, op := range h.Ops {
		kind := op.Kind
		switch kind {
		case "encrypt":
			if !op.Strong {
				continue
			}
			kind = "encrypt-strong"
		case "decrypt":
			continue
		}
		code := op.Code // rotate conflicts are no longer special: finding 1 is fixed
		ret := op.Return
		if op.Outcome == "unknown" {
			ret = math.MaxInt64
		}
		ops = append(ops, porcupine.Operation{ClientId: op.Client, Input: kind, Call: op.Call, Return: ret,
			Output: regOutput{Outcome: op.Outcome, Code: code, Version: op.Version, State: op.State}, Metadata: op.Key})
	}
	return ops
}

func checkLinearizable(h chaosHistory) []string {
	model := registryModel()
	var out []string
	for _, part := range model.Partition(porcupineOps(h)) {
		res := porcupine.CheckOperationsTimeout(porcupine.Model{Init: model.Init, Step: model.Step}, part, 30*time.Second)
		switch res {
		case porcupine.Ok:
			continue
		case porcupine.Unknown:
			out = append(out, fmt.Sprintf("linearizability of key %s: checker timed out (%d ops), inconclusive", part[0].Metadata, len(part)))
			continue
		}
		out = append(out, describeNonLinearizable(model, h, part))
	}
	return out
}

// describeNonLinearizable shrinks a failing partition to its shortest
// failing prefix (by call time) and prints the tail of that prefix.
func describeNonLinearizable(model porcupine.Model, h chaosHistory, part []porcupine.Operation) string {
	sort.Slice(part, func(i, j int) bool { return part[i].Call < part[j].Call })
	m := porcupine.Model{Init: model.Init, Step: model.Step}
	n := len(part)
	for k := 1; k <= len(part); k++ {
		if porcupine.CheckOperationsTimeout(m, part[:k], 5*time.Second) == porcupine.Illegal {
			n = k
			break
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "NOT LINEARIZABLE: key %s (%d ops); shortest failing prefix has %d ops; its last ones:\n", part[0].Metadata, len(part), n)
	from := n - 15
	if from < 0 {
		from = 0
	}
	for _, op := range part[from:n] {
		ret := "inf"
		if op.Return != math.MaxInt64 {
			ret = fmt.Sprintf("%.3fs", float64(op.Return)/1e9)
		}
		fmt.Fprintf(&b, "  client %d [%.3fs, %s] %s\n", op.ClientId, float64(op.Call)/1e9, ret, model.DescribeOperation(op.Input, op.Output))
	}
	{
		dir := os.Getenv("CHAOS_OUT")
		if dir == "" {
			dir = filepath.Join("..", ".run", "chaos")
		}
		_ = os.MkdirAll(dir, 0o755)
		_, info := porcupine.CheckOperationsVerbose(model, part[:n], 10*time.Second)
		p := filepath.Join(dir, fmt.Sprintf("seed-%d-%s.html", h.Config.Seed, part[0].Metadata))
		if err := porcupine.VisualizePath(model, info, p); err == nil {
			abs, _ := filepath.Abs(p)
			fmt.Fprintf(&b, "  porcupine visualization: %s\n", abs)
		}
	}
	return b.String()
}

// isRotateConflict: a RotateKey refused because a concurrent rotation took
// the version number it had prepared ("version N already exists"). Known
// server bug (docs/RELIABILITY.md, TestRegressionConcurrentRotate): it is
// a FailedPrecondition on an ACTIVE key, which clients do not retry.
func isRotateConflict(op chaosOp) bool {
	return op.Kind == "rotate" && op.Outcome == "fail" && strings.Contains(op.Err, "already exists")
}

// ---- checker 3: the revocation bound ----
//
// What the server promises: a follower serves bounded-staleness crypto only
// while it heard from the leader within max_staleness, and a message heard
// carries the leader's commit index; so once a disable/revoke is
// acknowledged, no node may encrypt with the key later than max_staleness
// (plus the delay the proxy injected and a little apply/scheduling slack)
// after the acknowledgement — unless an enable that could have been ordered
// after the disable intervened.
const revocationSlack = 500 * time.Millisecond

func checkRevocationBound(h chaosHistory) []string {
	var maxDelay time.Duration
	for _, f := range h.Faults {
		if f.Kind == "delay" {
			d, _ := time.ParseDuration(strings.Fields(f.Detail)[0])
			if d > maxDelay {
				maxDelay = d
			}
		}
	}
	bound := int64(h.Config.MaxStaleness + 2*maxDelay + revocationSlack)
	byKey := map[string][]chaosOp{}
	for _, op := range h.Ops {
		byKey[op.Key] = append(byKey[op.Key], op)
	}
	var out []string
	for key, ops := range byKey {
		for _, d := range ops {
			if (d.Kind != "disable" && d.Kind != "revoke") || d.Outcome != "ok" {
				continue
			}
			for _, e := range ops {
				if e.Kind != "encrypt" || e.Outcome != "ok" || e.Call <= d.Return+bound {
					continue
				}
				excused := false
				for _, n := range ops {
					if n.Kind == "enable" && n.Outcome != "fail" && n.Return > d.Call && n.Call < e.Return {
						excused = true
						break
					}
				}
				if !excused {
					out = append(out, fmt.Sprintf("REVOCATION BOUND: key %s %s acknowledged at %.3fs (client %d, request %s), but encrypt on node%d (strong=%v) called at %.3fs succeeded with v%d: %v after the acknowledgement, bound %v",
						key, d.Kind, float64(d.Return)/1e9, d.Client, d.RequestID, e.Node+1, e.Strong, float64(e.Call)/1e9, e.Version,
						time.Duration(e.Call-d.Return).Round(time.Millisecond), time.Duration(bound)))
					break
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

// checkDecryptIntegrity: a successful decrypt returns what was encrypted.
func checkDecryptIntegrity(h chaosHistory) []string {
	var out []string
	for _, op := range h.Ops {
		if op.Kind == "decrypt" && op.Outcome == "ok" && !bytesEqual(op.Plaintext, op.ExpectPlain) {
			out = append(out, fmt.Sprintf("DECRYPT INTEGRITY: op %d on node%d returned %q, encrypted %q", op.ID, op.Node+1, op.Plaintext, op.ExpectPlain))
		}
	}
	return out
}

// ---- checker 4: convergence ----

func listAllKeys(ctx context.Context, k cabinetpb.KeyServiceClient) ([]*cabinetpb.Key, error) {
	var all []*cabinetpb.Key
	token := ""
	for {
		r, err := k.ListKeys(ctx, &cabinetpb.ListKeysRequest{PageSize: 500, PageToken: token})
		if err != nil {
			return nil, err
		}
		all = append(all, r.GetKeys()...)
		if token = r.GetNextPageToken(); token == "" {
			return all, nil
		}
	}
}

// stateDigest is a stable digest of every key's id, state and versions.
func stateDigest(keys []*cabinetpb.Key) (string, string) {
	sort.Slice(keys, func(i, j int) bool { return keys[i].GetKeyId() < keys[j].GetKeyId() })
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s %s p%d", k.GetKeyId(), k.GetState(), k.GetPrimaryVersion())
		for _, v := range k.GetVersions() {
			fmt.Fprintf(&b, " v%d:%s", v.GetVersion(), v.GetState())
		}
		b.WriteString("\n")
	}
	sum := sha256.Sum256([]byte(b.String()))
	return fmt.Sprintf("%d keys sha256:%s", len(keys), hex.EncodeToString(sum[:8])), b.String()
}

// checkConvergence waits until every node has applied the same index and
// then compares the digests of their key registries.
func checkConvergence(cc *chaosCluster) ([]string, []string) {
	var digests, texts []string
	err := pollUntil(context.Background(), 30*time.Second, func() error {
		digests, texts = nil, nil
		var applied []uint64
		for i := range cc.nodes {
			st, err := cc.nodeStatus(i)
			if err != nil {
				return err
			}
			applied = append(applied, st.GetAppliedIndex())
		}
		for _, a := range applied[1:] {
			if a != applied[0] {
				return fmt.Errorf("applied indexes differ: %v", applied)
			}
		}
		for i := range cc.nodes {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			keys, err := listAllKeys(ctx, cc.keys(i))
			cancel()
			if err != nil {
				return err
			}
			d, txt := stateDigest(keys)
			digests, texts = append(digests, d), append(texts, txt)
		}
		for i := range digests[1:] {
			if digests[i+1] != digests[0] {
				return fmt.Errorf("digests differ: %v", digests)
			}
		}
		return nil
	})
	if err != nil {
		msg := fmt.Sprintf("CONVERGENCE: nodes did not converge: %v", err)
		for i, txt := range texts {
			msg += fmt.Sprintf("\n  node%d: %s", i+1, firstLines(txt, 5))
		}
		return []string{msg}, digests
	}
	return nil, digests
}

func firstLines(s string, n int) string {
	l := strings.Split(s, "\n")
	if len(l) > n {
		l = l[:n]
	}
	return strings.Join(l, " | ")
}

// ---- checker 2: durability ----

// checkDurability: every acknowledged creation exists on every node, and
// every acknowledged ciphertext decrypts (STRONG) to what was encrypted.
// Disabled keys are enabled first (DEACTIVATED keys still decrypt).
func checkDurability(cc *chaosCluster, h chaosHistory) []string {
	var out []string
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	created := map[string]string{}
	for _, op := range h.Ops {
		if op.Kind == "create" && op.Outcome == "ok" {
			created[op.KeyID] = op.Key
		}
	}
	for i := range cc.nodes {
		keys, err := listAllKeys(ctx, cc.keys(i))
		if err != nil {
			return append(out, fmt.Sprintf("DURABILITY: list keys on node%d: %v", i+1, err))
		}
		have := map[string]*cabinetpb.Key{}
		for _, k := range keys {
			have[k.GetKeyId()] = k
		}
		for id, name := range created {
			if have[id] == nil {
				out = append(out, fmt.Sprintf("DURABILITY: acknowledged key %s (%s) missing on node%d", id, name, i+1))
			} else if i == 0 && have[id].GetState() == cabinetpb.KeyState_DISABLED {
				// A write right after the faults are undone may meet an
				// election: retry (one request id) over the nodes.
				try := 0
				err := pollUntil(ctx, 30*time.Second, func() error {
					try++
					_, err := cc.keys(try%len(cc.nodes)).EnableKey(ctx, &cabinetpb.KeyRefRequest{KeyId: id, RequestId: "durability-enable-" + id})
					if err != nil && !retryableCode(err) {
						return nil
					}
					return err
				})
				if err != nil {
					out = append(out, fmt.Sprintf("DURABILITY: cannot enable %s for the decrypt check: %v", id, err))
				}
			}
		}
	}
	n := 0
	for _, op := range h.Ops {
		if op.Kind != "encrypt" || op.Outcome != "ok" {
			continue
		}
		node := n % len(cc.nodes)
		n++
		var r *cabinetpb.DecryptResponse
		err := pollUntil(ctx, 10*time.Second, func() error {
			var err error
			r, err = cc.keys(node).Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: op.Ciphertext, EncryptionContext: map[string]string{"k": op.Key}, Consistency: cabinetpb.Consistency_STRONG})
			if err != nil && !retryableCode(err) {
				return nil
			}
			return err
		})
		if err == nil && r == nil {
			err = fmt.Errorf("definite error")
		}
		if err != nil || r == nil {
			_, e2 := cc.keys(node).Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: op.Ciphertext, EncryptionContext: map[string]string{"k": op.Key}, Consistency: cabinetpb.Consistency_STRONG})
			out = append(out, fmt.Sprintf("DURABILITY: ciphertext of op %d (key %s v%d, acknowledged at %.3fs) does not decrypt on node%d: %s %s",
				op.ID, op.KeyID, op.Version, float64(op.Return)/1e9, node+1, status.Code(e2), status.Convert(e2).Message()))
			continue
		}
		if !bytesEqual(r.GetPlaintext(), op.Plaintext) {
			out = append(out, fmt.Sprintf("DURABILITY: ciphertext of op %d decrypts to %q, encrypted %q", op.ID, r.GetPlaintext(), op.Plaintext))
		}
	}
	return out
}

// ---- history files and replay ----

func marshalHistory(h chaosHistory) ([]byte, error) {
	return json.MarshalIndent(h, "", " ")
}

// TestChaosReplay re-runs the offline checkers (linearizability,
// revocation bound, decrypt integrity) over a saved history:
// CHAOS_REPLAY=.run/chaos/seed-N-....json go test ./integration -run TestChaosReplay -v
func TestChaosReplay(t *testing.T) {
	path := os.Getenv("CHAOS_REPLAY")
	if path == "" {
		t.Skip("set CHAOS_REPLAY to a saved chaos history")
	}
	if _, err := os.Stat(path); err != nil && !filepath.IsAbs(path) {
		path = filepath.Join("..", path) // relative to the repository root
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var h chaosHistory
	if err := json.Unmarshal(b, &h); err != nil {
		t.Fatal(err)
	}
	t.Logf("seed=%d: %s", h.Config.Seed, historyStats(h))
	for _, f := range h.Faults {
		t.Logf("fault %s", f)
	}
	var v []string
	v = append(v, checkLinearizable(h)...)
	v = append(v, checkRevocationBound(h)...)
	v = append(v, checkDecryptIntegrity(h)...)
	for _, s := range v {
		t.Error(s)
	}
}

// TestChaosCheckersCatchViolations feeds hand-made bad histories to the
// checkers, so a green chaos run means something.
func TestChaosCheckersCatchViolations(t *testing.T) {
	ms := int64(time.Millisecond)
	base := []chaosOp{
		{Client: 0, Kind: "create", Key: "a", KeyID: "id-a", Call: 0, Return: 10 * ms, Outcome: "ok", Version: 1, State: "ACTIVE"},
		{Client: 0, Kind: "rotate", Key: "a", Call: 20 * ms, Return: 30 * ms, Outcome: "ok", Version: 2, State: "ACTIVE"},
	}
	cfg := chaosConfig{MaxStaleness: 2 * time.Second}
	good := chaosHistory{Config: cfg, Ops: append(append([]chaosOp(nil), base...),
		chaosOp{Client: 1, Kind: "encrypt", Strong: true, Key: "a", Call: 40 * ms, Return: 50 * ms, Outcome: "ok", Version: 2},
		chaosOp{Client: 1, Kind: "rotate", Key: "a", Call: 60 * ms, Return: math.MaxInt32, Outcome: "unknown"},
		chaosOp{Client: 2, Kind: "encrypt", Strong: true, Key: "a", Call: 70 * ms, Return: 80 * ms, Outcome: "ok", Version: 3},
		chaosOp{Client: 0, Kind: "disable", Key: "a", Call: 90 * ms, Return: 100 * ms, Outcome: "ok", Version: 3, State: "DISABLED"},
		chaosOp{Client: 2, Kind: "encrypt", Key: "a", Call: 1000 * ms, Return: 1010 * ms, Outcome: "ok", Version: 3}, // stale but within the bound
	)}
	if v := append(checkLinearizable(good), checkRevocationBound(good)...); len(v) != 0 {
		t.Fatalf("a valid history was rejected: %v", v)
	}
	stale := chaosHistory{Config: cfg, Ops: append(append([]chaosOp(nil), base...),
		chaosOp{Client: 1, Kind: "encrypt", Strong: true, Key: "a", Call: 40 * ms, Return: 50 * ms, Outcome: "ok", Version: 1})}
	if v := checkLinearizable(stale); len(v) != 1 {
		t.Fatalf("a STRONG read of an old primary version was not caught: %v", v)
	}
	late := chaosHistory{Config: cfg, Ops: append(append([]chaosOp(nil), base...),
		chaosOp{Client: 0, Kind: "disable", Key: "a", Call: 40 * ms, Return: 50 * ms, Outcome: "ok", Version: 2, State: "DISABLED"},
		chaosOp{Client: 1, Kind: "encrypt", Key: "a", Call: 3000 * ms, Return: 3010 * ms, Outcome: "ok", Version: 2})}
	if v := checkRevocationBound(late); len(v) != 1 {
		t.Fatalf("an encrypt 3s after a disable was not caught: %v", v)
	}
	late.Ops = append(late.Ops, chaosOp{Client: 2, Kind: "enable", Key: "a", Call: 2000 * ms, Return: 2010 * ms, Outcome: "ok", Version: 2, State: "ACTIVE"})
	if v := checkRevocationBound(late); len(v) != 0 {
		t.Fatalf("an encrypt after a re-enable was flagged: %v", v)
	}
}
