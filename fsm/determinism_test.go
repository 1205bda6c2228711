package fsm

import (
	"bytes"
	"fmt"
	"io"
	"math"
	"math/rand"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// randomLog builds a seeded sequence of n command entries that exercises
// every handler's success and failure paths, request-id retries, expiry and
// pruning (including leader time jumping forward and stepping back). It
// keeps a shadow State (as a leader has its own FSM) to propose plausible
// lifecycle commands: the next version, due rotations and destructions the
// way the scheduler does, and duplicated scheduler proposals; and grants
// (mostly on live keys, some on destroyed or unknown ones), revocations of
// existing grants, and deny/allow, including the issuer denying itself.
func randomLog(t testing.TB, seed int64, n int) []*raft.Log {
	t.Helper()
	rng := rand.New(rand.NewSource(seed))
	extra := rand.New(rand.NewSource(seed + 1000))
	pick := func(prefix string, k int) string { return fmt.Sprintf("%s%d", prefix, rng.Intn(k)) }
	pickKey := func() string {
		if rng.Intn(15) == 0 {
			return keyID(100 + rng.Intn(100)) // most likely unknown
		}
		return keyID(rng.Intn(50))
	}
	pickAlias := func() string {
		if rng.Intn(20) == 0 {
			return "k-bad"
		}
		return pick("alias-", 30)
	}
	var shadow *State
	material := func() *fsmpb.WrappedBlob {
		// Mostly under the current KEK version; sometimes the next (not
		// usable yet) or a draining one.
		cur := max(shadow.cluster.GetCurrentKekVersion(), 1)
		b := &fsmpb.WrappedBlob{KekVersion: cur, Blob: []byte(fmt.Sprintf("wrapped-material-%d", rng.Int63()))}
		switch rng.Intn(15) {
		case 0:
			b.KekVersion = cur + 1
		case 1:
			b.KekVersion = cur - 1
		}
		return b
	}
	pubKey := func(spec fsmpb.KeySpec) []byte {
		if rng.Intn(12) == 0 {
			return []byte("wrong-or-missing")[:rng.Intn(2)*5]
		}
		return publicKeyFor(spec)
	}
	period := func() int64 {
		switch rng.Intn(6) {
		case 0, 1, 2:
			return 0
		case 3:
			return -1
		default:
			return 60 + rng.Int63n(3*3600)
		}
	}
	shadow = NewState()
	// existingKey mostly picks a key the shadow state holds.
	existingKey := func() string {
		keys := shadow.listKeys("", 0)
		if len(keys) == 0 || rng.Intn(6) == 0 {
			return pickKey()
		}
		return keys[rng.Intn(len(keys))].GetKeyId()
	}
	existingAlias := func() string {
		var aliases []string
		for _, rec := range shadow.listKeys("", 0) {
			if rec.GetAlias() != "" {
				aliases = append(aliases, rec.GetAlias())
			}
		}
		if len(aliases) == 0 || rng.Intn(4) == 0 {
			return pickAlias()
		}
		return aliases[rng.Intn(len(aliases))]
	}
	pickGrant := func() string { return grantID(rng.Intn(80)) }
	// liveKey mostly picks a key that is not destroyed (grants need one).
	liveKey := func() string {
		var live []string
		for _, rec := range shadow.listKeys("", 0) {
			if rec.GetState() != stDestroyed {
				live = append(live, rec.GetKeyId())
			}
		}
		switch {
		case rng.Intn(10) == 0:
			return keyID(100 + rng.Intn(100)) // most likely unknown
		case len(live) == 0 || rng.Intn(10) == 0:
			return existingKey()
		}
		return live[rng.Intn(len(live))]
	}
	var lastScheduled *fsmpb.Command // a scheduler proposal, sometimes proposed again
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
		ignorable, scheduled := false, false
		switch r := rng.Intn(132); {
		case i == 0 || r < 2:
			typ, payload = typInit, initPayload()
		case r < 22:
			p := createKeyPayload(pickKey())
			p.Spec = fsmpb.KeySpec(1 + rng.Intn(9))
			if rule := keySpecRules[p.Spec]; rule.def == 0 || rng.Intn(2) == 0 {
				p.Usage = rule.allowed[rng.Intn(len(rule.allowed))]
			}
			if rng.Intn(10) == 0 {
				p.Spec, p.Usage = fsmpb.KeySpec(rng.Intn(11)), fsmpb.KeyUsage(rng.Intn(4))
			}
			p.PublicKeyDer = pubKey(p.Spec)
			if !keySpecRules[p.Spec].asymmetric || rng.Intn(10) == 0 {
				p.RotationPeriodSeconds = period()
			}
			if rng.Intn(3) == 0 {
				p.Alias = pickAlias()
			}
			if rng.Intn(4) == 0 {
				p.Tags = map[string]string{pick("t", 5): pick("v", 5), pick("t", 5): "x", "": ""}
				if rng.Intn(2) == 0 {
					delete(p.Tags, "")
				}
			}
			p.Material = material()
			typ, payload = typCreate, p
		case r < 28:
			typ, payload = typToken, joinTokenPayload(pick("tok", 8), now+rng.Int63n(int64(4*time.Hour))-int64(time.Hour))
		case r < 34:
			p := admitPayload(pick("tok", 8), pick("n", 12))
			var unused []string
			for _, tok := range shadow.sortedTokens() {
				if tok.GetUsedByNode() == "" && tok.GetExpiresUnixNano() > now {
					unused = append(unused, tok.GetTokenId())
				}
			}
			if len(unused) > 0 && rng.Intn(2) == 0 {
				p.TokenId = unused[rng.Intn(len(unused))]
			}
			if rng.Intn(5) == 0 {
				p.SecretHash = []byte("wrong")
			}
			if rng.Intn(5) == 0 {
				p.Node.RaftAddr = pick("n", 12) + ".raft:7000"
			}
			typ, payload = typAdmit, p
		case r < 38:
			typ, payload = typRemove, &fsmpb.RemoveNode{NodeId: pick("n", 12)}
		case r < 40:
			typ, payload = typNoop, &fsmpb.Noop{}
		case r < 42:
			typ, ignorable = 77, true
		case r < 48:
			id := existingKey()
			rec := shadow.keys[id]
			v := highestVersion(rec) + 1
			if rng.Intn(8) == 0 {
				v = uint32(rng.Intn(4))
			}
			typ, payload = typRotate, &fsmpb.RotateKey{KeyId: id, Version: v, Material: material(),
				PublicKeyDer: pubKey(rec.GetSpec()), Automatic: rng.Intn(3) == 0}
		case r < 54: // the leader's scheduler
			scheduled = true
			if lastScheduled != nil && rng.Intn(3) == 0 {
				typ = lastScheduled.GetType() // a duplicate proposal
				payload = mustDecodePayload(t, lastScheduled)
			} else if due := shadow.dueRotations(now, 1); len(due) > 0 && rng.Intn(2) == 0 {
				rec := due[0]
				typ, payload = typRotate, &fsmpb.RotateKey{KeyId: rec.GetKeyId(), Version: highestVersion(rec) + 1,
					Material: material(), PublicKeyDer: publicKeyFor(rec.GetSpec()), Automatic: true}
			} else if due := shadow.dueDestructions(now, 1); len(due) > 0 {
				typ, payload = typDestroy, &fsmpb.DestroyKey{KeyId: due[0].GetKeyId()}
			} else {
				typ, payload = typDestroy, &fsmpb.DestroyKey{KeyId: pickKey()}
			}
		case r < 58:
			p := &fsmpb.UpdateKey{KeyId: existingKey(), SetDescription: rng.Intn(2) == 0, ReplaceTags: rng.Intn(2) == 0}
			if p.SetDescription || rng.Intn(10) == 0 {
				p.Description = pick("d", 5)
			}
			if p.ReplaceTags {
				p.Tags = map[string]string{pick("t", 5): pick("v", 5)}
			}
			typ, payload = typUpdate, p
		case r < 62:
			typ, payload = typSetAlias, &fsmpb.SetAlias{KeyId: existingKey(), Alias: pickAlias()}
		case r < 64:
			typ, payload = typDeleteAlias, &fsmpb.DeleteAlias{Alias: existingAlias()}
		case r < 69:
			typ, payload = typEnabled, &fsmpb.SetKeyEnabled{KeyId: existingKey(), Enabled: rng.Intn(2) == 0}
		case r < 72:
			typ, payload = typRevoke, &fsmpb.RevokeKey{KeyId: existingKey(), Reason: fsmpb.RevocationReason(rng.Intn(5)), Comment: pick("c", 3)}
		case r < 75:
			id := existingKey()
			p := &fsmpb.SetVersionState{KeyId: id, Version: 1 + uint32(rng.Intn(int(highestVersion(shadow.keys[id])+1))),
				State: verEnabled + fsmpb.KeyVersionState(rng.Intn(2))}
			if rng.Intn(6) == 0 {
				p.Version, p.State = uint32(rng.Intn(4)), fsmpb.KeyVersionState(rng.Intn(5))
			}
			typ, payload = typVerState, p
		case r < 77:
			typ, payload = typMinVersion, &fsmpb.SetMinDecryptionVersion{KeyId: existingKey(), Version: uint32(rng.Intn(4))}
		case r < 80:
			typ, payload = typPolicy, &fsmpb.SetRotationPolicy{KeyId: existingKey(), PeriodSeconds: period()}
		case r < 85:
			typ, payload = typSchedule, &fsmpb.ScheduleDestruction{KeyId: existingKey(), PendingWindowSeconds: rng.Int63n(4*3600) - 60}
		case r < 88:
			id := existingKey()
			if pending := shadow.dueDestructions(math.MaxInt64, 0); len(pending) > 0 && rng.Intn(2) == 0 {
				id = pending[rng.Intn(len(pending))].GetKeyId()
			}
			typ, payload = typCancel, &fsmpb.CancelDestruction{KeyId: id}
		case r < 93:
			p := importTokenPayload(fmt.Sprintf("it-tok%05d", rng.Intn(40)), now+rng.Int63n(int64(4*time.Hour))-int64(time.Hour))
			p.Spec = fsmpb.KeySpec(1 + rng.Intn(3))
			typ, payload = typImportToken, p
		case r < 100:
			p := &fsmpb.ImportKey{TokenId: fmt.Sprintf("it-tok%05d", rng.Intn(40)), Key: createKeyPayload(pickKey())}
			p.Key.Spec = fsmpb.KeySpec(1 + rng.Intn(3))
			var usable []*fsmpb.ImportToken
			shadow.importTokens.Ascend(func(tok *fsmpb.ImportToken) bool {
				if tok.GetPrivateKey() != nil && tok.GetExpiresUnixNano() > now {
					usable = append(usable, tok)
				}
				return true
			})
			if len(usable) > 0 && rng.Intn(3) != 0 {
				tok := usable[rng.Intn(len(usable))]
				p.TokenId = tok.GetTokenId()
				if rng.Intn(6) != 0 {
					p.Key.Spec = tok.GetSpec()
				}
			}
			p.Key.Material = material()
			if rng.Intn(3) == 0 {
				p.Key.Alias = pickAlias()
			}
			typ, payload = typImport, p
		case r < 106:
			p := grantPayload(pickGrant(), liveKey(), pick("user", 5))
			if ids := shadow.listGrants("", ""); len(ids) > 0 && rng.Intn(8) == 0 {
				p.Grant.GrantId = ids[rng.Intn(len(ids))].GetGrantId() // in use
			}
			if rng.Intn(8) == 0 { // a destroyed key, if any
				for _, rec := range shadow.listKeys("", 0) {
					if rec.GetState() == stDestroyed {
						p.Grant.KeyId = rec.GetKeyId()
						break
					}
				}
			}
			p.Grant.Operations = nil
			for range 1 + rng.Intn(3) {
				p.Grant.Operations = append(p.Grant.Operations, fsmpb.GrantOperation(1+rng.Intn(9)))
			}
			slices.Sort(p.Grant.Operations)
			p.Grant.Operations = slices.Compact(p.Grant.Operations)
			switch rng.Intn(12) {
			case 0:
				p.Grant.Operations = append(p.Grant.Operations, fsmpb.GrantOperation(rng.Intn(2)*10)) // UNSPECIFIED or unknown
			case 1:
				p.Grant.Operations = append(p.Grant.Operations, p.Grant.Operations[0]) // duplicate
			case 2:
				p.Grant.Principal = "bad principal"
			case 3:
				p.Grant.GrantId = "g-bad"
			}
			if rng.Intn(3) == 0 {
				p.Grant.EncryptionContextEquals = map[string]string{pick("ctx", 4): pick("v", 4), pick("ctx", 4): "x"}
			}
			typ, payload = typCreateGrant, p
		case r < 109:
			id := pickGrant()
			if ids := shadow.listGrants("", ""); len(ids) > 0 && rng.Intn(3) != 0 {
				id = ids[rng.Intn(len(ids))].GetGrantId()
			}
			typ, payload = typRevokeGrant, &fsmpb.RevokeGrant{GrantId: id}
		case r < 112:
			p := &fsmpb.DenyPrincipal{Principal: pick("user", 5), Reason: pick("reason-", 3)}
			switch rng.Intn(12) {
			case 0:
				p.Principal = "bad principal"
			case 1:
				p.Reason = strings.Repeat("r", maxDenyReasonLen+1)
			}
			typ, payload = typDeny, p
		case r >= 114:
			typ, payload = randomKEKCommand(rng, shadow)
		default:
			who := pick("user", 5)
			if denied := shadow.listDenied(); len(denied) > 0 && rng.Intn(2) == 0 {
				who = denied[rng.Intn(len(denied))].GetPrincipal()
			}
			typ, payload = typAllow, &fsmpb.AllowPrincipal{Principal: who}
		}
		// Command principals are "<role>:<name>"; a deny of the issuer's
		// own name is refused.
		cmd, err := NewCommand(typ, payload, "", "admin:"+pick("user", 3))
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
		if scheduled {
			lastScheduled = cmd
		}
		shadow.Apply(uint64(len(logs)+1), cmd)
		logs = append(logs, logOf(t, uint64(len(logs)+1), cmd))
		// Now and then an extra SET_GOSSIP_KEY or SET_NODE_FEATURE_LEVEL,
		// drawn from a second generator so the main sequence (and the
		// outcomes it is checked to produce) stays as it was.
		if extra.Intn(25) == 0 {
			typ, payload := randomGossipOrLevelCommand(extra, shadow)
			cmd, err := NewCommand(typ, payload, "", "admin:extra")
			if err != nil {
				t.Fatal(err)
			}
			cmd.LeaderTimeUnixNano = now
			shadow.Apply(uint64(len(logs)+1), cmd)
			logs = append(logs, logOf(t, uint64(len(logs)+1), cmd))
		}
	}
	return logs
}

// randomGossipOrLevelCommand: SET_GOSSIP_KEY (mostly replacing the current
// generation, sometimes a stale or unconditional one, sometimes under a KEK
// version that cannot take it) or SET_NODE_FEATURE_LEVEL (sometimes for a
// non-member).
func randomGossipOrLevelCommand(rng *rand.Rand, s *State) (fsmpb.CommandType, proto.Message) {
	if rng.Intn(2) == 0 {
		id := fmt.Sprintf("n%d", rng.Intn(12))
		if nodes := s.sortedNodes(); len(nodes) > 0 && rng.Intn(4) != 0 {
			id = nodes[rng.Intn(len(nodes))].GetNodeId()
		}
		return fsmpb.CommandType_COMMAND_TYPE_SET_NODE_FEATURE_LEVEL, &fsmpb.SetNodeFeatureLevel{NodeId: id, Level: uint32(rng.Intn(4))}
	}
	kek := s.cluster.GetCurrentKekVersion()
	if rng.Intn(4) == 0 {
		kek = uint32(rng.Intn(int(kek) + 2))
	}
	replaces := GossipKeyGeneration(s.cluster)
	if rng.Intn(3) == 0 {
		replaces = uint32(rng.Intn(4))
	}
	return fsmpb.CommandType_COMMAND_TYPE_SET_GOSSIP_KEY, &fsmpb.SetGossipKey{
		GossipKey: &fsmpb.WrappedBlob{KekVersion: kek, Blob: []byte(fmt.Sprintf("gossip-%d", rng.Intn(1000)))}, ReplacesGeneration: replaces}
}

func mustDecodePayload(t testing.TB, cmd *fsmpb.Command) proto.Message {
	t.Helper()
	p := handlers[cmd.GetType()].newPayload()
	if err := proto.Unmarshal(cmd.GetPayload(), p); err != nil {
		// A malformed duplicate: propose an empty payload instead.
		return p
	}
	return p
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
			logs := randomLog(t, seed, 1200)

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
			applyAll(c, logs[:400])
			d := New(Config{})
			if err := d.Restore(io.NopCloser(bytes.NewReader(snapshotBytes(t, c)))); err != nil {
				t.Fatal(err)
			}
			applyAll(d, logs[400:])
			if !bytes.Equal(snapA, snapshotBytes(t, d)) {
				t.Fatalf("restore-then-replay diverged from a full replay")
			}
			// The rebuilt secondary indexes answer the scheduler's queries alike.
			for _, now := range []int64{t0, t0 + int64(24*time.Hour), t0 + int64(1000*time.Hour)} {
				same := func(x, y *fsmpb.KeyRecord) bool { return proto.Equal(x, y) }
				if !slices.EqualFunc(a.DueRotations(now, 0), d.DueRotations(now, 0), same) ||
					!slices.EqualFunc(a.DueDestructions(now, 0), d.DueDestructions(now, 0), same) {
					t.Fatalf("due queries differ after restore-then-replay")
				}
			}
			// So do the rebuilt grant and deny-list indexes.
			sameGrants := func(x, y []*fsmpb.Grant) bool {
				return slices.EqualFunc(x, y, func(g, h *fsmpb.Grant) bool { return proto.Equal(g, h) })
			}
			all := a.Grants("", "")
			if !sameGrants(all, d.Grants("", "")) {
				t.Fatalf("grants differ after restore-then-replay")
			}
			for _, g := range all {
				if !sameGrants(a.GrantsFor(g.GetKeyId(), g.GetPrincipal()), d.GrantsFor(g.GetKeyId(), g.GetPrincipal())) ||
					!sameGrants(a.Grants(g.GetKeyId(), ""), d.Grants(g.GetKeyId(), "")) ||
					!sameGrants(a.Grants("", g.GetPrincipal()), d.Grants("", g.GetPrincipal())) {
					t.Fatalf("grant queries for %s differ after restore-then-replay", g.GetGrantId())
				}
			}
			for i := range 5 {
				who := fmt.Sprint("user", i)
				x, xok := a.Denied(who)
				y, yok := d.Denied(who)
				if xok != yok || !proto.Equal(x, y) {
					t.Fatalf("Denied(%s) differs after restore-then-replay", who)
				}
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
				if strings.Contains(res.GetMessage(), "grant(s) on it removed") {
					counts["DESTROY_KEY with grants"]++
				}
			}
			for _, want := range []string{"CREATE_KEY/RESULT_CODE_OK", "CREATE_KEY/RESULT_CODE_INVALID_ARGUMENT",
				"CREATE_KEY/RESULT_CODE_ALREADY_EXISTS", "ADMIT_NODE/RESULT_CODE_OK", "ADMIT_NODE/RESULT_CODE_PERMISSION_DENIED",
				"REMOVE_NODE/RESULT_CODE_OK", "CREATE_JOIN_TOKEN/RESULT_CODE_OK",
				"ROTATE_KEY/RESULT_CODE_OK", "ROTATE_KEY/RESULT_CODE_FAILED_PRECONDITION", "ROTATE_KEY/RESULT_CODE_NOT_FOUND",
				"UPDATE_KEY/RESULT_CODE_OK", "SET_ALIAS/RESULT_CODE_OK", "DELETE_ALIAS/RESULT_CODE_OK",
				"SET_KEY_ENABLED/RESULT_CODE_OK", "SET_KEY_ENABLED/RESULT_CODE_FAILED_PRECONDITION", "REVOKE_KEY/RESULT_CODE_OK",
				"SET_VERSION_STATE/RESULT_CODE_OK", "SET_MIN_DECRYPTION_VERSION/RESULT_CODE_OK", "SET_ROTATION_POLICY/RESULT_CODE_OK",
				"SCHEDULE_DESTRUCTION/RESULT_CODE_OK", "CANCEL_DESTRUCTION/RESULT_CODE_OK",
				"DESTROY_KEY/RESULT_CODE_OK", "DESTROY_KEY/RESULT_CODE_FAILED_PRECONDITION",
				"CREATE_IMPORT_TOKEN/RESULT_CODE_OK", "IMPORT_KEY/RESULT_CODE_OK", "IMPORT_KEY/RESULT_CODE_PERMISSION_DENIED",
				"CREATE_GRANT/RESULT_CODE_OK", "CREATE_GRANT/RESULT_CODE_INVALID_ARGUMENT", "CREATE_GRANT/RESULT_CODE_ALREADY_EXISTS",
				"CREATE_GRANT/RESULT_CODE_NOT_FOUND", "CREATE_GRANT/RESULT_CODE_FAILED_PRECONDITION",
				"REVOKE_GRANT/RESULT_CODE_OK", "REVOKE_GRANT/RESULT_CODE_NOT_FOUND",
				"DENY_PRINCIPAL/RESULT_CODE_OK", "DENY_PRINCIPAL/RESULT_CODE_FAILED_PRECONDITION", "DENY_PRINCIPAL/RESULT_CODE_INVALID_ARGUMENT",
				"ALLOW_PRINCIPAL/RESULT_CODE_OK", "ALLOW_PRINCIPAL/RESULT_CODE_NOT_FOUND", "DESTROY_KEY with grants",
				"BEGIN_KEK_ROTATION/RESULT_CODE_OK", "BEGIN_KEK_ROTATION/RESULT_CODE_FAILED_PRECONDITION", "DELIVER_KEK/RESULT_CODE_OK",
				"KEK_INSTALLED/RESULT_CODE_OK", "KEK_INSTALLED/RESULT_CODE_FAILED_PRECONDITION", "ACTIVATE_KEK/RESULT_CODE_OK",
				"ACTIVATE_KEK/RESULT_CODE_FAILED_PRECONDITION", "REWRAP_MATERIAL/RESULT_CODE_OK", "RETIRE_KEK/RESULT_CODE_OK",
				"RETIRE_KEK/RESULT_CODE_FAILED_PRECONDITION", "KEK_REMOVED/RESULT_CODE_OK", "ABANDON_KEK_ROTATION/RESULT_CODE_OK",
				"SET_NODE_FEATURE_LEVEL/RESULT_CODE_OK", "SET_NODE_FEATURE_LEVEL/RESULT_CODE_NOT_FOUND",
				"SET_GOSSIP_KEY/RESULT_CODE_OK", "SET_GOSSIP_KEY/RESULT_CODE_FAILED_PRECONDITION"} {
				if counts[want] == 0 {
					t.Errorf("the random log never produced %s", want)
				}
				if testing.Verbose() {
					t.Logf("%s: %d", want, counts[want])
				}
			}
			if t.Failed() {
				t.Logf("counts: %v", counts)
			}
			if a.Halted() != nil {
				t.Fatalf("halted: %v", a.Halted())
			}
		})
	}
}

// randomKEKCommand proposes a plausible KEK-rotation step for the shadow
// state (mostly the one that would advance it; sometimes a stale or wrong one).
func randomKEKCommand(rng *rand.Rand, s *State) (fsmpb.CommandType, proto.Message) {
	var ids []string
	for _, n := range s.sortedNodes() {
		ids = append(ids, n.GetNodeId())
	}
	member := func() string {
		if len(ids) == 0 || rng.Intn(10) == 0 {
			return fmt.Sprintf("n%d", rng.Intn(12))
		}
		return ids[rng.Intn(len(ids))]
	}
	kcv := func(v uint32) []byte { return []byte{byte(v), 7} }
	var maxV uint32
	for _, k := range s.cluster.GetKekVersions() {
		maxV = max(maxV, k.GetVersion())
	}
	pending, draining, retired := s.kekInState(kekPending), s.kekInState(kekDraining), s.kekInState(kekRetired)
	switch {
	case (pending == nil && draining == nil && rng.Intn(2) == 0) || rng.Intn(15) == 0:
		gen := member()
		k := &fsmpb.KEKVersion{Version: maxV + 1, CheckValue: kcv(maxV + 1), GeneratedBy: gen}
		if rng.Intn(10) == 0 {
			k.Version++
		}
		for _, id := range ids {
			if id != gen && rng.Intn(2) != 0 {
				k.Deliveries = append(k.Deliveries, &fsmpb.KEKDelivery{NodeId: id, Wrapped: []byte("wrapped-kek-" + id)})
			}
		}
		return fsmpb.CommandType_COMMAND_TYPE_BEGIN_KEK_ROTATION, &fsmpb.BeginKEKRotation{Kek: k}
	case pending != nil:
		v := pending.GetVersion()
		switch rng.Intn(5) {
		case 0:
			id := member()
			for _, m := range ids {
				has := slices.Contains(pending.GetInstalledOn(), m) ||
					slices.ContainsFunc(pending.GetDeliveries(), func(d *fsmpb.KEKDelivery) bool { return d.GetNodeId() == m })
				if !has && rng.Intn(4) != 0 {
					id = m
				}
			}
			return fsmpb.CommandType_COMMAND_TYPE_DELIVER_KEK, &fsmpb.DeliverKEK{Version: v,
				Deliveries: []*fsmpb.KEKDelivery{{NodeId: id, Wrapped: []byte("wrapped-kek-" + id)}}}
		case 1, 2, 3:
			id := member()
			for _, m := range ids {
				if !slices.Contains(pending.GetInstalledOn(), m) && rng.Intn(2) == 0 {
					id = m
				}
			}
			cv := kcv(v)
			if rng.Intn(8) == 0 {
				cv = kcv(v + 1)
			}
			return fsmpb.CommandType_COMMAND_TYPE_KEK_INSTALLED, &fsmpb.KEKInstalled{Version: v, NodeId: id, CheckValue: cv}
		default:
			if rng.Intn(6) == 0 {
				return fsmpb.CommandType_COMMAND_TYPE_ABANDON_KEK_ROTATION, &fsmpb.AbandonKEKRotation{Version: v, Reason: "test"}
			}
			return fsmpb.CommandType_COMMAND_TYPE_ACTIVATE_KEK, &fsmpb.ActivateKEK{Version: v}
		}
	case draining != nil:
		old, cur := draining.GetVersion(), s.cluster.GetCurrentKekVersion()
		if rng.Intn(3) == 0 {
			return fsmpb.CommandType_COMMAND_TYPE_RETIRE_KEK, &fsmpb.RetireKEK{Version: old}
		}
		p := &fsmpb.RewrapMaterial{}
		if s.cluster.GetCaKey().GetKekVersion() == old || rng.Intn(4) == 0 {
			p.CaKey, p.CaKeyFrom = &fsmpb.WrappedBlob{KekVersion: cur, Blob: []byte("wrapped-ca")}, old
		}
		for _, rec := range s.listKeys("", 0) {
			for _, kv := range rec.GetVersions() {
				if kv.GetMaterial().GetKekVersion() == old && kv.GetMaterial() != nil && rng.Intn(2) == 0 {
					from := old
					if rng.Intn(10) == 0 {
						from = cur // stale: skipped
					}
					p.Keys = append(p.Keys, &fsmpb.RewrappedKeyVersion{KeyId: rec.GetKeyId(), Version: kv.GetVersion(), FromKekVersion: from,
						Material: &fsmpb.WrappedBlob{KekVersion: cur, Blob: []byte("wrapped-again")}})
				}
			}
		}
		s.importSealed.Ascend(func(tok *fsmpb.ImportToken) bool {
			if tok.GetPrivateKey().GetKekVersion() == old {
				p.ImportTokens = append(p.ImportTokens, &fsmpb.RewrappedImportToken{TokenId: tok.GetTokenId(), FromKekVersion: old,
					PrivateKey: &fsmpb.WrappedBlob{KekVersion: cur, Blob: []byte("wrapped-again")}})
			}
			return true
		})
		return fsmpb.CommandType_COMMAND_TYPE_REWRAP_MATERIAL, p
	case retired != nil && rng.Intn(4) != 0:
		return fsmpb.CommandType_COMMAND_TYPE_KEK_REMOVED, &fsmpb.KEKRemoved{Version: retired.GetVersion(), NodeId: member()}
	default: // out of turn: refused
		v := uint32(rng.Intn(int(maxV) + 2))
		switch rng.Intn(3) {
		case 0:
			return fsmpb.CommandType_COMMAND_TYPE_ACTIVATE_KEK, &fsmpb.ActivateKEK{Version: v}
		case 1:
			return fsmpb.CommandType_COMMAND_TYPE_RETIRE_KEK, &fsmpb.RetireKEK{Version: v}
		default:
			return fsmpb.CommandType_COMMAND_TYPE_KEK_INSTALLED, &fsmpb.KEKInstalled{Version: v, NodeId: member(), CheckValue: kcv(v)}
		}
	}
}
