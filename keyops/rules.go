package keyops

import (
	"strings"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// Operation is a use of a key version that the state rules decide on.
type Operation int

// Operations. Values are not persisted anywhere; add new ones at the end
// (ReEncrypt, Sign, Verify, GenerateMac, VerifyMac come with later issues).
const (
	OpUnspecified Operation = iota
	OpEncrypt
	OpDecrypt
	OpGenerateDataKey
)

// opRule describes what an operation needs from a key and a version.
type opRule struct {
	name string
	// usage is the key usage the operation requires.
	usage fsmpb.KeyUsage
	// primaryOnly: only the key's primary version may be used (producing
	// new ciphertexts/signatures); otherwise any enabled version may
	// (consuming old ones).
	primaryOnly bool
	// whenDeactivated: still allowed after the key was revoked as
	// deactivated (decrypt/verify only).
	whenDeactivated bool
}

// opRules is the one table of per-operation requirements.
var opRules = map[Operation]opRule{
	OpEncrypt:         {name: "Encrypt", usage: fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, primaryOnly: true},
	OpDecrypt:         {name: "Decrypt", usage: fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, whenDeactivated: true},
	OpGenerateDataKey: {name: "GenerateDataKey", usage: fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT, primaryOnly: true},
}

func (op Operation) String() string {
	if r, ok := opRules[op]; ok {
		return r.name
	}
	return "Unspecified"
}

// CheckOperation is the single place that decides whether version of key may
// perform op now. It checks, in order: the operation is known, the key's
// usage fits the operation (ErrInvalidArgument), the key's state
// (ErrKeyState), that the version exists (ErrVersionNotFound), is the primary
// when the operation produces output (ErrKeyState) and is enabled
// (ErrKeyState).
func CheckOperation(key *fsmpb.KeyRecord, version uint32, op Operation) error {
	rule, ok := opRules[op]
	if !ok {
		return newErr(ErrInvalidArgument, "unknown key operation %d", int(op))
	}
	if key == nil {
		return newErr(ErrKeyNotFound, "key not found")
	}
	id := key.GetKeyId()
	if key.GetUsage() != rule.usage {
		return newErr(ErrInvalidArgument, "key %s has usage %s; %s needs a key with usage %s",
			id, usageName(key.GetUsage()), rule.name, usageName(rule.usage))
	}
	if err := checkKeyState(key, rule); err != nil {
		return err
	}
	if version == 0 {
		return newErr(ErrVersionNotFound, "key %s has no primary version", id)
	}
	v := findVersion(key, version)
	if v == nil {
		return newErr(ErrVersionNotFound, "key %s has no version %d", id, version)
	}
	if rule.primaryOnly && version != key.GetPrimaryVersion() {
		return newErr(ErrKeyState, "version %d of key %s is not its primary version (%d); %s uses only the primary version",
			version, id, key.GetPrimaryVersion(), rule.name)
	}
	switch v.GetState() {
	case fsmpb.KeyVersionState_KEY_VERSION_STATE_ENABLED:
		return nil
	case fsmpb.KeyVersionState_KEY_VERSION_STATE_DISABLED:
		return newErr(ErrKeyState, "version %d of key %s is DISABLED; enable the version to use it", version, id)
	case fsmpb.KeyVersionState_KEY_VERSION_STATE_DESTROYED:
		return newErr(ErrKeyState, "version %d of key %s is DESTROYED; its material is gone and data under it cannot be decrypted", version, id)
	default:
		return newErr(ErrKeyState, "version %d of key %s is in state %s; it cannot be used", version, id, v.GetState())
	}
}

func checkKeyState(key *fsmpb.KeyRecord, rule opRule) error {
	id := key.GetKeyId()
	switch key.GetState() {
	case fsmpb.KeyState_KEY_STATE_ACTIVE:
		return nil
	case fsmpb.KeyState_KEY_STATE_DEACTIVATED:
		if rule.whenDeactivated {
			return nil
		}
		return newErr(ErrKeyState, "key %s is DEACTIVATED (revoked); it can still decrypt and verify, but %s needs an active key: use or create another key", id, rule.name)
	case fsmpb.KeyState_KEY_STATE_DISABLED:
		return newErr(ErrKeyState, "key %s is DISABLED; enable it to use it", id)
	case fsmpb.KeyState_KEY_STATE_PENDING_DESTRUCTION:
		return newErr(ErrKeyState, "key %s is PENDING_DESTRUCTION; cancel the scheduled destruction to use it", id)
	case fsmpb.KeyState_KEY_STATE_DESTROYED:
		return newErr(ErrKeyState, "key %s is DESTROYED; its material is gone and it can no longer be used", id)
	case fsmpb.KeyState_KEY_STATE_COMPROMISED:
		return newErr(ErrKeyState, "key %s is COMPROMISED (revoked); it cannot be used: re-encrypt data under another key", id)
	default:
		return newErr(ErrKeyState, "key %s is in state %s; it cannot be used", id, key.GetState())
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

func usageName(u fsmpb.KeyUsage) string {
	return strings.TrimPrefix(u.String(), "KEY_USAGE_")
}

func specName(s fsmpb.KeySpec) string {
	return strings.TrimPrefix(s.String(), "KEY_SPEC_")
}
