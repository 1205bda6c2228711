package transport

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/keyops"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// Lifecycle writes. Each resolves the key (id or alias) on this replica,
// builds the command and proposes it through the leader; the FSM decides
// whether the transition is allowed (one place, identical on every node).

// keyWrite proposes build(key) for the key named by ref.
func (s *Server) keyWrite(ctx context.Context, ref, reqID string, typ fsmpb.CommandType, build func(k *fsmpb.KeyRecord) (proto.Message, error)) (*cabinetpb.KeyResponse, error) {
	k, err := s.lookupKey(ctx, ref)
	if err != nil {
		return nil, err
	}
	noteKey(ctx, k.GetKeyId(), 0)
	payload, err := build(k)
	if err != nil {
		return nil, err
	}
	res, err := s.propose(ctx, typ, payload, requestID(ctx, reqID), principal(ctx))
	if err != nil {
		return nil, err
	}
	return &cabinetpb.KeyResponse{Key: keyToAPI(res.GetKey())}, nil
}

func (s *Server) UpdateKey(ctx context.Context, req *cabinetpb.UpdateKeyRequest) (*cabinetpb.KeyResponse, error) {
	if req.Description == nil && !req.GetReplaceTags() {
		return nil, status.Error(codes.InvalidArgument, "nothing to update: give a description and/or replace_tags with tags")
	}
	return s.keyWrite(ctx, req.GetKeyId(), req.GetRequestId(), fsmpb.CommandType_COMMAND_TYPE_UPDATE_KEY, func(k *fsmpb.KeyRecord) (proto.Message, error) {
		return &fsmpb.UpdateKey{KeyId: k.GetKeyId(), SetDescription: req.Description != nil, Description: req.GetDescription(),
			ReplaceTags: req.GetReplaceTags(), Tags: req.GetTags()}, nil
	})
}

func (s *Server) SetAlias(ctx context.Context, req *cabinetpb.SetAliasRequest) (*cabinetpb.KeyResponse, error) {
	if req.GetAlias() == "" {
		return nil, status.Error(codes.InvalidArgument, "alias is required")
	}
	return s.keyWrite(ctx, req.GetKeyId(), req.GetRequestId(), fsmpb.CommandType_COMMAND_TYPE_SET_ALIAS, func(k *fsmpb.KeyRecord) (proto.Message, error) {
		return &fsmpb.SetAlias{Alias: req.GetAlias(), KeyId: k.GetKeyId()}, nil
	})
}

func (s *Server) DeleteAlias(ctx context.Context, req *cabinetpb.DeleteAliasRequest) (*cabinetpb.DeleteAliasResponse, error) {
	if req.GetAlias() == "" {
		return nil, status.Error(codes.InvalidArgument, "alias is required")
	}
	if _, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_DELETE_ALIAS, &fsmpb.DeleteAlias{Alias: req.GetAlias()},
		requestID(ctx, req.GetRequestId()), principal(ctx)); err != nil {
		return nil, err
	}
	return &cabinetpb.DeleteAliasResponse{}, nil
}

func (s *Server) setEnabled(ctx context.Context, req *cabinetpb.KeyRefRequest, enabled bool) (*cabinetpb.KeyResponse, error) {
	return s.keyWrite(ctx, req.GetKeyId(), req.GetRequestId(), fsmpb.CommandType_COMMAND_TYPE_SET_KEY_ENABLED, func(k *fsmpb.KeyRecord) (proto.Message, error) {
		return &fsmpb.SetKeyEnabled{KeyId: k.GetKeyId(), Enabled: enabled}, nil
	})
}

func (s *Server) EnableKey(ctx context.Context, req *cabinetpb.KeyRefRequest) (*cabinetpb.KeyResponse, error) {
	return s.setEnabled(ctx, req, true)
}

func (s *Server) DisableKey(ctx context.Context, req *cabinetpb.KeyRefRequest) (*cabinetpb.KeyResponse, error) {
	return s.setEnabled(ctx, req, false)
}

func (s *Server) RevokeKey(ctx context.Context, req *cabinetpb.RevokeKeyRequest) (*cabinetpb.KeyResponse, error) {
	var reason fsmpb.RevocationReason
	switch req.GetReason() {
	case cabinetpb.RevocationReason_SUPERSEDED:
		reason = fsmpb.RevocationReason_REVOCATION_REASON_SUPERSEDED
	case cabinetpb.RevocationReason_CEASED:
		reason = fsmpb.RevocationReason_REVOCATION_REASON_CEASED
	case cabinetpb.RevocationReason_KEY_COMPROMISE:
		reason = fsmpb.RevocationReason_REVOCATION_REASON_COMPROMISED
	default:
		return nil, status.Error(codes.InvalidArgument, "reason is required: SUPERSEDED or CEASED (key becomes DEACTIVATED: decrypt/verify only) or KEY_COMPROMISE (COMPROMISED: no use)")
	}
	return s.keyWrite(ctx, req.GetKeyId(), req.GetRequestId(), fsmpb.CommandType_COMMAND_TYPE_REVOKE_KEY, func(k *fsmpb.KeyRecord) (proto.Message, error) {
		return &fsmpb.RevokeKey{KeyId: k.GetKeyId(), Reason: reason, Comment: req.GetComment()}, nil
	})
}

// nextVersion is the number a rotation of k creates.
func nextVersion(k *fsmpb.KeyRecord) uint32 {
	var max uint32
	for _, v := range k.GetVersions() {
		if v.GetVersion() > max {
			max = v.GetVersion()
		}
	}
	return max + 1
}

// rotateCommand builds a RotateKey for k with fresh material sealed by this
// node's HSM under the current KEK.
func (s *Server) rotateCommand(ctx context.Context, k *fsmpb.KeyRecord, automatic bool) (*fsmpb.RotateKey, error) {
	ci := s.cfg.State.Cluster()
	if ci == nil {
		return nil, status.Error(codes.Unavailable, "the cluster is not initialised yet")
	}
	v := nextVersion(k)
	blob, pub, err := s.cfg.Crypto.WrapNewMaterial(ctx, k.GetKeyId(), v, k.GetSpec(), ci.GetCurrentKekVersion())
	if err != nil {
		return nil, toStatus(err)
	}
	return &fsmpb.RotateKey{KeyId: k.GetKeyId(), Version: v, Material: blob, PublicKeyDer: pub, Automatic: automatic}, nil
}

// RotateKey adds a version. The version number is bound into the sealed
// material, so it is chosen here; when a concurrent rotation through another
// node took that number first, the FSM refuses ("already exists") and this
// node catches up and tries the next number. Attempt i is proposed under the
// request id base, base#1, base#2...: a client retrying with the same request
// id replays the same sequence and lands on the same outcome (exactly once).
func (s *Server) RotateKey(ctx context.Context, req *cabinetpb.KeyRefRequest) (*cabinetpb.KeyResponse, error) {
	k, err := s.lookupKey(ctx, req.GetKeyId())
	if err != nil {
		return nil, err
	}
	noteKey(ctx, k.GetKeyId(), 0)
	base := requestID(ctx, req.GetRequestId())
	const maxAttempts = 8
	for attempt := 0; ; attempt++ {
		// Optimistic: the first attempt uses this replica's view; only after
		// a conflict does the node catch up with the leader (a read-index
		// round trip) before choosing the next number.
		if attempt > 0 {
			if err := s.cfg.Cluster.CheckRead(ctx, true); err != nil {
				return nil, toStatus(err)
			}
		}
		cur, ok := s.cfg.State.Key(k.GetKeyId())
		if !ok {
			return nil, status.Errorf(codes.NotFound, "key %s no longer exists", k.GetKeyId())
		}
		cmd, err := s.rotateCommand(ctx, cur, false)
		if err != nil {
			return nil, err
		}
		reqID := base
		if attempt > 0 {
			reqID = fmt.Sprintf("%s#%d", base, attempt)
		}
		res, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_ROTATE_KEY, cmd, reqID, principal(ctx))
		if err != nil && attempt+1 < maxAttempts && status.Code(err) == codes.FailedPrecondition &&
			strings.Contains(status.Convert(err).Message(), "already exists on key") {
			continue // a concurrent rotation took this version number
		}
		if err != nil {
			return nil, err
		}
		noteKey(ctx, k.GetKeyId(), res.GetKey().GetPrimaryVersion())
		return &cabinetpb.KeyResponse{Key: keyToAPI(res.GetKey())}, nil
	}
}

func (s *Server) SetRotationPolicy(ctx context.Context, req *cabinetpb.SetRotationPolicyRequest) (*cabinetpb.KeyResponse, error) {
	if err := s.checkRotationPeriod(req.GetPeriodSeconds()); err != nil {
		return nil, err
	}
	return s.keyWrite(ctx, req.GetKeyId(), req.GetRequestId(), fsmpb.CommandType_COMMAND_TYPE_SET_ROTATION_POLICY, func(k *fsmpb.KeyRecord) (proto.Message, error) {
		return &fsmpb.SetRotationPolicy{KeyId: k.GetKeyId(), PeriodSeconds: req.GetPeriodSeconds()}, nil
	})
}

func (s *Server) checkRotationPeriod(sec int64) error {
	if sec < 0 {
		return status.Error(codes.InvalidArgument, "rotation period must be positive (or 0 to disable automatic rotation)")
	}
	if sec > 0 && time.Duration(sec)*time.Second < s.cfg.MinRotationPeriod {
		return status.Errorf(codes.InvalidArgument, "rotation period %v is below this cluster's minimum %v (server flag --min-rotation-period)",
			time.Duration(sec)*time.Second, s.cfg.MinRotationPeriod)
	}
	return nil
}

func (s *Server) SetKeyVersionState(ctx context.Context, req *cabinetpb.SetKeyVersionStateRequest) (*cabinetpb.KeyResponse, error) {
	st := fsmpb.KeyVersionState_KEY_VERSION_STATE_DISABLED
	if req.GetEnabled() {
		st = fsmpb.KeyVersionState_KEY_VERSION_STATE_ENABLED
	}
	return s.keyWrite(ctx, req.GetKeyId(), req.GetRequestId(), fsmpb.CommandType_COMMAND_TYPE_SET_VERSION_STATE, func(k *fsmpb.KeyRecord) (proto.Message, error) {
		return &fsmpb.SetVersionState{KeyId: k.GetKeyId(), Version: req.GetVersion(), State: st}, nil
	})
}

func (s *Server) SetMinDecryptionVersion(ctx context.Context, req *cabinetpb.SetMinDecryptionVersionRequest) (*cabinetpb.KeyResponse, error) {
	return s.keyWrite(ctx, req.GetKeyId(), req.GetRequestId(), fsmpb.CommandType_COMMAND_TYPE_SET_MIN_DECRYPTION_VERSION, func(k *fsmpb.KeyRecord) (proto.Message, error) {
		return &fsmpb.SetMinDecryptionVersion{KeyId: k.GetKeyId(), Version: req.GetVersion()}, nil
	})
}

// DefaultPendingWindow is the destruction waiting period when none is given.
const DefaultPendingWindow = 30 * 24 * time.Hour

func (s *Server) ScheduleKeyDestruction(ctx context.Context, req *cabinetpb.ScheduleKeyDestructionRequest) (*cabinetpb.KeyResponse, error) {
	w := time.Duration(req.GetPendingWindowSeconds()) * time.Second
	if req.GetPendingWindowSeconds() == 0 {
		w = DefaultPendingWindow
	}
	if w < s.cfg.MinPendingWindow || req.GetPendingWindowSeconds() < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "waiting period %v is below this cluster's minimum %v (server flag --min-pending-window)", w, s.cfg.MinPendingWindow)
	}
	return s.keyWrite(ctx, req.GetKeyId(), req.GetRequestId(), fsmpb.CommandType_COMMAND_TYPE_SCHEDULE_DESTRUCTION, func(k *fsmpb.KeyRecord) (proto.Message, error) {
		return &fsmpb.ScheduleDestruction{KeyId: k.GetKeyId(), PendingWindowSeconds: int64(w / time.Second)}, nil
	})
}

func (s *Server) CancelKeyDestruction(ctx context.Context, req *cabinetpb.KeyRefRequest) (*cabinetpb.KeyResponse, error) {
	return s.keyWrite(ctx, req.GetKeyId(), req.GetRequestId(), fsmpb.CommandType_COMMAND_TYPE_CANCEL_DESTRUCTION, func(k *fsmpb.KeyRecord) (proto.Message, error) {
		return &fsmpb.CancelDestruction{KeyId: k.GetKeyId()}, nil
	})
}

// ImportTokenTTL is how long import parameters stay usable.
const ImportTokenTTL = 24 * time.Hour

// WrappingAlgorithm is the only BYOK wrapping scheme.
const WrappingAlgorithm = "RSA_AES_KEY_WRAP_SHA_256"

func (s *Server) GetImportParameters(ctx context.Context, req *cabinetpb.GetImportParametersRequest) (*cabinetpb.GetImportParametersResponse, error) {
	spec := fsmpb.KeySpec(req.GetSpec())
	if spec == fsmpb.KeySpec_KEY_SPEC_UNSPECIFIED {
		return nil, status.Error(codes.InvalidArgument, "spec is required: the spec of the key material you will import")
	}
	ci := s.cfg.State.Cluster()
	if ci == nil {
		return nil, status.Error(codes.Unavailable, "the cluster is not initialised yet")
	}
	idb := make([]byte, 16)
	if _, err := rand.Read(idb); err != nil {
		return nil, toStatus(err)
	}
	tokenID := "it-" + hex.EncodeToString(idb)
	pub, sealed, err := s.cfg.Crypto.NewImportKeyPair(ctx, tokenID, ci.GetCurrentKekVersion())
	if err != nil {
		return nil, toStatus(err)
	}
	expires := s.cfg.Clock().Add(ImportTokenTTL)
	if _, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_CREATE_IMPORT_TOKEN, &fsmpb.CreateImportToken{
		TokenId: tokenID, PublicKeyDer: pub, PrivateKey: sealed, ExpiresUnixNano: expires.UnixNano(), Spec: spec,
	}, requestID(ctx, ""), principal(ctx)); err != nil {
		return nil, err
	}
	return &cabinetpb.GetImportParametersResponse{
		ImportToken: tokenID, PublicKeyDer: pub, PublicKeyPem: pemPublicKey(pub), ExpiresAt: timestamppb.New(expires),
		WrappingAlgorithm: WrappingAlgorithm, Spec: req.GetSpec(),
	}, nil
}

func (s *Server) ImportKey(ctx context.Context, req *cabinetpb.ImportKeyRequest) (*cabinetpb.KeyResponse, error) {
	tok, ok := s.cfg.State.ImportToken(req.GetImportToken())
	if !ok {
		if err := s.cfg.Cluster.CheckRead(ctx, true); err == nil {
			tok, ok = s.cfg.State.ImportToken(req.GetImportToken())
		}
	}
	if !ok || tok.GetPrivateKey() == nil {
		return nil, status.Error(codes.PermissionDenied, "import token is invalid, expired or already used: get new parameters with GetImportParameters")
	}
	spec := fsmpb.KeySpec(req.GetSpec())
	if spec == fsmpb.KeySpec_KEY_SPEC_UNSPECIFIED {
		spec = tok.GetSpec()
	}
	if spec != tok.GetSpec() {
		return nil, status.Errorf(codes.InvalidArgument, "the import token was issued for %s, not %s", tok.GetSpec(), spec)
	}
	ci := s.cfg.State.Cluster()
	material, err := s.cfg.Crypto.UnwrapImportedMaterial(ctx, tok.GetTokenId(), tok.GetPrivateKey(), req.GetWrappedMaterial())
	if err != nil {
		return nil, toStatus(err)
	}
	keyID, err := keyops.NewKeyID()
	if err != nil {
		clear(material)
		return nil, toStatus(err)
	}
	blob, pub, err := s.cfg.Crypto.SealImportedMaterial(ctx, keyID, 1, spec, ci.GetCurrentKekVersion(), material)
	clear(material)
	if err != nil {
		return nil, toStatus(err)
	}
	res, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_IMPORT_KEY, &fsmpb.ImportKey{
		TokenId: tok.GetTokenId(),
		Key: &fsmpb.CreateKey{KeyId: keyID, Spec: spec, Usage: fsmpb.KeyUsage(req.GetUsage()), Alias: req.GetAlias(),
			Description: req.GetDescription(), Tags: req.GetTags(), Material: blob, PublicKeyDer: pub},
	}, requestID(ctx, req.GetRequestId()), principal(ctx))
	if err != nil {
		return nil, err
	}
	return &cabinetpb.KeyResponse{Key: keyToAPI(res.GetKey())}, nil
}

func pemPublicKey(der []byte) string {
	if len(der) == 0 {
		return ""
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
}

// ProposeDue is the leader's periodic work (cluster.Node.RunLeaderLoop):
// rotate keys whose automatic rotation is due and destroy keys whose waiting
// period ended. Each proposal carries a deterministic request id and the FSM
// re-checks that the work is due, so a new leader repeating it is harmless.
func (s *Server) ProposeDue(ctx context.Context) {
	now := s.cfg.Clock().UnixNano()
	for _, k := range s.cfg.State.DueRotations(now, 100) {
		if ctx.Err() != nil {
			return
		}
		cmd, err := s.rotateCommand(ctx, k, true)
		if err != nil {
			s.log.Warn("automatic rotation: build", "key_id", k.GetKeyId(), "err", err)
			continue
		}
		reqID := fmt.Sprintf("scheduler/rotate/%s/%d", k.GetKeyId(), cmd.GetVersion())
		if _, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_ROTATE_KEY, cmd, reqID, "scheduler"); err != nil {
			s.log.Warn("automatic rotation", "key_id", k.GetKeyId(), "err", err)
			continue
		}
		s.log.Info("rotated key", "key_id", k.GetKeyId(), "version", cmd.GetVersion(), "automatic", true)
	}
	for _, k := range s.cfg.State.DueDestructions(now, 100) {
		if ctx.Err() != nil {
			return
		}
		reqID := "scheduler/destroy/" + k.GetKeyId()
		if _, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_DESTROY_KEY, &fsmpb.DestroyKey{KeyId: k.GetKeyId()}, reqID, "scheduler"); err != nil {
			s.log.Warn("scheduled destruction", "key_id", k.GetKeyId(), "err", err)
			continue
		}
		s.log.Info("destroyed key", "key_id", k.GetKeyId())
	}
}
