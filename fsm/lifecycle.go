package fsm

import (
	"fmt"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// Key lifecycle handlers (issue 3). The key state machine is the table in
// DESIGN.md; every refusal names the key's state and what to do instead.

const (
	stActive      = fsmpb.KeyState_KEY_STATE_ACTIVE
	stDisabled    = fsmpb.KeyState_KEY_STATE_DISABLED
	stDeactivated = fsmpb.KeyState_KEY_STATE_DEACTIVATED
	stCompromised = fsmpb.KeyState_KEY_STATE_COMPROMISED
	stPending     = fsmpb.KeyState_KEY_STATE_PENDING_DESTRUCTION
	stDestroyed   = fsmpb.KeyState_KEY_STATE_DESTROYED

	verEnabled   = fsmpb.KeyVersionState_KEY_VERSION_STATE_ENABLED
	verDisabled  = fsmpb.KeyVersionState_KEY_VERSION_STATE_DISABLED
	verDestroyed = fsmpb.KeyVersionState_KEY_VERSION_STATE_DESTROYED
)

func stateName(st fsmpb.KeyState) string { return strings.TrimPrefix(st.String(), "KEY_STATE_") }

// fmtTime renders leader time for messages (pure arithmetic: identical on
// every node and Go release).
func fmtTime(ns int64) string { return time.Unix(0, ns).UTC().Format(time.RFC3339Nano) }

// stateHint says what a caller can do about a key in state st.
func stateHint(st fsmpb.KeyState) string {
	switch st {
	case stDisabled:
		return "enable it first"
	case stDeactivated, stCompromised:
		return "a revoked key cannot be made ACTIVE again; create a new key"
	case stPending:
		return "cancel the scheduled destruction first"
	case stDestroyed:
		return "a destroyed key cannot change"
	default:
		return "it cannot change"
	}
}

// lookupKey finds the key a lifecycle command names. Commands take key ids
// only: the API resolves aliases before proposing, because an alias can move
// between proposal and apply.
func (s *State) lookupKey(id string) (*fsmpb.KeyRecord, *fsmpb.Result) {
	if id == "" {
		return nil, failf(codeInvalid, "key id is required")
	}
	rec, ok := s.keys[id]
	if ok {
		return rec, nil
	}
	if !keyIDPattern.MatchString(id) {
		return nil, failf(codeInvalid, "key id %+q is malformed: want \"k-\" followed by 26 lowercase letters or digits "+
			"(commands take key ids, not aliases)", truncate(id))
	}
	return nil, failf(codeNotFound, "key %s does not exist", id)
}

// refuseDestroyed refuses any change to a destroyed key's tombstone.
func refuseDestroyed(rec *fsmpb.KeyRecord) *fsmpb.Result {
	if rec.GetState() == stDestroyed {
		return failf(codePrecondition, "key %s is DESTROYED; a destroyed key cannot change", rec.GetKeyId())
	}
	return nil
}

// change clones rec for modification, stamping the update time.
func change(c *cmdContext, rec *fsmpb.KeyRecord) *fsmpb.KeyRecord {
	mod := proto.CloneOf(rec)
	mod.UpdatedUnixNano = c.time
	return mod
}

func (s *State) store(mod *fsmpb.KeyRecord) *fsmpb.Result {
	s.putKey(mod)
	return &fsmpb.Result{Key: withoutMaterial(mod)}
}

func unchanged(rec *fsmpb.KeyRecord) *fsmpb.Result {
	return &fsmpb.Result{Key: withoutMaterial(rec)}
}

// highestVersion is the number of the key's newest version (versions are
// kept in ascending order; StateFromProto checks it).
func highestVersion(rec *fsmpb.KeyRecord) uint32 {
	v := rec.GetVersions()
	if len(v) == 0 {
		return 0
	}
	return v[len(v)-1].GetVersion()
}

// rotationDue reports whether an automatic rotation of rec is due at t.
func rotationDue(rec *fsmpb.KeyRecord, t int64) bool {
	return rec.GetRotationPeriodSeconds() > 0 && t >= rec.GetNextRotationUnixNano()
}

func (s *State) applyRotateKey(c *cmdContext, p *fsmpb.RotateKey) *fsmpb.Result {
	rec, res := s.lookupKey(p.GetKeyId())
	if res != nil {
		return res
	}
	id := rec.GetKeyId()
	if st := rec.GetState(); st != stActive {
		return failf(codePrecondition, "key %s is %s; only ACTIVE keys rotate (%s)", id, stateName(st), stateHint(st))
	}
	if rec.GetOrigin() == fsmpb.KeyOrigin_KEY_ORIGIN_IMPORTED {
		// As AWS KMS: Cabinet-generated material never joins imported
		// material under one key; import a new key instead.
		return failf(codePrecondition, "key %s holds imported material and cannot be rotated; import a new key and move the alias", id)
	}
	if p.GetAutomatic() && !rotationDue(rec, c.time) {
		if rec.GetRotationPeriodSeconds() <= 0 {
			return failf(codePrecondition, "key %s has no automatic rotation period; automatic rotation refused, nothing changed", id)
		}
		return failf(codePrecondition, "automatic rotation of key %s is not due until %s; nothing changed",
			id, fmtTime(rec.GetNextRotationUnixNano()))
	}
	next := uint64(highestVersion(rec)) + 1
	switch v := uint64(p.GetVersion()); {
	case v == 0:
		return failf(codeInvalid, "version is required (the next version of key %s is %d)", id, next)
	case v < next:
		return failf(codePrecondition, "version %d already exists on key %s; retry with version %d", v, id, next)
	case v > next:
		return failf(codePrecondition, "version %d is not the next version of key %s (%d); retry with version %d", v, id, next, next)
	}
	mat := p.GetMaterial()
	if res := checkBlob("key material", mat); res != nil {
		return res
	}
	if res := s.checkKEKActive("key material", mat.GetKekVersion()); res != nil {
		return res
	}
	if res := checkPublicKey(rec.GetSpec(), keySpecRules[rec.GetSpec()], p.GetPublicKeyDer()); res != nil {
		return res
	}

	mod := change(c, rec)
	mod.Versions = append(mod.Versions, &fsmpb.KeyVersion{
		Version:         p.GetVersion(),
		Material:        mat,
		CreatedUnixNano: c.time,
		State:           verEnabled,
		PublicKeyDer:    p.GetPublicKeyDer(),
	})
	mod.PrimaryVersion = p.GetVersion()
	if period := mod.GetRotationPeriodSeconds(); period > 0 {
		mod.NextRotationUnixNano = addSeconds(c.time, period)
	}
	return s.store(mod)
}

func (s *State) applyUpdateKey(c *cmdContext, p *fsmpb.UpdateKey) *fsmpb.Result {
	switch {
	case !p.GetSetDescription() && !p.GetReplaceTags():
		return failf(codeInvalid, "nothing to update: set a new description and/or replace the tags")
	case !p.GetSetDescription() && p.GetDescription() != "":
		return failf(codeInvalid, "a description was given without set_description")
	case !p.GetReplaceTags() && len(p.GetTags()) != 0:
		return failf(codeInvalid, "tags were given without replace_tags")
	case len(p.GetDescription()) > maxDescriptionLen:
		return failf(codeInvalid, "description is %d bytes; the limit is %d", len(p.GetDescription()), maxDescriptionLen)
	}
	if res := checkTags(p.GetTags()); res != nil {
		return res
	}
	rec, res := s.lookupKey(p.GetKeyId())
	if res != nil {
		return res
	}
	if res := refuseDestroyed(rec); res != nil {
		return res
	}
	mod := change(c, rec)
	if p.GetSetDescription() {
		mod.Description = p.GetDescription()
	}
	if p.GetReplaceTags() {
		mod.Tags = p.GetTags()
	}
	return s.store(mod)
}

func (s *State) applySetAlias(c *cmdContext, p *fsmpb.SetAlias) *fsmpb.Result {
	alias := p.GetAlias()
	if alias == "" {
		return failf(codeInvalid, "alias is required")
	}
	if res := checkAlias(alias); res != nil {
		return res
	}
	rec, res := s.lookupKey(p.GetKeyId())
	if res != nil {
		return res
	}
	if st := rec.GetState(); st == stPending || st == stDestroyed {
		return failf(codePrecondition, "key %s is %s; an alias can point only at a key that is not pending destruction or destroyed",
			rec.GetKeyId(), stateName(st))
	}
	if rec.GetAlias() == alias {
		return unchanged(rec)
	}
	if owner := s.aliases[alias]; owner != "" {
		// The alias moves: its old key loses it.
		prev := change(c, s.keys[owner])
		prev.Alias = ""
		s.putKey(prev)
	}
	mod := change(c, rec)
	mod.Alias = alias // putKey releases the key's previous alias
	return s.store(mod)
}

func (s *State) applyDeleteAlias(c *cmdContext, p *fsmpb.DeleteAlias) *fsmpb.Result {
	alias := p.GetAlias()
	if alias == "" {
		return failf(codeInvalid, "alias is required")
	}
	owner, ok := s.aliases[alias]
	if !ok {
		return failf(codeNotFound, "alias %+q does not exist", truncate(alias))
	}
	mod := change(c, s.keys[owner])
	mod.Alias = ""
	return s.store(mod)
}

func (s *State) applySetKeyEnabled(c *cmdContext, p *fsmpb.SetKeyEnabled) *fsmpb.Result {
	rec, res := s.lookupKey(p.GetKeyId())
	if res != nil {
		return res
	}
	id, st := rec.GetKeyId(), rec.GetState()
	from, to, verb := stActive, stDisabled, "disabled"
	if p.GetEnabled() {
		from, to, verb = stDisabled, stActive, "enabled"
	}
	switch st {
	case to:
		return unchanged(rec) // idempotent
	case from:
		mod := change(c, rec)
		mod.State = to
		return s.store(mod)
	case stDeactivated, stCompromised:
		return failf(codePrecondition, "key %s is %s (revoked) and cannot be %s; revocation is final: create a new key",
			id, stateName(st), verb)
	case stPending:
		if p.GetEnabled() {
			return failf(codePrecondition, "key %s is PENDING_DESTRUCTION; cancel the scheduled destruction (the key becomes DISABLED), then enable it", id)
		}
		return failf(codePrecondition, "key %s is PENDING_DESTRUCTION and already unusable; cancel the scheduled destruction to keep it (it becomes DISABLED)", id)
	case stDestroyed:
		return failf(codePrecondition, "key %s is DESTROYED and cannot be %s", id, verb)
	default:
		return failf(codePrecondition, "key %s is %s and cannot be %s", id, stateName(st), verb)
	}
}

func (s *State) applyRevokeKey(c *cmdContext, p *fsmpb.RevokeKey) *fsmpb.Result {
	var to fsmpb.KeyState
	switch p.GetReason() {
	case fsmpb.RevocationReason_REVOCATION_REASON_SUPERSEDED, fsmpb.RevocationReason_REVOCATION_REASON_CEASED:
		to = stDeactivated
	case fsmpb.RevocationReason_REVOCATION_REASON_COMPROMISED:
		to = stCompromised
	case fsmpb.RevocationReason_REVOCATION_REASON_UNSPECIFIED:
		return failf(codeInvalid, "revocation reason is required: SUPERSEDED, CEASED or COMPROMISED")
	default:
		return failf(codeInvalid, "revocation reason %d is unknown: use SUPERSEDED, CEASED or COMPROMISED", int32(p.GetReason()))
	}
	if n := len(p.GetComment()); n > maxCommentLen {
		return failf(codeInvalid, "revocation comment is %d bytes; the limit is %d", n, maxCommentLen)
	}
	rec, res := s.lookupKey(p.GetKeyId())
	if res != nil {
		return res
	}
	id, st := rec.GetKeyId(), rec.GetState()
	switch {
	case st == stActive || st == stDisabled:
	case st == stDeactivated && to == stCompromised:
	case st == stDeactivated:
		return failf(codePrecondition, "key %s is already DEACTIVATED (revoked); to mark it compromised, revoke it with reason COMPROMISED", id)
	case st == stCompromised:
		return failf(codePrecondition, "key %s is already COMPROMISED; revocation is final", id)
	case st == stPending:
		return failf(codePrecondition, "key %s is PENDING_DESTRUCTION; cancel the scheduled destruction first, then revoke it", id)
	default:
		return failf(codePrecondition, "key %s is %s and cannot be revoked", id, stateName(st))
	}
	mod := change(c, rec)
	mod.State = to
	mod.RevocationReason = p.GetReason()
	mod.RevocationComment = p.GetComment()
	mod.RevokedUnixNano = c.time
	mod.NextRotationUnixNano = 0 // revoked keys never rotate
	return s.store(mod)
}

func (s *State) applySetVersionState(c *cmdContext, p *fsmpb.SetVersionState) *fsmpb.Result {
	switch p.GetState() {
	case verEnabled, verDisabled:
	case verDestroyed:
		return failf(codeInvalid, "a version cannot be destroyed on its own; schedule the key's destruction instead")
	default:
		return failf(codeInvalid, "version state %s is not valid here: use ENABLED or DISABLED", p.GetState())
	}
	if p.GetVersion() == 0 {
		return failf(codeInvalid, "version is required")
	}
	rec, res := s.lookupKey(p.GetKeyId())
	if res != nil {
		return res
	}
	if res := refuseDestroyed(rec); res != nil {
		return res
	}
	id := rec.GetKeyId()
	i := versionIndex(rec, p.GetVersion())
	if i < 0 {
		return failf(codeNotFound, "key %s has no version %d (its newest is %d)", id, p.GetVersion(), highestVersion(rec))
	}
	v := rec.GetVersions()[i]
	switch {
	case v.GetState() == verDestroyed:
		return failf(codePrecondition, "version %d of key %s is DESTROYED and cannot change", p.GetVersion(), id)
	case p.GetState() == verDisabled && p.GetVersion() == rec.GetPrimaryVersion():
		return failf(codePrecondition, "version %d is the primary version of key %s and cannot be disabled; rotate the key first, or disable the key",
			p.GetVersion(), id)
	case v.GetState() == p.GetState():
		return unchanged(rec)
	}
	mod := change(c, rec)
	mod.Versions[i].State = p.GetState()
	return s.store(mod)
}

func versionIndex(rec *fsmpb.KeyRecord, version uint32) int {
	for i, v := range rec.GetVersions() {
		if v.GetVersion() == version {
			return i
		}
	}
	return -1
}

func (s *State) applySetMinDecryptionVersion(c *cmdContext, p *fsmpb.SetMinDecryptionVersion) *fsmpb.Result {
	if p.GetVersion() == 0 {
		return failf(codeInvalid, "minimum decryption version must be at least 1")
	}
	rec, res := s.lookupKey(p.GetKeyId())
	if res != nil {
		return res
	}
	if res := refuseDestroyed(rec); res != nil {
		return res
	}
	if p.GetVersion() > rec.GetPrimaryVersion() {
		return failf(codePrecondition, "minimum decryption version %d is above the primary version %d of key %s; it can be at most %d",
			p.GetVersion(), rec.GetPrimaryVersion(), rec.GetKeyId(), rec.GetPrimaryVersion())
	}
	if rec.GetMinDecryptionVersion() == p.GetVersion() {
		return unchanged(rec)
	}
	mod := change(c, rec)
	mod.MinDecryptionVersion = p.GetVersion()
	return s.store(mod)
}

func (s *State) applySetRotationPolicy(c *cmdContext, p *fsmpb.SetRotationPolicy) *fsmpb.Result {
	rec, res := s.lookupKey(p.GetKeyId())
	if res != nil {
		return res
	}
	period := p.GetPeriodSeconds()
	if res := checkRotationPeriod(rec.GetSpec(), keySpecRules[rec.GetSpec()], period); res != nil {
		return res
	}
	if period > 0 && rec.GetOrigin() == fsmpb.KeyOrigin_KEY_ORIGIN_IMPORTED {
		return failf(codePrecondition, "key %s holds imported material and cannot rotate automatically", rec.GetKeyId())
	}
	if st := rec.GetState(); st != stActive && st != stDisabled {
		return failf(codePrecondition, "key %s is %s; only ACTIVE or DISABLED keys take a rotation policy (%s)",
			rec.GetKeyId(), stateName(st), stateHint(st))
	}
	mod := change(c, rec)
	mod.RotationPeriodSeconds = period
	mod.NextRotationUnixNano = 0
	if period > 0 {
		mod.NextRotationUnixNano = addSeconds(c.time, period)
	}
	return s.store(mod)
}

func (s *State) applyScheduleDestruction(c *cmdContext, p *fsmpb.ScheduleDestruction) *fsmpb.Result {
	switch w := p.GetPendingWindowSeconds(); {
	case w <= 0:
		return failf(codeInvalid, "pending window is %d seconds; it must be positive", w)
	case w > maxPeriodSeconds:
		return failf(codeInvalid, "pending window is %d seconds; the limit is %d (100 years)", w, maxPeriodSeconds)
	}
	rec, res := s.lookupKey(p.GetKeyId())
	if res != nil {
		return res
	}
	switch rec.GetState() {
	case stPending:
		return failf(codePrecondition, "key %s is already PENDING_DESTRUCTION (due at %s); cancel it first to reschedule",
			rec.GetKeyId(), fmtTime(rec.GetDestroyAfterUnixNano()))
	case stDestroyed:
		return failf(codePrecondition, "key %s is already DESTROYED", rec.GetKeyId())
	}
	mod := change(c, rec)
	mod.State = stPending
	mod.DestroyAfterUnixNano = addSeconds(c.time, p.GetPendingWindowSeconds())
	mod.NextRotationUnixNano = 0
	return s.store(mod)
}

// stateAfterCancel is where a cancelled destruction returns a key: DISABLED
// (as in AWS KMS), except that a revoked key stays revoked — otherwise
// schedule-then-cancel would turn a COMPROMISED key into one that can be
// enabled again. The revocation reason is kept on the record, so this is a
// function of the record alone.
func stateAfterCancel(rec *fsmpb.KeyRecord) fsmpb.KeyState {
	switch rec.GetRevocationReason() {
	case fsmpb.RevocationReason_REVOCATION_REASON_COMPROMISED:
		return stCompromised
	case fsmpb.RevocationReason_REVOCATION_REASON_UNSPECIFIED:
		return stDisabled
	default:
		return stDeactivated
	}
}

func (s *State) applyCancelDestruction(c *cmdContext, p *fsmpb.CancelDestruction) *fsmpb.Result {
	rec, res := s.lookupKey(p.GetKeyId())
	if res != nil {
		return res
	}
	if st := rec.GetState(); st != stPending {
		return failf(codePrecondition, "key %s is %s; only a key pending destruction can have its destruction cancelled",
			rec.GetKeyId(), stateName(st))
	}
	mod := change(c, rec)
	mod.State = stateAfterCancel(rec)
	mod.DestroyAfterUnixNano = 0
	if mod.State == stDisabled && mod.GetRotationPeriodSeconds() > 0 {
		// Resume the schedule (it runs once the key is enabled again).
		mod.NextRotationUnixNano = addSeconds(c.time, mod.GetRotationPeriodSeconds())
	}
	return s.store(mod)
}

func (s *State) applyDestroyKey(c *cmdContext, p *fsmpb.DestroyKey) *fsmpb.Result {
	rec, res := s.lookupKey(p.GetKeyId())
	if res != nil {
		return res
	}
	id := rec.GetKeyId()
	if st := rec.GetState(); st != stPending {
		return failf(codePrecondition, "key %s is %s; only a key pending destruction is destroyed (schedule its destruction first)",
			id, stateName(st))
	}
	if c.time < rec.GetDestroyAfterUnixNano() {
		return failf(codePrecondition, "key %s is not due for destruction until %s; nothing changed",
			id, fmtTime(rec.GetDestroyAfterUnixNano()))
	}
	res = s.store(tombstone(rec, c.time))
	// A destroyed key's grants go with it, in the same apply.
	if n := s.removeKeyGrants(id); n > 0 {
		res.Message = fmt.Sprintf("key %s destroyed; %d grant(s) on it removed", id, n)
	}
	return res
}

// tombstone builds a destroyed key's record field by field (an allow-list,
// so a field added to KeyRecord later is dropped unless added here): no
// material, alias, description or tags; ids, spec, usage, origin, dates,
// creator, revocation info, version numbers/dates/public keys stay for audit.
func tombstone(rec *fsmpb.KeyRecord, t int64) *fsmpb.KeyRecord {
	tomb := &fsmpb.KeyRecord{
		KeyId:                rec.GetKeyId(),
		Spec:                 rec.GetSpec(),
		Usage:                rec.GetUsage(),
		State:                stDestroyed,
		CreatedUnixNano:      rec.GetCreatedUnixNano(),
		UpdatedUnixNano:      t,
		CreatedBy:            rec.GetCreatedBy(),
		PrimaryVersion:       rec.GetPrimaryVersion(),
		Versions:             make([]*fsmpb.KeyVersion, 0, len(rec.GetVersions())),
		Origin:               rec.GetOrigin(),
		MinDecryptionVersion: rec.GetMinDecryptionVersion(),
		RevocationReason:     rec.GetRevocationReason(),
		RevocationComment:    rec.GetRevocationComment(),
		RevokedUnixNano:      rec.GetRevokedUnixNano(),
		DestroyAfterUnixNano: rec.GetDestroyAfterUnixNano(),
		DestroyedUnixNano:    t,
	}
	for _, v := range rec.GetVersions() {
		tomb.Versions = append(tomb.Versions, &fsmpb.KeyVersion{
			Version:           v.GetVersion(),
			CreatedUnixNano:   v.GetCreatedUnixNano(),
			State:             verDestroyed,
			PublicKeyDer:      v.GetPublicKeyDer(),
			DestroyedUnixNano: t,
		})
	}
	return tomb
}

func (s *State) applyCreateImportToken(c *cmdContext, p *fsmpb.CreateImportToken) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	id := p.GetTokenId()
	switch {
	case !importTokenIDPattern.MatchString(id):
		return failf(codeInvalid, "import token id %+q is malformed: want \"it-\" followed by 8-64 lowercase letters or digits", truncate(id))
	case s.importTokens.Has(&fsmpb.ImportToken{TokenId: id}):
		return failf(codeExists, "import token %s already exists", id)
	case len(p.GetPublicKeyDer()) == 0:
		return failf(codeInvalid, "import token public key is required")
	case len(p.GetPublicKeyDer()) > maxPublicKeyLen:
		return failf(codeInvalid, "import token public key is %d bytes; the limit is %d", len(p.GetPublicKeyDer()), maxPublicKeyLen)
	}
	if res := checkBlob("import token private key", p.GetPrivateKey()); res != nil {
		return res
	}
	if res := s.checkKEKActive("import token private key", p.GetPrivateKey().GetKekVersion()); res != nil {
		return res
	}
	if p.GetExpiresUnixNano() <= c.time {
		return failf(codeInvalid, "import token expiry must be later than the leader's time")
	}
	if _, known := keySpecRules[p.GetSpec()]; !known {
		return failf(codeInvalid, "key spec %s is not supported", p.GetSpec())
	}
	s.putImportToken(&fsmpb.ImportToken{
		TokenId:         id,
		PublicKeyDer:    p.GetPublicKeyDer(),
		PrivateKey:      p.GetPrivateKey(),
		ExpiresUnixNano: p.GetExpiresUnixNano(),
		Spec:            p.GetSpec(),
		CreatedUnixNano: c.time,
		CreatedBy:       c.principal,
	})
	return &fsmpb.Result{}
}

func (s *State) applyImportKey(c *cmdContext, p *fsmpb.ImportKey) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	// One answer for every way the token can be wrong (as for join tokens).
	tok, ok := s.importTokens.Get(&fsmpb.ImportToken{TokenId: p.GetTokenId()})
	if !ok || tok.GetUsedByKey() != "" || c.time >= tok.GetExpiresUnixNano() || tok.GetPrivateKey() == nil {
		return failf(codeDenied, msgBadImportToken)
	}
	if p.GetKey() == nil {
		return failf(codeInvalid, "the key to import is required")
	}
	if p.GetKey().GetSpec() != tok.GetSpec() {
		return failf(codeInvalid, "import token %s was made for %s keys, not %s; request a token for %s",
			tok.GetTokenId(), tok.GetSpec(), p.GetKey().GetSpec(), p.GetKey().GetSpec())
	}
	rec, res := s.buildKey(c, p.GetKey(), fsmpb.KeyOrigin_KEY_ORIGIN_IMPORTED)
	if res != nil {
		return res
	}
	used := proto.CloneOf(tok)
	used.UsedByKey = rec.GetKeyId()
	used.PrivateKey = nil
	s.putImportToken(used)
	return s.store(rec)
}
