package fsm

import (
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// Authorization state (issue 5): per-key grants and the cluster-wide deny
// list. The API consults them on every request through FSM.GrantsFor and
// FSM.Denied, so both are answered from indexes without allocating.

const (
	maxPrincipalLen         = 256
	maxGrantsPerKey         = 100
	maxGrants               = 10_000
	maxGrantContextPairs    = 16
	maxGrantContextKeyLen   = 256
	maxGrantContextValueLen = 1024
	maxDenyReasonLen        = 1024
)

var (
	grantIDPattern   = regexp.MustCompile(`^g-[a-z0-9]{26}$`)
	principalPattern = regexp.MustCompile(`^[A-Za-z0-9._@:/-]{1,256}$`)

	// validGrantOps lists the operation names for messages, in enum order
	// (built from the generated enum, sorted, never from map order).
	validGrantOps = func() string {
		nums := make([]int32, 0, len(fsmpb.GrantOperation_name))
		for n := range fsmpb.GrantOperation_name {
			if n != 0 {
				nums = append(nums, n)
			}
		}
		slices.Sort(nums)
		names := make([]string, len(nums))
		for i, n := range nums {
			names[i] = opName(fsmpb.GrantOperation(n))
		}
		return strings.Join(names, ", ")
	}()
)

func opName(op fsmpb.GrantOperation) string {
	return strings.TrimPrefix(op.String(), "GRANT_OPERATION_")
}

// grantKey indexes grants by (key id, principal): the lookup made on every
// request.
type grantKey struct{ keyID, principal string }

func grantLess(a, b *fsmpb.Grant) bool { return a.GetGrantId() < b.GetGrantId() }

func grantByKeyLess(a, b *fsmpb.Grant) bool {
	if a.GetKeyId() != b.GetKeyId() {
		return a.GetKeyId() < b.GetKeyId()
	}
	return a.GetGrantId() < b.GetGrantId()
}

func grantByPrincipalLess(a, b *fsmpb.Grant) bool {
	if a.GetPrincipal() != b.GetPrincipal() {
		return a.GetPrincipal() < b.GetPrincipal()
	}
	return a.GetGrantId() < b.GetGrantId()
}

func deniedLess(a, b *fsmpb.DeniedPrincipal) bool { return a.GetPrincipal() < b.GetPrincipal() }

func compareGrantID(g *fsmpb.Grant, id string) int { return strings.Compare(g.GetGrantId(), id) }

// putGrant stores a new grant (grants never change; an id is never reused
// while its grant exists) in every index. The (key, principal) slices are
// copy-on-write: a slice handed to a reader is never modified afterwards.
func (s *State) putGrant(g *fsmpb.Grant) {
	s.grants[g.GetGrantId()] = g
	s.grantOrder.ReplaceOrInsert(g)
	s.grantsByKey.ReplaceOrInsert(g)
	s.grantsByPrincipal.ReplaceOrInsert(g)
	k := grantKey{g.GetKeyId(), g.GetPrincipal()}
	old := s.grantsFor[k]
	i, _ := slices.BinarySearchFunc(old, g.GetGrantId(), compareGrantID)
	list := make([]*fsmpb.Grant, 0, len(old)+1)
	list = append(list, old[:i]...)
	list = append(list, g)
	list = append(list, old[i:]...)
	s.grantsFor[k] = list
}

// deleteGrant removes a stored grant from every index.
func (s *State) deleteGrant(g *fsmpb.Grant) {
	delete(s.grants, g.GetGrantId())
	s.grantOrder.Delete(g)
	s.grantsByKey.Delete(g)
	s.grantsByPrincipal.Delete(g)
	k := grantKey{g.GetKeyId(), g.GetPrincipal()}
	old := s.grantsFor[k]
	i, found := slices.BinarySearchFunc(old, g.GetGrantId(), compareGrantID)
	switch {
	case !found:
	case len(old) == 1:
		delete(s.grantsFor, k)
	default:
		list := make([]*fsmpb.Grant, 0, len(old)-1)
		list = append(list, old[:i]...)
		list = append(list, old[i+1:]...)
		s.grantsFor[k] = list
	}
}

// grantsOfKey returns the key's grants by grant id (limit <= 0: all).
func (s *State) grantsOfKey(keyID string, limit int) []*fsmpb.Grant {
	var out []*fsmpb.Grant
	s.grantsByKey.AscendGreaterOrEqual(&fsmpb.Grant{KeyId: keyID}, func(g *fsmpb.Grant) bool {
		if g.GetKeyId() != keyID {
			return false
		}
		out = append(out, g)
		return limit <= 0 || len(out) < limit
	})
	return out
}

func (s *State) grantsOfPrincipal(principal string) []*fsmpb.Grant {
	var out []*fsmpb.Grant
	s.grantsByPrincipal.AscendGreaterOrEqual(&fsmpb.Grant{Principal: principal}, func(g *fsmpb.Grant) bool {
		if g.GetPrincipal() != principal {
			return false
		}
		out = append(out, g)
		return true
	})
	return out
}

// listGrants implements FSM.Grants: either filter may be empty (= any); the
// result is a new slice sorted by grant id.
func (s *State) listGrants(keyID, principal string) []*fsmpb.Grant {
	switch {
	case keyID != "" && principal != "":
		return slices.Clone(s.grantsFor[grantKey{keyID, principal}])
	case keyID != "":
		return s.grantsOfKey(keyID, 0)
	case principal != "":
		return s.grantsOfPrincipal(principal)
	}
	out := make([]*fsmpb.Grant, 0, s.grantOrder.Len())
	s.grantOrder.Ascend(func(g *fsmpb.Grant) bool {
		out = append(out, g)
		return true
	})
	return out
}

// removeKeyGrants drops every grant of a key (DESTROY_KEY) and returns how
// many there were.
func (s *State) removeKeyGrants(keyID string) int {
	gone := s.grantsOfKey(keyID, 0)
	for _, g := range gone {
		s.deleteGrant(g)
	}
	return len(gone)
}

func (s *State) putDenied(d *fsmpb.DeniedPrincipal) {
	s.denied[d.GetPrincipal()] = d
	s.deniedOrder.ReplaceOrInsert(d)
}

func (s *State) listDenied() []*fsmpb.DeniedPrincipal {
	out := make([]*fsmpb.DeniedPrincipal, 0, s.deniedOrder.Len())
	s.deniedOrder.Ascend(func(d *fsmpb.DeniedPrincipal) bool {
		out = append(out, d)
		return true
	})
	return out
}

// checkPrincipal validates a grantee or denied principal (a client
// certificate's common name).
func checkPrincipal(p string) *fsmpb.Result {
	switch {
	case p == "":
		return failf(codeInvalid, "principal is required")
	case len(p) > maxPrincipalLen:
		return failf(codeInvalid, "principal is %d bytes; the limit is %d", len(p), maxPrincipalLen)
	case !principalPattern.MatchString(p):
		return failf(codeInvalid, "principal %+q is malformed: use 1-%d of A-Z a-z 0-9 . _ @ : / -", truncate(p), maxPrincipalLen)
	}
	return nil
}

func checkGrantOperations(ops []fsmpb.GrantOperation) *fsmpb.Result {
	if len(ops) == 0 {
		return failf(codeInvalid, "a grant needs at least one operation: %s", validGrantOps)
	}
	for i, op := range ops {
		if _, known := fsmpb.GrantOperation_name[int32(op)]; !known {
			return failf(codeInvalid, "operation %d is unknown; use %s", int32(op), validGrantOps)
		}
		if op == fsmpb.GrantOperation_GRANT_OPERATION_UNSPECIFIED {
			return failf(codeInvalid, "operation UNSPECIFIED is not allowed; use %s", validGrantOps)
		}
		if slices.Contains(ops[:i], op) {
			return failf(codeInvalid, "operation %s is listed twice; list each operation once", opName(op))
		}
	}
	return nil
}

func checkGrantContext(ctx map[string]string) *fsmpb.Result {
	if len(ctx) > maxGrantContextPairs {
		return failf(codeInvalid, "encryption context constraint has %d pairs; the limit is %d", len(ctx), maxGrantContextPairs)
	}
	// Sorted, so the message names the same pair on every node.
	keys := make([]string, 0, len(ctx))
	for k := range ctx {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		switch {
		case k == "":
			return failf(codeInvalid, "encryption context constraint keys must not be empty")
		case len(k) > maxGrantContextKeyLen:
			return failf(codeInvalid, "encryption context constraint key %+q is %d bytes; the limit is %d",
				truncate(k), len(k), maxGrantContextKeyLen)
		case len(ctx[k]) > maxGrantContextValueLen:
			return failf(codeInvalid, "value of encryption context constraint %+q is %d bytes; the limit is %d",
				truncate(k), len(ctx[k]), maxGrantContextValueLen)
		}
	}
	return nil
}

func (s *State) applyCreateGrant(c *cmdContext, p *fsmpb.CreateGrant) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	g := p.GetGrant()
	if g == nil {
		return failf(codeInvalid, "grant is required")
	}
	id := g.GetGrantId()
	if !grantIDPattern.MatchString(id) {
		return failf(codeInvalid, "grant id %+q is malformed: want \"g-\" followed by 26 lowercase letters or digits", truncate(id))
	}
	if _, exists := s.grants[id]; exists {
		return failf(codeExists, "grant %s already exists", id)
	}
	rec, res := s.lookupKey(g.GetKeyId())
	if res != nil {
		return res
	}
	keyID := rec.GetKeyId()
	if rec.GetState() == stDestroyed {
		return failf(codePrecondition, "key %s is DESTROYED; a destroyed key cannot be granted", keyID)
	}
	if res := checkPrincipal(g.GetPrincipal()); res != nil {
		return res
	}
	if res := checkGrantOperations(g.GetOperations()); res != nil {
		return res
	}
	if res := checkGrantContext(g.GetEncryptionContextEquals()); res != nil {
		return res
	}
	if n := len(s.grantsOfKey(keyID, maxGrantsPerKey)); n >= maxGrantsPerKey {
		return failf(codePrecondition, "key %s already has %d grants, the limit; revoke grants it no longer needs first",
			keyID, maxGrantsPerKey)
	}
	if len(s.grants) >= maxGrants {
		return failf(codePrecondition, "the cluster already has %d grants, the limit; revoke grants that are no longer needed first",
			maxGrants)
	}

	// p was decoded for this call alone, so its grant can be stored as is;
	// the Result shares the stored (immutable) record.
	g.CreatedUnixNano = c.time
	g.CreatedBy = c.principal
	s.putGrant(g)
	return &fsmpb.Result{Grant: g}
}

func (s *State) applyRevokeGrant(_ *cmdContext, p *fsmpb.RevokeGrant) *fsmpb.Result {
	id := p.GetGrantId()
	if id == "" {
		return failf(codeInvalid, "grant id is required")
	}
	g, ok := s.grants[id]
	if !ok {
		if !grantIDPattern.MatchString(id) {
			return failf(codeInvalid, "grant id %+q is malformed: want \"g-\" followed by 26 lowercase letters or digits", truncate(id))
		}
		return failf(codeNotFound, "grant %s does not exist (it may have been revoked, or removed when its key was destroyed)", id)
	}
	s.deleteGrant(g)
	return &fsmpb.Result{Grant: g}
}

// principalName is the name part of a command principal "<role>:<name>"
// (what follows the first colon); a principal without a colon is all name.
func principalName(commandPrincipal string) string {
	if _, name, ok := strings.Cut(commandPrincipal, ":"); ok {
		return name
	}
	return commandPrincipal
}

func (s *State) applyDenyPrincipal(c *cmdContext, p *fsmpb.DenyPrincipal) *fsmpb.Result {
	who := p.GetPrincipal()
	if res := checkPrincipal(who); res != nil {
		return res
	}
	if n := len(p.GetReason()); n > maxDenyReasonLen {
		return failf(codeInvalid, "deny reason is %d bytes; the limit is %d", n, maxDenyReasonLen)
	}
	if who == principalName(c.principal) {
		return failf(codePrecondition, "you cannot deny yourself (%+q issued this command); ask another administrator", who)
	}
	_, again := s.denied[who]
	s.putDenied(&fsmpb.DeniedPrincipal{
		Principal:      who,
		Reason:         p.GetReason(),
		DeniedUnixNano: c.time,
		DeniedBy:       c.principal,
	})
	if again {
		return &fsmpb.Result{Message: fmt.Sprintf("principal %+q was already denied; reason and time updated", who)}
	}
	return &fsmpb.Result{Message: fmt.Sprintf("principal %+q is denied", who)}
}

func (s *State) applyAllowPrincipal(_ *cmdContext, p *fsmpb.AllowPrincipal) *fsmpb.Result {
	who := p.GetPrincipal()
	if res := checkPrincipal(who); res != nil {
		return res
	}
	d, ok := s.denied[who]
	if !ok {
		return failf(codeNotFound, "principal %+q is not denied", who)
	}
	delete(s.denied, who)
	s.deniedOrder.Delete(d)
	return &fsmpb.Result{Message: fmt.Sprintf("principal %+q is no longer denied", who)}
}
