package keyops

import (
	"errors"
	"strings"
	"testing"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

func ruleKey(state fsmpb.KeyState) *fsmpb.KeyRecord {
	enabled := fsmpb.KeyVersionState_KEY_VERSION_STATE_ENABLED
	return &fsmpb.KeyRecord{
		KeyId: "k-rules", Spec: fsmpb.KeySpec_KEY_SPEC_AES_256, Usage: fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT,
		State: state, PrimaryVersion: 2,
		Versions: []*fsmpb.KeyVersion{
			{Version: 1, State: enabled},
			{Version: 2, State: enabled},
			{Version: 3, State: fsmpb.KeyVersionState_KEY_VERSION_STATE_DISABLED},
			{Version: 4, State: fsmpb.KeyVersionState_KEY_VERSION_STATE_DESTROYED},
			{Version: 5, State: fsmpb.KeyVersionState_KEY_VERSION_STATE_UNSPECIFIED},
		},
	}
}

// TestCheckOperationKeyStates covers every KeyState x operation on the
// primary version.
func TestCheckOperationKeyStates(t *testing.T) {
	ops := []Operation{OpEncrypt, OpDecrypt, OpGenerateDataKey}
	// allowed[state] lists the operations allowed in that state.
	allowed := map[fsmpb.KeyState][]Operation{
		fsmpb.KeyState_KEY_STATE_ACTIVE:      ops,
		fsmpb.KeyState_KEY_STATE_DEACTIVATED: {OpDecrypt},
	}
	// hint is what the message must tell the user.
	hint := map[fsmpb.KeyState]string{
		fsmpb.KeyState_KEY_STATE_UNSPECIFIED:         "KEY_STATE_UNSPECIFIED",
		fsmpb.KeyState_KEY_STATE_DISABLED:            "is DISABLED; enable it",
		fsmpb.KeyState_KEY_STATE_DEACTIVATED:         "is DEACTIVATED",
		fsmpb.KeyState_KEY_STATE_COMPROMISED:         "is COMPROMISED",
		fsmpb.KeyState_KEY_STATE_PENDING_DESTRUCTION: "cancel the scheduled destruction",
		fsmpb.KeyState_KEY_STATE_DESTROYED:           "is DESTROYED",
	}
	for sv := range fsmpb.KeyState_name {
		state := fsmpb.KeyState(sv)
		for _, op := range ops {
			t.Run(state.String()+"/"+op.String(), func(t *testing.T) {
				err := CheckOperation(ruleKey(state), 2, op, false)
				ok := false
				for _, a := range allowed[state] {
					ok = ok || a == op
				}
				if ok {
					wantErr(t, err, nil)
					return
				}
				wantErr(t, err, ErrKeyState)
				if !strings.Contains(err.Error(), "k-rules") || !strings.Contains(err.Error(), hint[state]) {
					t.Errorf("message %q should name the key and say %q", err, hint[state])
				}
			})
		}
	}
	// Unknown future states are refused too.
	wantErr(t, CheckOperation(ruleKey(fsmpb.KeyState(99)), 2, OpDecrypt, false), ErrKeyState)
}

func TestCheckOperationVersions(t *testing.T) {
	tests := []struct {
		name    string
		version uint32
		op      Operation
		want    error
	}{
		{"decrypt old enabled version", 1, OpDecrypt, nil},
		{"decrypt primary", 2, OpDecrypt, nil},
		{"encrypt primary", 2, OpEncrypt, nil},
		{"encrypt non-primary", 1, OpEncrypt, ErrKeyState},
		{"data key non-primary", 1, OpGenerateDataKey, ErrKeyState},
		{"decrypt disabled version", 3, OpDecrypt, ErrKeyState},
		{"decrypt destroyed version", 4, OpDecrypt, ErrKeyState},
		{"decrypt unspecified version state", 5, OpDecrypt, ErrKeyState},
		{"decrypt missing version", 9, OpDecrypt, ErrVersionNotFound},
		{"encrypt missing version", 9, OpEncrypt, ErrVersionNotFound},
		{"version zero", 0, OpDecrypt, ErrVersionNotFound},
		{"unknown operation", 2, Operation(99), ErrInvalidArgument},
		{"unspecified operation", 2, OpUnspecified, ErrInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wantErr(t, CheckOperation(ruleKey(fsmpb.KeyState_KEY_STATE_ACTIVE), tt.version, tt.op, false), tt.want)
		})
	}
	// A primary version that is disabled blocks encryption.
	k := ruleKey(fsmpb.KeyState_KEY_STATE_ACTIVE)
	k.PrimaryVersion = 3
	wantErr(t, CheckOperation(k, 3, OpEncrypt, false), ErrKeyState)
	// A key with no primary version.
	k.PrimaryVersion = 0
	wantErr(t, CheckOperation(k, k.PrimaryVersion, OpEncrypt, false), ErrVersionNotFound)
	wantErr(t, CheckOperation(nil, 1, OpDecrypt, false), ErrKeyNotFound)
}

func TestCheckOperationUsage(t *testing.T) {
	for _, usage := range []fsmpb.KeyUsage{
		fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY,
		fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC,
		fsmpb.KeyUsage_KEY_USAGE_UNSPECIFIED,
	} {
		for _, op := range []Operation{OpEncrypt, OpDecrypt, OpGenerateDataKey} {
			k := ruleKey(fsmpb.KeyState_KEY_STATE_ACTIVE)
			k.Usage = usage
			err := CheckOperation(k, 2, op, false)
			wantErr(t, err, ErrInvalidArgument)
			if errors.Is(err, ErrKeyState) || !strings.Contains(err.Error(), "ENCRYPT_DECRYPT") {
				t.Errorf("%s with %s: %v", op, usage, err)
			}
		}
	}
}
