package fsm

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/google/btree"
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// StateFormat is the fsmpb.State format this package writes and reads.
const StateFormat = 1

const (
	// RequestRecordTTL is how long a request id's first outcome is kept for
	// retries, measured in leader time.
	RequestRecordTTL = 24 * time.Hour
	// JoinTokenGrace is how long an expired join token is kept (so an
	// operator can still see why a join failed) before it is pruned.
	JoinTokenGrace = 24 * time.Hour
	// ImportTokenGrace is the same for import tokens. An import token's
	// sealed private key is dropped as soon as the token expires or is used.
	ImportTokenGrace = 24 * time.Hour

	btreeDegree = 32
)

// ErrUnsupportedCommand is wrapped by State.Halted when the state met a
// command it does not understand and may not skip.
var ErrUnsupportedCommand = errors.New("unsupported command")

// State is the replicated state in indexed, in-memory form, and the command
// processor that advances it. It has no locks, no clock, no I/O and no
// randomness: Apply is a pure function of the state and the command, so a
// Raft log can be replayed into a State without a running node.
//
// Stored records (*fsmpb.KeyRecord, *fsmpb.NodeRecord, *fsmpb.JoinToken,
// *fsmpb.ImportToken, *fsmpb.Grant, *fsmpb.DeniedPrincipal,
// *fsmpb.ClusterInfo, *fsmpb.RequestRecord and the Results inside them) are
// immutable once stored: Apply clones, modifies and replaces. That is what
// lets FSM hand out stored pointers to readers and capture a snapshot
// without copying records.
//
// A State is not safe for concurrent use; FSM adds the locking.
type State struct {
	cluster *fsmpb.ClusterInfo

	keys     map[string]*fsmpb.KeyRecord         // by key id
	keyOrder *btree.BTreeG[*fsmpb.KeyRecord]     // the same records, by key id
	aliases  map[string]string                   // alias -> key id
	nodes    map[string]*fsmpb.NodeRecord        // by node id
	tokens   map[string]*fsmpb.JoinToken         // by token id
	requests *btree.BTreeG[*fsmpb.RequestRecord] // by request id
	reqByAge *btree.BTreeG[*fsmpb.RequestRecord] // by (time, request id), for pruning

	// Secondary key indexes (not snapshotted; putKey maintains them):
	// ACTIVE keys with a rotation period by (next rotation, id), and
	// PENDING_DESTRUCTION keys by (destroy after, id).
	rotations    *btree.BTreeG[*fsmpb.KeyRecord]
	destructions *btree.BTreeG[*fsmpb.KeyRecord]

	importTokens   *btree.BTreeG[*fsmpb.ImportToken] // by token id
	importByExpiry *btree.BTreeG[*fsmpb.ImportToken] // all, by (expiry, id), for pruning
	importSealed   *btree.BTreeG[*fsmpb.ImportToken] // those still holding a private key, by (expiry, id)

	// Grants (authz.go): the records by id in a map and a B-tree, by (key
	// id, grant id) and (principal, grant id), and by (key id, principal)
	// as copy-on-write slices sorted by grant id (the per-request lookup).
	grants            map[string]*fsmpb.Grant
	grantOrder        *btree.BTreeG[*fsmpb.Grant]
	grantsByKey       *btree.BTreeG[*fsmpb.Grant]
	grantsByPrincipal *btree.BTreeG[*fsmpb.Grant]
	grantsFor         map[grantKey][]*fsmpb.Grant

	// The deny list by principal (map for lookups, B-tree for order).
	denied      map[string]*fsmpb.DeniedPrincipal
	deniedOrder *btree.BTreeG[*fsmpb.DeniedPrincipal]

	// kekRefs counts key-version materials per KEK version (putKey keeps
	// it; not snapshotted). KEK rotation reads it for progress and to know
	// when a draining version is unused.
	kekRefs map[uint32]int

	lastAppliedTime int64
	appliedIndex    uint64

	// halt is set when a command could not be applied and could not be
	// skipped; from then on Apply refuses everything (see Apply).
	halt error
}

// NewState returns an empty, uninitialised state.
func NewState() *State {
	return &State{
		keys:     make(map[string]*fsmpb.KeyRecord),
		keyOrder: btree.NewG(btreeDegree, keyLess),
		aliases:  make(map[string]string),
		nodes:    make(map[string]*fsmpb.NodeRecord),
		tokens:   make(map[string]*fsmpb.JoinToken),
		requests: btree.NewG(btreeDegree, requestLess),
		reqByAge: btree.NewG(btreeDegree, requestAgeLess),

		rotations:    btree.NewG(btreeDegree, rotationLess),
		destructions: btree.NewG(btreeDegree, destructionLess),

		importTokens:   btree.NewG(btreeDegree, importTokenLess),
		importByExpiry: btree.NewG(btreeDegree, importExpiryLess),
		importSealed:   btree.NewG(btreeDegree, importExpiryLess),

		grants:            make(map[string]*fsmpb.Grant),
		grantOrder:        btree.NewG(btreeDegree, grantLess),
		grantsByKey:       btree.NewG(btreeDegree, grantByKeyLess),
		grantsByPrincipal: btree.NewG(btreeDegree, grantByPrincipalLess),
		grantsFor:         make(map[grantKey][]*fsmpb.Grant),

		denied:      make(map[string]*fsmpb.DeniedPrincipal),
		deniedOrder: btree.NewG(btreeDegree, deniedLess),

		kekRefs: make(map[uint32]int),
	}
}

func rotationLess(a, b *fsmpb.KeyRecord) bool {
	if a.GetNextRotationUnixNano() != b.GetNextRotationUnixNano() {
		return a.GetNextRotationUnixNano() < b.GetNextRotationUnixNano()
	}
	return a.GetKeyId() < b.GetKeyId()
}

func destructionLess(a, b *fsmpb.KeyRecord) bool {
	if a.GetDestroyAfterUnixNano() != b.GetDestroyAfterUnixNano() {
		return a.GetDestroyAfterUnixNano() < b.GetDestroyAfterUnixNano()
	}
	return a.GetKeyId() < b.GetKeyId()
}

func importTokenLess(a, b *fsmpb.ImportToken) bool { return a.GetTokenId() < b.GetTokenId() }

func importExpiryLess(a, b *fsmpb.ImportToken) bool {
	if a.GetExpiresUnixNano() != b.GetExpiresUnixNano() {
		return a.GetExpiresUnixNano() < b.GetExpiresUnixNano()
	}
	return a.GetTokenId() < b.GetTokenId()
}

func keyLess(a, b *fsmpb.KeyRecord) bool { return a.GetKeyId() < b.GetKeyId() }

func requestLess(a, b *fsmpb.RequestRecord) bool { return a.GetRequestId() < b.GetRequestId() }

func requestAgeLess(a, b *fsmpb.RequestRecord) bool {
	if a.GetTimeUnixNano() != b.GetTimeUnixNano() {
		return a.GetTimeUnixNano() < b.GetTimeUnixNano()
	}
	return a.GetRequestId() < b.GetRequestId()
}

// AppliedIndex is the Raft index of the last command this state processed.
// It is not part of fsmpb.State, so a State built by StateFromProto starts
// at 0 until its next Apply.
func (s *State) AppliedIndex() uint64 { return s.appliedIndex }

// Halted returns nil, or an error wrapping ErrUnsupportedCommand once the
// state met a command that it does not know and may not skip. A halted state
// refuses every later command: this binary is too old for the log and the
// node must be upgraded (then it replays the log and catches up).
func (s *State) Halted() error { return s.halt }

// cmdContext is what every handler may know about the envelope.
type cmdContext struct {
	time      int64 // leader time, unix nanoseconds
	principal string
	requestID string
}

// handler is one row of the dispatch table: how to decode the payload of a
// command type and how to apply it.
type handler struct {
	newPayload func() proto.Message
	apply      func(s *State, c *cmdContext, payload proto.Message) *fsmpb.Result
}

// register builds a table row from a typed apply function, so each handler
// receives its own payload type and the table stays the only place that
// knows which type goes with which command.
func register[T proto.Message](newPayload func() T, apply func(*State, *cmdContext, T) *fsmpb.Result) handler {
	return handler{
		newPayload: func() proto.Message { return newPayload() },
		apply: func(s *State, c *cmdContext, p proto.Message) *fsmpb.Result {
			return apply(s, c, p.(T))
		},
	}
}

// handlers is the dispatch table: one row per command type. To add a command
// type, add it to fsm.proto, write an apply function in handlers.go and add
// a row here (see DESIGN.md). The table is never modified after init.
var handlers = map[fsmpb.CommandType]handler{
	fsmpb.CommandType_COMMAND_TYPE_INIT_CLUSTER: register(
		func() *fsmpb.InitCluster { return &fsmpb.InitCluster{} }, (*State).applyInitCluster),
	fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY: register(
		func() *fsmpb.CreateKey { return &fsmpb.CreateKey{} }, (*State).applyCreateKey),
	fsmpb.CommandType_COMMAND_TYPE_CREATE_JOIN_TOKEN: register(
		func() *fsmpb.CreateJoinToken { return &fsmpb.CreateJoinToken{} }, (*State).applyCreateJoinToken),
	fsmpb.CommandType_COMMAND_TYPE_ADMIT_NODE: register(
		func() *fsmpb.AdmitNode { return &fsmpb.AdmitNode{} }, (*State).applyAdmitNode),
	fsmpb.CommandType_COMMAND_TYPE_REMOVE_NODE: register(
		func() *fsmpb.RemoveNode { return &fsmpb.RemoveNode{} }, (*State).applyRemoveNode),
	fsmpb.CommandType_COMMAND_TYPE_NOOP: register(
		func() *fsmpb.Noop { return &fsmpb.Noop{} }, (*State).applyNoop),
	// Key lifecycle (lifecycle.go).
	fsmpb.CommandType_COMMAND_TYPE_ROTATE_KEY: register(
		func() *fsmpb.RotateKey { return &fsmpb.RotateKey{} }, (*State).applyRotateKey),
	fsmpb.CommandType_COMMAND_TYPE_UPDATE_KEY: register(
		func() *fsmpb.UpdateKey { return &fsmpb.UpdateKey{} }, (*State).applyUpdateKey),
	fsmpb.CommandType_COMMAND_TYPE_SET_ALIAS: register(
		func() *fsmpb.SetAlias { return &fsmpb.SetAlias{} }, (*State).applySetAlias),
	fsmpb.CommandType_COMMAND_TYPE_DELETE_ALIAS: register(
		func() *fsmpb.DeleteAlias { return &fsmpb.DeleteAlias{} }, (*State).applyDeleteAlias),
	fsmpb.CommandType_COMMAND_TYPE_SET_KEY_ENABLED: register(
		func() *fsmpb.SetKeyEnabled { return &fsmpb.SetKeyEnabled{} }, (*State).applySetKeyEnabled),
	fsmpb.CommandType_COMMAND_TYPE_REVOKE_KEY: register(
		func() *fsmpb.RevokeKey { return &fsmpb.RevokeKey{} }, (*State).applyRevokeKey),
	fsmpb.CommandType_COMMAND_TYPE_SET_VERSION_STATE: register(
		func() *fsmpb.SetVersionState { return &fsmpb.SetVersionState{} }, (*State).applySetVersionState),
	fsmpb.CommandType_COMMAND_TYPE_SET_MIN_DECRYPTION_VERSION: register(
		func() *fsmpb.SetMinDecryptionVersion { return &fsmpb.SetMinDecryptionVersion{} }, (*State).applySetMinDecryptionVersion),
	fsmpb.CommandType_COMMAND_TYPE_SET_ROTATION_POLICY: register(
		func() *fsmpb.SetRotationPolicy { return &fsmpb.SetRotationPolicy{} }, (*State).applySetRotationPolicy),
	fsmpb.CommandType_COMMAND_TYPE_SCHEDULE_DESTRUCTION: register(
		func() *fsmpb.ScheduleDestruction { return &fsmpb.ScheduleDestruction{} }, (*State).applyScheduleDestruction),
	fsmpb.CommandType_COMMAND_TYPE_CANCEL_DESTRUCTION: register(
		func() *fsmpb.CancelDestruction { return &fsmpb.CancelDestruction{} }, (*State).applyCancelDestruction),
	fsmpb.CommandType_COMMAND_TYPE_DESTROY_KEY: register(
		func() *fsmpb.DestroyKey { return &fsmpb.DestroyKey{} }, (*State).applyDestroyKey),
	fsmpb.CommandType_COMMAND_TYPE_CREATE_IMPORT_TOKEN: register(
		func() *fsmpb.CreateImportToken { return &fsmpb.CreateImportToken{} }, (*State).applyCreateImportToken),
	fsmpb.CommandType_COMMAND_TYPE_IMPORT_KEY: register(
		func() *fsmpb.ImportKey { return &fsmpb.ImportKey{} }, (*State).applyImportKey),
	// Authorization (authz.go).
	fsmpb.CommandType_COMMAND_TYPE_CREATE_GRANT: register(
		func() *fsmpb.CreateGrant { return &fsmpb.CreateGrant{} }, (*State).applyCreateGrant),
	fsmpb.CommandType_COMMAND_TYPE_REVOKE_GRANT: register(
		func() *fsmpb.RevokeGrant { return &fsmpb.RevokeGrant{} }, (*State).applyRevokeGrant),
	fsmpb.CommandType_COMMAND_TYPE_DENY_PRINCIPAL: register(
		func() *fsmpb.DenyPrincipal { return &fsmpb.DenyPrincipal{} }, (*State).applyDenyPrincipal),
	fsmpb.CommandType_COMMAND_TYPE_ALLOW_PRINCIPAL: register(
		func() *fsmpb.AllowPrincipal { return &fsmpb.AllowPrincipal{} }, (*State).applyAllowPrincipal),
	// Cluster operations (membership.go).
	fsmpb.CommandType_COMMAND_TYPE_SET_GOSSIP_KEY: register(
		func() *fsmpb.SetGossipKey { return &fsmpb.SetGossipKey{} }, (*State).applySetGossipKey),
	// KEK rotation (kek.go).
	fsmpb.CommandType_COMMAND_TYPE_BEGIN_KEK_ROTATION: register(
		func() *fsmpb.BeginKEKRotation { return &fsmpb.BeginKEKRotation{} }, (*State).applyBeginKEKRotation),
	fsmpb.CommandType_COMMAND_TYPE_DELIVER_KEK: register(
		func() *fsmpb.DeliverKEK { return &fsmpb.DeliverKEK{} }, (*State).applyDeliverKEK),
	fsmpb.CommandType_COMMAND_TYPE_KEK_INSTALLED: register(
		func() *fsmpb.KEKInstalled { return &fsmpb.KEKInstalled{} }, (*State).applyKEKInstalled),
	fsmpb.CommandType_COMMAND_TYPE_ACTIVATE_KEK: register(
		func() *fsmpb.ActivateKEK { return &fsmpb.ActivateKEK{} }, (*State).applyActivateKEK),
	fsmpb.CommandType_COMMAND_TYPE_REWRAP_MATERIAL: register(
		func() *fsmpb.RewrapMaterial { return &fsmpb.RewrapMaterial{} }, (*State).applyRewrapMaterial),
	fsmpb.CommandType_COMMAND_TYPE_RETIRE_KEK: register(
		func() *fsmpb.RetireKEK { return &fsmpb.RetireKEK{} }, (*State).applyRetireKEK),
	fsmpb.CommandType_COMMAND_TYPE_KEK_REMOVED: register(
		func() *fsmpb.KEKRemoved { return &fsmpb.KEKRemoved{} }, (*State).applyKEKRemoved),
	fsmpb.CommandType_COMMAND_TYPE_ABANDON_KEK_ROTATION: register(
		func() *fsmpb.AbandonKEKRotation { return &fsmpb.AbandonKEKRotation{} }, (*State).applyAbandonKEKRotation),
	fsmpb.CommandType_COMMAND_TYPE_SET_NODE_FEATURE_LEVEL: register(
		func() *fsmpb.SetNodeFeatureLevel { return &fsmpb.SetNodeFeatureLevel{} }, (*State).applySetNodeFeatureLevel),
}

// Apply processes the command at Raft index `index` and returns its outcome.
// It never fails: a rejected command yields a Result with a non-OK code and
// a message a user can act on.
//
// Order of work, identical on every node:
//  1. A halted state refuses the command (nothing changes, not even the index).
//  2. The envelope is checked: nil or format 0 is INVALID_ARGUMENT; a format
//     other than 1, or a type missing from the dispatch table and not
//     ignorable, halts the state (a newer node wrote it).
//  3. A missing leader time, an over-long request id or non-UTF-8 envelope
//     strings are INVALID_ARGUMENT.
//  4. Housekeeping at the command's leader time: last applied time is set,
//     request records older than RequestRecordTTL and join/import tokens
//     expired for more than their grace are pruned; expired import tokens
//     lose their sealed private key.
//  5. A request id seen before returns the stored Result, changing nothing else.
//  6. An unknown ignorable type is skipped (OK). Otherwise the payload is
//     decoded and the handler applies it; if the command has a request id, the
//     Result is stored under it.
//
// The returned Result (and everything it points to) is shared with the state:
// do not modify it.
func (s *State) Apply(index uint64, cmd *fsmpb.Command) *fsmpb.Result {
	if s.halt != nil {
		return failf(fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION,
			"command at index %d refused: %v", index, s.halt)
	}
	if cmd == nil {
		s.appliedIndex = index
		return failf(fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "empty command")
	}
	switch f := cmd.GetFormat(); {
	case f == 0:
		s.appliedIndex = index
		return failf(fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "command envelope has no format")
	case f != CommandFormat:
		return s.stop(index, fmt.Errorf("%w: envelope format %d at index %d (this node knows format %d)",
			ErrUnsupportedCommand, f, index, CommandFormat))
	}
	h, known := handlers[cmd.GetType()]
	if !known && !cmd.GetIgnorable() {
		// Checked before anything changes, so a halted state is exactly the
		// state before the command it could not apply.
		return s.stop(index, fmt.Errorf("%w: command type %d at index %d is unknown to this node and not ignorable",
			ErrUnsupportedCommand, int32(cmd.GetType()), index))
	}

	s.appliedIndex = index
	t := cmd.GetLeaderTimeUnixNano()
	if t <= 0 {
		return failf(fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT,
			"command has no leader time; the leader must stamp it before appending")
	}
	if len(cmd.GetRequestId()) > maxRequestIDLen {
		return failf(fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT,
			"request id is %d bytes; the limit is %d", len(cmd.GetRequestId()), maxRequestIDLen)
	}
	if !utf8.ValidString(cmd.GetRequestId()) || !utf8.ValidString(cmd.GetPrincipal()) {
		// Only reachable when a Command is built in memory; decoded ones are
		// checked by protobuf. Such strings could not be snapshotted.
		return failf(fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT, "request id and principal must be UTF-8")
	}
	s.lastAppliedTime = t
	s.prune(t)

	if rec, seen := s.request(cmd.GetRequestId()); seen {
		return replayResult(rec)
	}
	if !known {
		return &fsmpb.Result{Message: fmt.Sprintf("ignored unknown command type %d", int32(cmd.GetType()))}
	}

	c := &cmdContext{time: t, principal: cmd.GetPrincipal(), requestID: cmd.GetRequestId()}
	var res *fsmpb.Result
	payload := h.newPayload()
	if err := proto.Unmarshal(cmd.GetPayload(), payload); err != nil {
		// The parser's error text is left out on purpose: protobuf-go varies
		// it between builds, and a Result must be identical on every node.
		res = failf(fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT,
			"malformed %s payload (%d bytes)", typeName(cmd.GetType()), len(cmd.GetPayload()))
	} else {
		res = h.apply(s, c, payload)
	}
	if c.requestID != "" {
		rec := newRequestRecord(c.requestID, t, res)
		s.requests.ReplaceOrInsert(rec)
		s.reqByAge.ReplaceOrInsert(rec)
	}
	return res
}

// newRequestRecord keeps res marshalled: a Result with a key view is a
// tree of protobuf structs (~650 B per created key, kept RequestRecordTTL),
// its bytes about a third of that. A retry gets exactly the first outcome
// back (replayResult).
func newRequestRecord(id string, t int64, res *fsmpb.Result) *fsmpb.RequestRecord {
	b, err := deterministic.Marshal(res)
	if err != nil { // cannot happen for a valid message; keep it whole
		return &fsmpb.RequestRecord{RequestId: id, TimeUnixNano: t, Result: res}
	}
	return &fsmpb.RequestRecord{RequestId: id, TimeUnixNano: t, ResultBytes: b}
}

// replayResult is a recorded outcome as a retry gets it. Every node holds
// the same bytes, so every node replays the same Result.
func replayResult(rec *fsmpb.RequestRecord) *fsmpb.Result {
	if r := rec.GetResult(); r != nil {
		return r
	}
	var r fsmpb.Result
	if err := proto.Unmarshal(rec.GetResultBytes(), &r); err != nil {
		return failf(fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION,
			"the recorded outcome of request %+q cannot be read; retry with a new request id", truncate(rec.GetRequestId()))
	}
	return &r
}

func (s *State) stop(index uint64, err error) *fsmpb.Result {
	s.halt = err
	return failf(fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION,
		"%v: this node is too old to apply it and has stopped applying; upgrade it", err)
}

func (s *State) request(id string) (*fsmpb.RequestRecord, bool) {
	if id == "" {
		return nil, false
	}
	return s.requests.Get(&fsmpb.RequestRecord{RequestId: id})
}

// prune drops request records and join and import tokens that have outlived
// their use at leader time t, and the private keys of expired import tokens. Which records go depends only on their contents and t, never
// on insertion order, so a node restored from a snapshot prunes exactly what
// a node that applied the whole log prunes.
func (s *State) prune(t int64) {
	reqCutoff := t - int64(RequestRecordTTL)
	for {
		oldest, ok := s.reqByAge.Min()
		if !ok || oldest.GetTimeUnixNano() >= reqCutoff {
			break
		}
		s.reqByAge.DeleteMin()
		s.requests.Delete(oldest)
	}
	tokenCutoff := t - int64(JoinTokenGrace)
	for id, tok := range s.tokens {
		if tok.GetExpiresUnixNano() < tokenCutoff {
			delete(s.tokens, id)
		}
	}
	for {
		// Expired (t >= expiry): the private key goes at once.
		tok, ok := s.importSealed.Min()
		if !ok || tok.GetExpiresUnixNano() > t {
			break
		}
		dropped := proto.CloneOf(tok)
		dropped.PrivateKey = nil
		s.putImportToken(dropped)
	}
	importCutoff := t - int64(ImportTokenGrace)
	for {
		tok, ok := s.importByExpiry.Min()
		if !ok || tok.GetExpiresUnixNano() >= importCutoff {
			break
		}
		s.importByExpiry.DeleteMin()
		s.importTokens.Delete(tok)
		s.importSealed.Delete(tok)
	}
}

func typeName(t fsmpb.CommandType) string {
	return strings.TrimPrefix(t.String(), "COMMAND_TYPE_")
}

func failf(code fsmpb.ResultCode, format string, a ...any) *fsmpb.Result {
	return &fsmpb.Result{Code: code, Message: fmt.Sprintf(format, a...)}
}

// putKey stores rec (a new or replacing record) in every index.
func (s *State) putKey(rec *fsmpb.KeyRecord) {
	if old, ok := s.keys[rec.GetKeyId()]; ok {
		if old.GetAlias() != "" && old.GetAlias() != rec.GetAlias() {
			delete(s.aliases, old.GetAlias())
		}
		// The indexes order by fields of the old (immutable) record, so
		// deleting by it finds its entry.
		s.rotations.Delete(old)
		s.destructions.Delete(old)
		s.countKEKRefs(old, -1)
	}
	s.countKEKRefs(rec, 1)
	s.keys[rec.GetKeyId()] = rec
	s.keyOrder.ReplaceOrInsert(rec)
	if rec.GetAlias() != "" {
		s.aliases[rec.GetAlias()] = rec.GetKeyId()
	}
	if rec.GetState() == fsmpb.KeyState_KEY_STATE_ACTIVE && rec.GetRotationPeriodSeconds() > 0 {
		s.rotations.ReplaceOrInsert(rec)
	}
	if rec.GetState() == fsmpb.KeyState_KEY_STATE_PENDING_DESTRUCTION {
		s.destructions.ReplaceOrInsert(rec)
	}
}

// dueRotations returns up to limit (<= 0: all) ACTIVE keys with a rotation
// period whose next rotation is due at now, by (next rotation, id).
func (s *State) dueRotations(now int64, limit int) []*fsmpb.KeyRecord {
	var out []*fsmpb.KeyRecord
	s.rotations.Ascend(func(rec *fsmpb.KeyRecord) bool {
		if rec.GetNextRotationUnixNano() > now {
			return false
		}
		out = append(out, rec)
		return limit <= 0 || len(out) < limit
	})
	return out
}

// dueDestructions returns up to limit (<= 0: all) PENDING_DESTRUCTION keys
// whose destruction is due at now, by (destroy after, id).
func (s *State) dueDestructions(now int64, limit int) []*fsmpb.KeyRecord {
	var out []*fsmpb.KeyRecord
	s.destructions.Ascend(func(rec *fsmpb.KeyRecord) bool {
		if rec.GetDestroyAfterUnixNano() > now {
			return false
		}
		out = append(out, rec)
		return limit <= 0 || len(out) < limit
	})
	return out
}

// putImportToken stores tok (new or replacing; id and expiry never change).
func (s *State) putImportToken(tok *fsmpb.ImportToken) {
	s.importTokens.ReplaceOrInsert(tok)
	s.importByExpiry.ReplaceOrInsert(tok)
	if tok.GetPrivateKey() != nil {
		s.importSealed.ReplaceOrInsert(tok)
	} else {
		s.importSealed.Delete(tok)
	}
}

func (s *State) importToken(id string) (*fsmpb.ImportToken, bool) {
	return s.importTokens.Get(&fsmpb.ImportToken{TokenId: id})
}

// key finds a key by id or alias. Ids start with "k-" and aliases may not,
// so the two never collide.
func (s *State) key(idOrAlias string) (*fsmpb.KeyRecord, bool) {
	if rec, ok := s.keys[idOrAlias]; ok {
		return rec, true
	}
	if id, ok := s.aliases[idOrAlias]; ok {
		rec, ok := s.keys[id]
		return rec, ok
	}
	return nil, false
}

func (s *State) listKeys(afterID string, limit int) []*fsmpb.KeyRecord {
	n := s.keyOrder.Len()
	if limit > 0 && limit < n {
		n = limit
	}
	out := make([]*fsmpb.KeyRecord, 0, min(n, 1024))
	s.keyOrder.AscendGreaterOrEqual(&fsmpb.KeyRecord{KeyId: afterID}, func(rec *fsmpb.KeyRecord) bool {
		if rec.GetKeyId() == afterID {
			return true
		}
		out = append(out, rec)
		return limit <= 0 || len(out) < limit
	})
	return out
}

func (s *State) sortedNodes() []*fsmpb.NodeRecord {
	out := make([]*fsmpb.NodeRecord, 0, len(s.nodes))
	for _, n := range s.nodes {
		out = append(out, n)
	}
	slices.SortFunc(out, func(a, b *fsmpb.NodeRecord) int { return strings.Compare(a.GetNodeId(), b.GetNodeId()) })
	return out
}

func (s *State) sortedTokens() []*fsmpb.JoinToken {
	out := make([]*fsmpb.JoinToken, 0, len(s.tokens))
	for _, t := range s.tokens {
		out = append(out, t)
	}
	slices.SortFunc(out, func(a, b *fsmpb.JoinToken) int { return strings.Compare(a.GetTokenId(), b.GetTokenId()) })
	return out
}

// frozenState is a consistent view of a State that stays valid while the
// State keeps changing: the key and request trees are copy-on-write clones,
// the rest are small slices of immutable records.
type frozenState struct {
	cluster         *fsmpb.ClusterInfo
	keys            *btree.BTreeG[*fsmpb.KeyRecord]
	nodes           []*fsmpb.NodeRecord
	tokens          []*fsmpb.JoinToken
	importTokens    *btree.BTreeG[*fsmpb.ImportToken]
	requests        *btree.BTreeG[*fsmpb.RequestRecord]
	grants          *btree.BTreeG[*fsmpb.Grant]
	denied          *btree.BTreeG[*fsmpb.DeniedPrincipal]
	lastAppliedTime int64
}

// freeze captures the state in O(nodes + join tokens). It writes to the
// trees' copy-on-write bookkeeping, so the caller needs exclusive access to s.
func (s *State) freeze() *frozenState {
	return &frozenState{
		cluster:         s.cluster,
		keys:            s.keyOrder.Clone(),
		nodes:           s.sortedNodes(),
		tokens:          s.sortedTokens(),
		importTokens:    s.importTokens.Clone(),
		requests:        s.requests.Clone(),
		grants:          s.grantOrder.Clone(),
		denied:          s.deniedOrder.Clone(),
		lastAppliedTime: s.lastAppliedTime,
	}
}

// ToProto returns the state as an fsmpb.State with every repeated field
// sorted by id, so equal states marshal (deterministically) to equal bytes.
// The result shares the stored records: do not modify it. ToProto only reads
// s, so concurrent ToProto calls are safe while nothing applies.
func (s *State) ToProto() *fsmpb.State {
	return (&frozenState{
		cluster:         s.cluster,
		keys:            s.keyOrder,
		nodes:           s.sortedNodes(),
		tokens:          s.sortedTokens(),
		importTokens:    s.importTokens,
		requests:        s.requests,
		grants:          s.grantOrder,
		denied:          s.deniedOrder,
		lastAppliedTime: s.lastAppliedTime,
	}).proto()
}

func (f *frozenState) proto() *fsmpb.State {
	st := &fsmpb.State{
		Format:                  StateFormat,
		Cluster:                 f.cluster,
		Keys:                    make([]*fsmpb.KeyRecord, 0, f.keys.Len()),
		Nodes:                   f.nodes,
		JoinTokens:              f.tokens,
		Requests:                make([]*fsmpb.RequestRecord, 0, f.requests.Len()),
		LastAppliedTimeUnixNano: f.lastAppliedTime,
		ImportTokens:            make([]*fsmpb.ImportToken, 0, f.importTokens.Len()),
		Grants:                  make([]*fsmpb.Grant, 0, f.grants.Len()),
		DeniedPrincipals:        make([]*fsmpb.DeniedPrincipal, 0, f.denied.Len()),
	}
	f.grants.Ascend(func(g *fsmpb.Grant) bool {
		st.Grants = append(st.Grants, g)
		return true
	})
	f.denied.Ascend(func(d *fsmpb.DeniedPrincipal) bool {
		st.DeniedPrincipals = append(st.DeniedPrincipals, d)
		return true
	})
	f.importTokens.Ascend(func(tok *fsmpb.ImportToken) bool {
		st.ImportTokens = append(st.ImportTokens, tok)
		return true
	})
	f.keys.Ascend(func(rec *fsmpb.KeyRecord) bool {
		st.Keys = append(st.Keys, rec)
		return true
	})
	// Releases before FeatureCompactRequestRecords refuse a record without
	// a Result message: while one may be a member, write them that way.
	// (Deterministic: the levels are in the state.)
	compact := minLevel(f.nodes) >= FeatureCompactRequestRecords
	f.requests.Ascend(func(rec *fsmpb.RequestRecord) bool {
		if !compact && rec.GetResult() == nil {
			rec = &fsmpb.RequestRecord{RequestId: rec.GetRequestId(), TimeUnixNano: rec.GetTimeUnixNano(), Result: replayResult(rec)}
		}
		st.Requests = append(st.Requests, rec)
		return true
	})
	return st
}

// StateFromProto builds a State from its snapshot form, after checking that
// the snapshot is internally consistent (known format, no missing or
// duplicate ids or aliases, key versions in ascending order with the primary
// among them, no material left on destroyed keys or versions, well-formed
// and unique import tokens, grants with well-formed unique ids on existing
// keys that are not destroyed, well-formed unique denied principals). The State takes ownership of st's records: the
// caller must not modify st afterwards. The applied index starts at 0.
func StateFromProto(st *fsmpb.State) (*State, error) {
	if st == nil {
		return nil, errors.New("state: nil")
	}
	if st.GetFormat() != StateFormat {
		return nil, fmt.Errorf("state: unsupported format %d (this node reads format %d)", st.GetFormat(), StateFormat)
	}
	s := NewState()
	if c := st.GetCluster(); c != nil {
		if c.GetClusterId() == "" {
			return nil, errors.New("state: cluster info has no cluster id")
		}
		seen := make(map[uint32]bool, len(c.GetKekVersions()))
		for i, k := range c.GetKekVersions() {
			if k.GetVersion() == 0 {
				return nil, fmt.Errorf("state: KEK version entry %d is empty or has version 0", i)
			}
			if seen[k.GetVersion()] {
				return nil, fmt.Errorf("state: duplicate KEK version %d", k.GetVersion())
			}
			seen[k.GetVersion()] = true
		}
		if err := checkStoredKEKs(c); err != nil {
			return nil, err
		}
		s.cluster = c
	}
	for i, rec := range st.GetKeys() {
		switch {
		case rec == nil || rec.GetKeyId() == "":
			return nil, fmt.Errorf("state: key entry %d has no key id", i)
		case s.keys[rec.GetKeyId()] != nil:
			return nil, fmt.Errorf("state: duplicate key id %s", rec.GetKeyId())
		case rec.GetAlias() != "" && s.aliases[rec.GetAlias()] != "":
			return nil, fmt.Errorf("state: alias %q is used by keys %s and %s",
				rec.GetAlias(), s.aliases[rec.GetAlias()], rec.GetKeyId())
		case strings.HasPrefix(rec.GetAlias(), keyIDPrefix):
			return nil, fmt.Errorf("state: key %s has alias %q, which looks like a key id", rec.GetKeyId(), rec.GetAlias())
		}
		if err := checkStoredVersions(rec); err != nil {
			return nil, err
		}
		s.putKey(rec)
	}
	for i, n := range st.GetNodes() {
		switch {
		case n == nil || n.GetNodeId() == "":
			return nil, fmt.Errorf("state: node entry %d has no node id", i)
		case s.nodes[n.GetNodeId()] != nil:
			return nil, fmt.Errorf("state: duplicate node id %q", n.GetNodeId())
		}
		s.nodes[n.GetNodeId()] = n
	}
	for i, t := range st.GetJoinTokens() {
		switch {
		case t == nil || t.GetTokenId() == "":
			return nil, fmt.Errorf("state: join token entry %d has no token id", i)
		case s.tokens[t.GetTokenId()] != nil:
			return nil, fmt.Errorf("state: duplicate join token id %q", t.GetTokenId())
		}
		s.tokens[t.GetTokenId()] = t
	}
	for i, r := range st.GetRequests() {
		switch {
		case r == nil || r.GetRequestId() == "":
			return nil, fmt.Errorf("state: request record %d has no request id", i)
		case r.GetResult() != nil && len(r.GetResultBytes()) > 0:
			return nil, fmt.Errorf("state: request record %q has two outcomes (result and result_bytes)", r.GetRequestId())
		case s.requests.Has(r):
			return nil, fmt.Errorf("state: duplicate request id %q", r.GetRequestId())
		}
		if r.GetResult() != nil { // written for older releases: keep it compact
			r = newRequestRecord(r.GetRequestId(), r.GetTimeUnixNano(), r.GetResult())
		}
		s.requests.ReplaceOrInsert(r)
		s.reqByAge.ReplaceOrInsert(r)
	}
	for i, t := range st.GetImportTokens() {
		switch {
		case t == nil || t.GetTokenId() == "":
			return nil, fmt.Errorf("state: import token entry %d has no token id", i)
		case !importTokenIDPattern.MatchString(t.GetTokenId()):
			return nil, fmt.Errorf("state: import token id %+q is malformed", truncate(t.GetTokenId()))
		case s.importTokens.Has(t):
			return nil, fmt.Errorf("state: duplicate import token id %s", t.GetTokenId())
		case t.GetUsedByKey() != "" && t.GetPrivateKey() != nil:
			return nil, fmt.Errorf("state: import token %s was used but still holds its private key", t.GetTokenId())
		}
		s.putImportToken(t)
	}
	for i, g := range st.GetGrants() {
		switch {
		case g == nil || g.GetGrantId() == "":
			return nil, fmt.Errorf("state: grant entry %d has no grant id", i)
		case !grantIDPattern.MatchString(g.GetGrantId()):
			return nil, fmt.Errorf("state: grant id %+q is malformed", truncate(g.GetGrantId()))
		case s.grants[g.GetGrantId()] != nil:
			return nil, fmt.Errorf("state: duplicate grant id %s", g.GetGrantId())
		case s.keys[g.GetKeyId()] == nil:
			return nil, fmt.Errorf("state: grant %s is on key %+q, which does not exist", g.GetGrantId(), truncate(g.GetKeyId()))
		case s.keys[g.GetKeyId()].GetState() == stDestroyed:
			return nil, fmt.Errorf("state: grant %s is on key %s, which is destroyed", g.GetGrantId(), g.GetKeyId())
		case !principalPattern.MatchString(g.GetPrincipal()):
			return nil, fmt.Errorf("state: grant %s has malformed principal %+q", g.GetGrantId(), truncate(g.GetPrincipal()))
		}
		s.putGrant(g)
	}
	for i, d := range st.GetDeniedPrincipals() {
		switch {
		case d == nil || d.GetPrincipal() == "":
			return nil, fmt.Errorf("state: denied principal entry %d has no principal", i)
		case !principalPattern.MatchString(d.GetPrincipal()):
			return nil, fmt.Errorf("state: denied principal %+q is malformed", truncate(d.GetPrincipal()))
		case s.denied[d.GetPrincipal()] != nil:
			return nil, fmt.Errorf("state: duplicate denied principal %s", d.GetPrincipal())
		}
		s.putDenied(d)
	}
	s.lastAppliedTime = st.GetLastAppliedTimeUnixNano()
	return s, nil
}

func checkStoredVersions(rec *fsmpb.KeyRecord) error {
	id := rec.GetKeyId()
	destroyed := rec.GetState() == fsmpb.KeyState_KEY_STATE_DESTROYED
	var prev uint32
	primary := false
	for i, v := range rec.GetVersions() {
		switch {
		case v == nil || v.GetVersion() <= prev:
			return fmt.Errorf("state: key %s: version entry %d is missing or out of order", id, i)
		case (destroyed || v.GetState() == fsmpb.KeyVersionState_KEY_VERSION_STATE_DESTROYED) && v.GetMaterial() != nil:
			return fmt.Errorf("state: key %s: destroyed version %d still holds material", id, v.GetVersion())
		}
		prev = v.GetVersion()
		primary = primary || v.GetVersion() == rec.GetPrimaryVersion()
	}
	if !primary {
		return fmt.Errorf("state: key %s: primary version %d is not among its versions", id, rec.GetPrimaryVersion())
	}
	return nil
}
