package fsm

import (
	"bytes"
	"crypto/subtle"
	"maps"
	"math"
	"regexp"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// Limits checked by Apply. Validation uses only lengths, ASCII classes and
// regular expressions, never parsers (x509, unicode tables) whose verdicts
// could change between Go releases and split a mixed-version cluster.
const (
	maxRequestIDLen   = 256
	maxIDLen          = 128 // cluster, node and join token ids
	maxAddrLen        = 256
	maxRegionLen      = 64
	maxPublicKeyLen   = 16 << 10
	maxCertLen        = 64 << 10
	maxBlobLen        = 64 << 10
	maxCheckValueLen  = 64
	maxDescriptionLen = 8192
	maxTags           = 50
	maxTagKeyLen      = 128
	maxTagValueLen    = 256
	maxCommentLen     = 1024 // revocation comment
	secretHashLen     = 32

	// maxPeriodSeconds bounds rotation periods and destruction windows
	// (100 years) so leader time + period never overflows int64.
	maxPeriodSeconds = 100 * 365 * 24 * 3600

	keyIDPrefix = "k-"
)

var (
	keyIDPattern         = regexp.MustCompile(`^k-[a-z0-9]{26}$`)
	aliasPattern         = regexp.MustCompile(`^[A-Za-z0-9/_-]{1,256}$`)
	importTokenIDPattern = regexp.MustCompile(`^it-[a-z0-9]{8,64}$`)
)

const (
	codeInvalid       = fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT
	codeNotFound      = fsmpb.ResultCode_RESULT_CODE_NOT_FOUND
	codeExists        = fsmpb.ResultCode_RESULT_CODE_ALREADY_EXISTS
	codePrecondition  = fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION
	codeDenied        = fsmpb.ResultCode_RESULT_CODE_PERMISSION_DENIED
	msgBadJoinToken   = "join token is invalid, expired or already used"
	msgBadImportToken = "import token is invalid, expired or already used"
	msgNotInitialised = "cluster is not initialised; run `cabinet operator init` first"
)

// validID accepts 1..maxIDLen printable ASCII characters without spaces.
func validID(id string) bool {
	if id == "" || len(id) > maxIDLen {
		return false
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x21 || id[i] > 0x7e {
			return false
		}
	}
	return true
}

func (s *State) applyInitCluster(c *cmdContext, p *fsmpb.InitCluster) *fsmpb.Result {
	if s.cluster != nil {
		return failf(codePrecondition, "cluster already initialised (cluster id %s)", s.cluster.GetClusterId())
	}
	kek := p.GetKek()
	switch {
	case !validID(p.GetClusterId()):
		return failf(codeInvalid, "cluster id must be 1-%d printable ASCII characters without spaces", maxIDLen)
	case len(p.GetCaCertDer()) == 0:
		return failf(codeInvalid, "CA certificate is required")
	case len(p.GetCaCertDer()) > maxCertLen:
		return failf(codeInvalid, "CA certificate is %d bytes; the limit is %d", len(p.GetCaCertDer()), maxCertLen)
	case kek == nil:
		return failf(codeInvalid, "KEK version is required")
	case kek.GetVersion() != 1:
		return failf(codeInvalid, "the first KEK version must be 1, got %d", kek.GetVersion())
	case len(kek.GetCheckValue()) == 0:
		return failf(codeInvalid, "KEK check value is required")
	case len(kek.GetCheckValue()) > maxCheckValueLen:
		return failf(codeInvalid, "KEK check value is %d bytes; the limit is %d", len(kek.GetCheckValue()), maxCheckValueLen)
	}
	if res := checkBlob("CA key", p.GetCaKey()); res != nil {
		return res
	}
	if p.GetCaKey().GetKekVersion() != kek.GetVersion() {
		return failf(codeInvalid, "CA key is wrapped under KEK version %d, but the cluster KEK is version %d",
			p.GetCaKey().GetKekVersion(), kek.GetVersion())
	}
	node := p.GetFirstNode()
	if res := checkNode("first node", node); res != nil {
		return res
	}

	// p was decoded for this call alone, so its messages can be stored as is.
	kek.CreatedUnixNano = c.time
	kek.State = fsmpb.KEKState_KEK_STATE_ACTIVE
	kek.InstalledOn = []string{node.GetNodeId()}
	kek.GeneratedBy = node.GetNodeId()
	node.Voter = true
	node.JoinedUnixNano = c.time
	s.cluster = &fsmpb.ClusterInfo{
		ClusterId:         p.GetClusterId(),
		CaCertDer:         p.GetCaCertDer(),
		CaKey:             p.GetCaKey(),
		KekVersions:       []*fsmpb.KEKVersion{kek},
		CurrentKekVersion: kek.GetVersion(),
		CreatedUnixNano:   c.time,
	}
	s.nodes[node.GetNodeId()] = node
	return &fsmpb.Result{Node: node}
}

// keySpecRule says, per supported spec, which usages it allows and whether it
// is asymmetric.
type keySpecRule struct {
	// def is the usage chosen for KEY_USAGE_UNSPECIFIED; UNSPECIFIED means
	// the caller must choose (RSA can either encrypt or sign, as in AWS KMS).
	def     fsmpb.KeyUsage
	allowed []fsmpb.KeyUsage
	// asymmetric specs have a public key per version and cannot rotate
	// automatically (as in AWS KMS); symmetric ones have no public key.
	asymmetric bool
}

// keySpecRules is the one table of supported key specs.
var keySpecRules = map[fsmpb.KeySpec]keySpecRule{
	fsmpb.KeySpec_KEY_SPEC_AES_256:     {fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, []fsmpb.KeyUsage{fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT}, false},
	fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256: {fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC, []fsmpb.KeyUsage{fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC}, false},
	fsmpb.KeySpec_KEY_SPEC_HMAC_SHA512: {fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC, []fsmpb.KeyUsage{fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC}, false},
	fsmpb.KeySpec_KEY_SPEC_RSA_2048:    {fsmpb.KeyUsage_KEY_USAGE_UNSPECIFIED, []fsmpb.KeyUsage{fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY}, true},
	fsmpb.KeySpec_KEY_SPEC_RSA_3072:    {fsmpb.KeyUsage_KEY_USAGE_UNSPECIFIED, []fsmpb.KeyUsage{fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY}, true},
	fsmpb.KeySpec_KEY_SPEC_RSA_4096:    {fsmpb.KeyUsage_KEY_USAGE_UNSPECIFIED, []fsmpb.KeyUsage{fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY}, true},
	fsmpb.KeySpec_KEY_SPEC_EC_P256:     {fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, []fsmpb.KeyUsage{fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY}, true},
	fsmpb.KeySpec_KEY_SPEC_EC_P384:     {fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, []fsmpb.KeyUsage{fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY}, true},
	fsmpb.KeySpec_KEY_SPEC_ED25519:     {fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, []fsmpb.KeyUsage{fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY}, true},
}

func (s *State) applyCreateKey(c *cmdContext, p *fsmpb.CreateKey) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	rec, res := s.buildKey(c, p, fsmpb.KeyOrigin_KEY_ORIGIN_GENERATED)
	if res != nil {
		return res
	}
	s.putKey(rec)
	return &fsmpb.Result{Key: createdKeyView(rec)}
}

// createdKeyView is withoutMaterial for a record buildKey just made, built
// field by field instead of through proto.Clone's reflection (a third of a
// CREATE_KEY's apply time on every node). It copies every field
// KeyRecord and KeyVersion have; TestCreatedKeyViewMatchesWithoutMaterial
// (which sets every field by reflection) keeps the two equal. Like
// withoutMaterial, it shares nothing mutable with rec.
func createdKeyView(rec *fsmpb.KeyRecord) *fsmpb.KeyRecord {
	v := &fsmpb.KeyRecord{
		KeyId:                 rec.GetKeyId(),
		Spec:                  rec.GetSpec(),
		Usage:                 rec.GetUsage(),
		State:                 rec.GetState(),
		Alias:                 rec.GetAlias(),
		Description:           rec.GetDescription(),
		CreatedUnixNano:       rec.GetCreatedUnixNano(),
		UpdatedUnixNano:       rec.GetUpdatedUnixNano(),
		CreatedBy:             rec.GetCreatedBy(),
		PrimaryVersion:        rec.GetPrimaryVersion(),
		Origin:                rec.GetOrigin(),
		RotationPeriodSeconds: rec.GetRotationPeriodSeconds(),
		NextRotationUnixNano:  rec.GetNextRotationUnixNano(),
		MinDecryptionVersion:  rec.GetMinDecryptionVersion(),
		RevocationReason:      rec.GetRevocationReason(),
		RevocationComment:     rec.GetRevocationComment(),
		RevokedUnixNano:       rec.GetRevokedUnixNano(),
		DestroyAfterUnixNano:  rec.GetDestroyAfterUnixNano(),
		DestroyedUnixNano:     rec.GetDestroyedUnixNano(),
	}
	if tags := rec.GetTags(); len(tags) > 0 {
		v.Tags = maps.Clone(tags)
	}
	if vers := rec.GetVersions(); len(vers) > 0 {
		v.Versions = make([]*fsmpb.KeyVersion, len(vers))
		for i, ver := range vers {
			v.Versions[i] = &fsmpb.KeyVersion{
				Version:           ver.GetVersion(),
				CreatedUnixNano:   ver.GetCreatedUnixNano(),
				State:             ver.GetState(),
				PublicKeyDer:      bytes.Clone(ver.GetPublicKeyDer()),
				DestroyedUnixNano: ver.GetDestroyedUnixNano(),
			}
		}
	}
	return v
}

// buildKey validates a CreateKey (also the one inside an ImportKey) against
// the state and returns the record it creates, without storing it.
func (s *State) buildKey(c *cmdContext, p *fsmpb.CreateKey, origin fsmpb.KeyOrigin) (*fsmpb.KeyRecord, *fsmpb.Result) {
	id := p.GetKeyId()
	if !keyIDPattern.MatchString(id) {
		return nil, failf(codeInvalid, "key id %+q is malformed: want \"k-\" followed by 26 lowercase letters or digits", truncate(id))
	}
	if _, exists := s.keys[id]; exists {
		return nil, failf(codeExists, "key %s already exists", id)
	}
	rule, known := keySpecRules[p.GetSpec()]
	if !known {
		return nil, failf(codeInvalid, "key spec %s is not supported", p.GetSpec())
	}
	usage := p.GetUsage()
	if usage == fsmpb.KeyUsage_KEY_USAGE_UNSPECIFIED {
		if rule.def == fsmpb.KeyUsage_KEY_USAGE_UNSPECIFIED {
			return nil, failf(codeInvalid, "key spec %s needs an explicit usage: ENCRYPT_DECRYPT or SIGN_VERIFY", p.GetSpec())
		}
		usage = rule.def
	}
	if !slices.Contains(rule.allowed, usage) {
		return nil, failf(codeInvalid, "key usage %s is not allowed for key spec %s", usage, p.GetSpec())
	}
	if alias := p.GetAlias(); alias != "" {
		if res := checkAlias(alias); res != nil {
			return nil, res
		}
		if owner := s.aliases[alias]; owner != "" {
			return nil, failf(codeExists, "alias %+q is already used by key %s", alias, owner)
		}
	}
	if n := len(p.GetDescription()); n > maxDescriptionLen {
		return nil, failf(codeInvalid, "description is %d bytes; the limit is %d", n, maxDescriptionLen)
	}
	if res := checkTags(p.GetTags()); res != nil {
		return nil, res
	}
	mat := p.GetMaterial()
	if res := checkBlob("key material", mat); res != nil {
		return nil, res
	}
	if res := s.checkKEKActive("key material", mat.GetKekVersion()); res != nil {
		return nil, res
	}
	if res := checkPublicKey(p.GetSpec(), rule, p.GetPublicKeyDer()); res != nil {
		return nil, res
	}
	period := p.GetRotationPeriodSeconds()
	if res := checkRotationPeriod(p.GetSpec(), rule, period); res != nil {
		return nil, res
	}

	// p was decoded for this call alone, so its messages can be stored as is.
	rec := &fsmpb.KeyRecord{
		KeyId:           id,
		Spec:            p.GetSpec(),
		Usage:           usage,
		State:           fsmpb.KeyState_KEY_STATE_ACTIVE,
		Alias:           p.GetAlias(),
		Description:     p.GetDescription(),
		Tags:            p.GetTags(),
		CreatedUnixNano: c.time,
		UpdatedUnixNano: c.time,
		CreatedBy:       c.principal,
		PrimaryVersion:  1,
		Versions: []*fsmpb.KeyVersion{{
			Version:         1,
			Material:        mat,
			CreatedUnixNano: c.time,
			State:           fsmpb.KeyVersionState_KEY_VERSION_STATE_ENABLED,
			PublicKeyDer:    p.GetPublicKeyDer(),
		}},
		Origin:                origin,
		RotationPeriodSeconds: period,
	}
	if period > 0 {
		rec.NextRotationUnixNano = addSeconds(c.time, period)
	}
	return rec, nil
}

// checkAlias checks an alias's syntax (not whether it is free).
func checkAlias(alias string) *fsmpb.Result {
	switch {
	case !aliasPattern.MatchString(alias):
		return failf(codeInvalid, "alias %+q is malformed: use 1-256 of A-Z a-z 0-9 / _ -", truncate(alias))
	case strings.HasPrefix(alias, keyIDPrefix):
		return failf(codeInvalid, "alias %+q must not start with %+q (reserved for key ids)", alias, keyIDPrefix)
	}
	return nil
}

// checkPublicKey: asymmetric specs need the new version's public key,
// symmetric specs have none. The DER is not parsed (see DESIGN.md).
func checkPublicKey(spec fsmpb.KeySpec, rule keySpecRule, pub []byte) *fsmpb.Result {
	switch {
	case rule.asymmetric && len(pub) == 0:
		return failf(codeInvalid, "key spec %s is asymmetric: the version's public key (PKIX DER) is required", spec)
	case !rule.asymmetric && len(pub) != 0:
		return failf(codeInvalid, "key spec %s is symmetric and has no public key; leave the public key empty", spec)
	case len(pub) > maxPublicKeyLen:
		return failf(codeInvalid, "public key is %d bytes; the limit is %d", len(pub), maxPublicKeyLen)
	}
	return nil
}

func checkRotationPeriod(spec fsmpb.KeySpec, rule keySpecRule, period int64) *fsmpb.Result {
	switch {
	case period < 0:
		return failf(codeInvalid, "rotation period is %d seconds; it must be 0 (no automatic rotation) or positive", period)
	case period > maxPeriodSeconds:
		return failf(codeInvalid, "rotation period is %d seconds; the limit is %d (100 years)", period, maxPeriodSeconds)
	case period > 0 && rule.asymmetric:
		return failf(codeInvalid, "key spec %s is asymmetric and cannot rotate automatically; set the rotation period to 0 "+
			"(only AES_256 and HMAC keys rotate automatically)", spec)
	}
	return nil
}

// addSeconds returns t + secs seconds, saturating at the largest time.
func addSeconds(t, secs int64) int64 {
	d := secs * int64(time.Second) // secs <= maxPeriodSeconds: no overflow
	if t > math.MaxInt64-d {
		return math.MaxInt64
	}
	return t + d
}

// withoutMaterial is the view of a key that goes into a Result. Results are
// kept for RequestRecordTTL in request records (and snapshots); keeping
// wrapped material there would let it outlive the key's destruction, so a
// Result never carries it. Read the key itself for its material.
func withoutMaterial(rec *fsmpb.KeyRecord) *fsmpb.KeyRecord {
	v := proto.CloneOf(rec)
	for _, ver := range v.GetVersions() {
		ver.Material = nil
	}
	return v
}

func checkTags(tags map[string]string) *fsmpb.Result {
	if len(tags) > maxTags {
		return failf(codeInvalid, "key has %d tags; the limit is %d", len(tags), maxTags)
	}
	// Sorted, so the message names the same tag on every node.
	keys := make([]string, 0, len(tags))
	for k := range tags {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		switch {
		case k == "":
			return failf(codeInvalid, "tag keys must not be empty")
		case len(k) > maxTagKeyLen:
			return failf(codeInvalid, "tag key %+q is %d bytes; the limit is %d", truncate(k), len(k), maxTagKeyLen)
		case len(tags[k]) > maxTagValueLen:
			return failf(codeInvalid, "value of tag %+q is %d bytes; the limit is %d", k, len(tags[k]), maxTagValueLen)
		}
	}
	return nil
}

func checkBlob(what string, b *fsmpb.WrappedBlob) *fsmpb.Result {
	switch {
	case b == nil:
		return failf(codeInvalid, "%s is required", what)
	case len(b.GetBlob()) == 0:
		return failf(codeInvalid, "%s is empty", what)
	case len(b.GetBlob()) > maxBlobLen:
		return failf(codeInvalid, "%s is %d bytes; the limit is %d", what, len(b.GetBlob()), maxBlobLen)
	}
	return nil
}

// checkKEKActive requires that `what` is wrapped under a KEK version every
// node holds: the current (ACTIVE) one, or a DRAINING one (material proposed
// just before a KEK rotation activated; the leader re-wraps it).
func (s *State) checkKEKActive(what string, version uint32) *fsmpb.Result {
	for _, k := range s.cluster.GetKekVersions() {
		if k.GetVersion() != version {
			continue
		}
		if !KEKOpensMaterial(k.GetState()) {
			return failf(codePrecondition, "%s is wrapped under KEK version %d, which is %s; wrap it under KEK version %d",
				what, version, k.GetState(), s.cluster.GetCurrentKekVersion())
		}
		return nil
	}
	return failf(codeInvalid, "%s is wrapped under KEK version %d, which does not exist; the current KEK version is %d",
		what, version, s.cluster.GetCurrentKekVersion())
}

// checkNode validates a node record proposed by INIT_CLUSTER or ADMIT_NODE.
func checkNode(what string, n *fsmpb.NodeRecord) *fsmpb.Result {
	switch {
	case n == nil:
		return failf(codeInvalid, "%s is required", what)
	case !validID(n.GetNodeId()):
		return failf(codeInvalid, "node id must be 1-%d printable ASCII characters without spaces", maxIDLen)
	case n.GetRaftAddr() == "":
		return failf(codeInvalid, "node %+q has no raft address", n.GetNodeId())
	case len(n.GetRaftAddr()) > maxAddrLen || len(n.GetApiAddr()) > maxAddrLen:
		return failf(codeInvalid, "node %+q: addresses are limited to %d bytes", n.GetNodeId(), maxAddrLen)
	case len(n.GetRegion()) > maxRegionLen:
		return failf(codeInvalid, "node %+q: region is limited to %d bytes", n.GetNodeId(), maxRegionLen)
	case len(n.GetIdentityPublicKeyDer()) == 0:
		return failf(codeInvalid, "node %+q has no identity public key", n.GetNodeId())
	case len(n.GetIdentityPublicKeyDer()) > maxPublicKeyLen:
		return failf(codeInvalid, "node %+q: identity public key is %d bytes; the limit is %d",
			n.GetNodeId(), len(n.GetIdentityPublicKeyDer()), maxPublicKeyLen)
	}
	return nil
}

func (s *State) applyCreateJoinToken(c *cmdContext, p *fsmpb.CreateJoinToken) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	switch {
	case !validID(p.GetTokenId()):
		return failf(codeInvalid, "join token id must be 1-%d printable ASCII characters without spaces", maxIDLen)
	case s.tokens[p.GetTokenId()] != nil:
		return failf(codeExists, "join token %s already exists", p.GetTokenId())
	case len(p.GetSecretHash()) != secretHashLen:
		return failf(codeInvalid, "join token secret hash must be %d bytes (SHA-256), got %d", secretHashLen, len(p.GetSecretHash()))
	case p.GetExpiresUnixNano() <= c.time:
		return failf(codeInvalid, "join token expiry must be later than the leader's time")
	}
	s.tokens[p.GetTokenId()] = &fsmpb.JoinToken{
		TokenId:         p.GetTokenId(),
		SecretHash:      p.GetSecretHash(),
		ExpiresUnixNano: p.GetExpiresUnixNano(),
		CreatedUnixNano: c.time,
		CreatedBy:       c.principal,
	}
	return &fsmpb.Result{}
}

func (s *State) applyAdmitNode(c *cmdContext, p *fsmpb.AdmitNode) *fsmpb.Result {
	if s.cluster == nil {
		return failf(codePrecondition, msgNotInitialised)
	}
	// One answer for every way the token can be wrong, so a caller without a
	// valid token learns nothing about which tokens exist.
	tok := s.tokens[p.GetTokenId()]
	if tok == nil || tok.GetUsedByNode() != "" || c.time >= tok.GetExpiresUnixNano() ||
		subtle.ConstantTimeCompare(tok.GetSecretHash(), p.GetSecretHash()) != 1 {
		return failf(codeDenied, msgBadJoinToken)
	}
	node := p.GetNode()
	if res := checkNode("node", node); res != nil {
		return res
	}
	if _, exists := s.nodes[node.GetNodeId()]; exists {
		return failf(codeExists, "node %+q is already a member of the cluster; remove it first to rejoin", node.GetNodeId())
	}
	for _, other := range s.sortedNodes() { // sorted: the message must not depend on map order
		if other.GetRaftAddr() == node.GetRaftAddr() {
			return failf(codeExists, "raft address %+q is already used by node %+q", node.GetRaftAddr(), other.GetNodeId())
		}
		if node.GetApiAddr() != "" && other.GetApiAddr() == node.GetApiAddr() {
			return failf(codeExists, "API address %+q is already used by node %+q", node.GetApiAddr(), other.GetNodeId())
		}
	}

	used := proto.CloneOf(tok)
	used.UsedByNode = node.GetNodeId()
	s.tokens[used.GetTokenId()] = used
	// node.Voter is the proposer's choice: false admits a non-voter (read
	// replica). Every ADMIT_NODE written before non-voters existed set it.
	node.JoinedUnixNano = c.time
	s.nodes[node.GetNodeId()] = node
	return &fsmpb.Result{Node: node}
}

func (s *State) applyRemoveNode(c *cmdContext, p *fsmpb.RemoveNode) *fsmpb.Result {
	id := p.GetNodeId()
	if id == "" {
		return failf(codeInvalid, "node id is required")
	}
	node, ok := s.nodes[id]
	if !ok {
		return failf(codeNotFound, "node %+q is not a member of the cluster", truncate(id))
	}
	delete(s.nodes, id)
	s.markGossipKeyRotationDue()
	s.forgetKEKHolder(id)
	s.settleRetiredKEKs(c.time)
	return &fsmpb.Result{Node: node}
}

func (s *State) applyNoop(*cmdContext, *fsmpb.Noop) *fsmpb.Result {
	return &fsmpb.Result{}
}

// truncate bounds caller-supplied strings echoed in messages (always through
// %+q, whose ASCII-only output does not depend on the Go release's Unicode
// tables, so every node words a message identically).
func truncate(s string) string {
	const limit = 64
	if len(s) <= limit {
		return s
	}
	return s[:limit] + "..."
}
