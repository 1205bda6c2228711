package keyops

import (
	"strings"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// Operation is a use of a key version that the state rules decide on.
type Operation int

// Operations. Values are not persisted anywhere; add new ones at the end.
const (
	OpUnspecified Operation = iota
	OpEncrypt
	OpDecrypt
	OpGenerateDataKey
	OpReEncryptFrom
	OpReEncryptTo
	OpSign
	OpVerify
	OpGenerateMac
	OpVerifyMac
	OpGetPublicKey
	opCount
)

// VersionRule says which versions of a key an operation may use.
type VersionRule int

const (
	// PrimaryOnly: operations that produce new ciphertexts, signatures or
	// MACs use only the key's primary version.
	PrimaryOnly VersionRule = iota + 1
	// EnabledAboveMin: operations that consume old output use any ENABLED
	// version >= the key's min_decryption_version.
	EnabledAboveMin
	// NotDestroyed: GetPublicKey serves any version that is not destroyed
	// (ENABLED or DISABLED): a public key is not secret, and clients may
	// hold old signatures or need it after a version was disabled.
	NotDestroyed
)

func (r VersionRule) String() string {
	switch r {
	case PrimaryOnly:
		return "primary version only"
	case EnabledAboveMin:
		return "any ENABLED version >= min_decryption_version"
	case NotDestroyed:
		return "any version not DESTROYED (ENABLED or DISABLED)"
	}
	return "none"
}

// Permission is one cell of the state matrix.
type Permission int

const (
	// Denied: the key state forbids the operation.
	Denied Permission = iota
	// Allowed: the key state allows it (the version rule still applies).
	Allowed
	// WithOverride: allowed only when the caller passes
	// allowCompromised (the API lets only administrators set it).
	WithOverride
)

func (p Permission) String() string {
	switch p {
	case Allowed:
		return "allowed"
	case WithOverride:
		return "admin override"
	}
	return "denied"
}

// opRule describes what an operation needs from a key and a version.
type opRule struct {
	name string
	// usage the key must have; KEY_USAGE_UNSPECIFIED means "any usage of
	// an asymmetric spec" (GetPublicKey).
	usage   fsmpb.KeyUsage
	version VersionRule
}

var opRules = [opCount]opRule{
	OpEncrypt:         {"Encrypt", fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, PrimaryOnly},
	OpDecrypt:         {"Decrypt", fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, EnabledAboveMin},
	OpGenerateDataKey: {"GenerateDataKey", fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, PrimaryOnly},
	OpReEncryptFrom:   {"ReEncryptFrom", fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, EnabledAboveMin},
	OpReEncryptTo:     {"ReEncryptTo", fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, PrimaryOnly},
	OpSign:            {"Sign", fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, PrimaryOnly},
	OpVerify:          {"Verify", fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, EnabledAboveMin},
	OpGenerateMac:     {"GenerateMac", fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC, PrimaryOnly},
	OpVerifyMac:       {"VerifyMac", fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC, EnabledAboveMin},
	OpGetPublicKey:    {"GetPublicKey", fsmpb.KeyUsage_KEY_USAGE_UNSPECIFIED, NotDestroyed},
}

// Cell shorthands for the matrix below.
const (
	no_ = Denied
	yes = Allowed
	ovr = WithOverride
)

// stateRow is one row of the matrix.
type stateRow struct {
	state fsmpb.KeyState
	// cells is indexed by Operation (index 0, OpUnspecified, is unused).
	cells [opCount]Permission
}

// matrix is THE state x operation table: the one place that says what a
// key state allows. Columns are in Operation order:
//
//	-, Encrypt, Decrypt, GenerateDataKey, ReEncryptFrom, ReEncryptTo, Sign, Verify, GenerateMac, VerifyMac, GetPublicKey
//
// Key states not listed (UNSPECIFIED, unknown future values) allow nothing.
var matrix = []stateRow{
	{fsmpb.KeyState_KEY_STATE_ACTIVE, [opCount]Permission{no_, yes, yes, yes, yes, yes, yes, yes, yes, yes, yes}},
	{fsmpb.KeyState_KEY_STATE_DISABLED, [opCount]Permission{no_, no_, no_, no_, no_, no_, no_, no_, no_, no_, no_}},
	{fsmpb.KeyState_KEY_STATE_DEACTIVATED, [opCount]Permission{no_, no_, yes, no_, yes, no_, no_, yes, no_, yes, yes}},
	{fsmpb.KeyState_KEY_STATE_COMPROMISED, [opCount]Permission{no_, no_, ovr, no_, ovr, no_, no_, ovr, no_, ovr, no_}},
	{fsmpb.KeyState_KEY_STATE_PENDING_DESTRUCTION, [opCount]Permission{no_, no_, no_, no_, no_, no_, no_, no_, no_, no_, no_}},
	{fsmpb.KeyState_KEY_STATE_DESTROYED, [opCount]Permission{no_, no_, no_, no_, no_, no_, no_, no_, no_, no_, no_}},
}

func (op Operation) String() string {
	if op > OpUnspecified && op < opCount {
		return opRules[op].name
	}
	return "Unspecified"
}

// Usage is the key usage op needs (KEY_USAGE_UNSPECIFIED for
// GetPublicKey, which needs an asymmetric spec instead).
func (op Operation) Usage() fsmpb.KeyUsage {
	if op > OpUnspecified && op < opCount {
		return opRules[op].usage
	}
	return fsmpb.KeyUsage_KEY_USAGE_UNSPECIFIED
}

// VersionRule is the rule that picks the versions op may use.
func (op Operation) VersionRule() VersionRule {
	if op > OpUnspecified && op < opCount {
		return opRules[op].version
	}
	return 0
}

// StateMatrix is a copy of the state x operation table for rendering
// (docs/KEY-STATES.md is generated from it).
type StateMatrix struct {
	// Ops are the columns, in Operation order.
	Ops []Operation
	// Rows are the key states, each with one Permission per column.
	Rows []StateMatrixRow
}

// StateMatrixRow is one key state's row.
type StateMatrixRow struct {
	State fsmpb.KeyState
	Cells []Permission
}

// Matrix returns the state x operation table CheckOperation applies.
func Matrix() StateMatrix {
	var m StateMatrix
	for op := OpUnspecified + 1; op < opCount; op++ {
		m.Ops = append(m.Ops, op)
	}
	for _, r := range matrix {
		m.Rows = append(m.Rows, StateMatrixRow{State: r.state, Cells: append([]Permission(nil), r.cells[1:]...)})
	}
	return m
}

func permission(state fsmpb.KeyState, op Operation) Permission {
	for i := range matrix {
		if matrix[i].state == state {
			return matrix[i].cells[op]
		}
	}
	return Denied
}

// CheckOperation is the single place that decides whether version of key
// may perform op now (version is explicit here; 0 is never a version).
// In order:
//
//  1. op is known; key is not nil (ErrKeyNotFound);
//  2. usage gate: the key's usage is the one op needs and fits its spec
//     (GetPublicKey: the spec is asymmetric) — ErrInvalidArgument;
//  3. the key state allows op (the matrix; WithOverride cells only when
//     allowCompromised) — ErrKeyState naming the state and the remedy;
//  4. the version exists (ErrVersionNotFound);
//  5. the version rule: the primary for producing ops, or >=
//     min_decryption_version for consuming ops — ErrKeyState;
//  6. the version is ENABLED (GetPublicKey: not DESTROYED) — ErrKeyState.
func CheckOperation(key *fsmpb.KeyRecord, version uint32, op Operation, allowCompromised bool) error {
	if op <= OpUnspecified || op >= opCount {
		return newErr(ErrInvalidArgument, "unknown key operation %d", int(op))
	}
	if key == nil {
		return newErr(ErrKeyNotFound, "key not found")
	}
	rule := opRules[op]
	if err := checkUsage(key, rule); err != nil {
		return err
	}
	if err := checkKeyState(key, op, allowCompromised); err != nil {
		return err
	}
	id := key.GetKeyId()
	if version == 0 {
		return newErr(ErrVersionNotFound, "key %s has no primary version", id)
	}
	v := findVersion(key, version)
	if v == nil {
		return newErr(ErrVersionNotFound, "key %s has no version %d", id, version)
	}
	switch rule.version {
	case PrimaryOnly:
		if version != key.GetPrimaryVersion() {
			return newErr(ErrKeyState, "version %d of key %s is not its primary version (%d); %s uses only the primary version",
				version, id, key.GetPrimaryVersion(), rule.name)
		}
	case EnabledAboveMin:
		if minV := key.GetMinDecryptionVersion(); version < minV {
			return newErr(ErrKeyState, "version %d is below the key's minimum decryption version %d: key %s no longer allows %s with it",
				version, minV, id, rule.name)
		}
	}
	switch v.GetState() {
	case fsmpb.KeyVersionState_KEY_VERSION_STATE_ENABLED:
		return nil
	case fsmpb.KeyVersionState_KEY_VERSION_STATE_DISABLED:
		if rule.version == NotDestroyed {
			return nil
		}
		return newErr(ErrKeyState, "version %d of key %s is DISABLED; enable the version to use it", version, id)
	case fsmpb.KeyVersionState_KEY_VERSION_STATE_DESTROYED:
		return newErr(ErrKeyState, "version %d of key %s is DESTROYED; its material is gone and it can no longer be used", version, id)
	default:
		return newErr(ErrKeyState, "version %d of key %s is in state %s; it cannot be used", version, id, v.GetState())
	}
}

func checkUsage(key *fsmpb.KeyRecord, rule opRule) error {
	id, usage, spec := key.GetKeyId(), key.GetUsage(), key.GetSpec()
	if rule.usage == fsmpb.KeyUsage_KEY_USAGE_UNSPECIFIED {
		if !IsAsymmetric(spec) {
			return newErr(ErrInvalidArgument, "key %s has spec %s; %s needs an asymmetric key (RSA, EC or Ed25519)", id, specName(spec), rule.name)
		}
	} else if usage != rule.usage {
		return newErr(ErrInvalidArgument, "key %s has usage %s; %s needs a key with usage %s",
			id, usageName(usage), rule.name, usageName(rule.usage))
	}
	if !SpecAllowsUsage(spec, usage) {
		return newErr(ErrInvalidArgument, "key %s has spec %s and usage %s, which do not go together; it cannot be used",
			id, specName(spec), usageName(usage))
	}
	return nil
}

func checkKeyState(key *fsmpb.KeyRecord, op Operation, allowCompromised bool) error {
	state := key.GetState()
	switch p := permission(state, op); {
	case p == Allowed, p == WithOverride && allowCompromised:
		return nil
	}
	id, name := key.GetKeyId(), op.String()
	switch state {
	case fsmpb.KeyState_KEY_STATE_DEACTIVATED:
		return newErr(ErrKeyState, "key %s is DEACTIVATED (revoked); it can still decrypt and verify, but %s needs an active key: use or create another key", id, name)
	case fsmpb.KeyState_KEY_STATE_DISABLED:
		return newErr(ErrKeyState, "key %s is DISABLED; enable it to use it", id)
	case fsmpb.KeyState_KEY_STATE_PENDING_DESTRUCTION:
		return newErr(ErrKeyState, "key %s is PENDING_DESTRUCTION; cancel the scheduled destruction to use it", id)
	case fsmpb.KeyState_KEY_STATE_DESTROYED:
		return newErr(ErrKeyState, "key %s is DESTROYED; destroyed keys cannot be used", id)
	case fsmpb.KeyState_KEY_STATE_COMPROMISED:
		if permission(state, op) == WithOverride {
			return newErr(ErrKeyState, "key %s is COMPROMISED (revoked); %s with it needs an administrator's explicit override for recovery", id, name)
		}
		return newErr(ErrKeyState, "key %s is COMPROMISED (revoked); it cannot be used for %s: recover data with an administrator's override and move it to another key", id, name)
	default:
		return newErr(ErrKeyState, "key %s is in state %s; it cannot be used", id, state)
	}
}

func findVersion(key *fsmpb.KeyRecord, version uint32) *fsmpb.KeyVersion {
	for _, v := range key.GetVersions() {
		if v.GetVersion() == version {
			return v
		}
	}
	return nil
}

// resolveVersion maps version 0 to the key's primary version.
func resolveVersion(key *fsmpb.KeyRecord, version uint32) uint32 {
	if version == 0 {
		return key.GetPrimaryVersion()
	}
	return version
}

func usageName(u fsmpb.KeyUsage) string {
	return strings.TrimPrefix(u.String(), "KEY_USAGE_")
}

func specName(s fsmpb.KeySpec) string {
	return strings.TrimPrefix(s.String(), "KEY_SPEC_")
}

// stateName is a key state without its enum prefix.
func stateName(s fsmpb.KeyState) string {
	return strings.TrimPrefix(s.String(), "KEY_STATE_")
}
