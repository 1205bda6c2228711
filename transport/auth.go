package transport

import (
	"context"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/transport/audit"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

type identityKey struct{}

// IdentityFrom returns the authenticated caller of a request.
func IdentityFrom(ctx context.Context) (tlsutil.Identity, bool) {
	id, ok := ctx.Value(identityKey{}).(tlsutil.Identity)
	return id, ok
}

// methodPolicy says who may call a method. Default deny: a method missing
// from the table is refused for everyone, and so is a role not listed.
type methodPolicy struct {
	noCert bool     // callable without a client certificate (Join, health)
	roles  []string // roles allowed
}

const (
	roleAdmin    = tlsutil.RoleAdmin
	roleOperator = tlsutil.RoleOperator
	roleClient   = tlsutil.RoleClient
	roleNode     = tlsutil.RoleNode
)

// keyUseMethods are the KeyService methods a plain principal (role client)
// may call; the handler then requires a per-key grant for the operation.
var keyUseMethods = map[string]bool{
	"Encrypt": true, "Decrypt": true, "GenerateDataKey": true, "GenerateDataKeyWithoutPlaintext": true,
	"ReEncrypt": true, "BatchEncrypt": true, "BatchDecrypt": true, "BatchReEncrypt": true,
	"Sign": true, "Verify": true, "GenerateMac": true, "VerifyMac": true,
	"DescribeKey": true, "GetPublicKey": true, "GenerateRandom": true,
}

// policies: who may call what.
//   - admin: key lifecycle, grants, cluster; admins may also use every key.
//   - operator: cluster operations only (status, peers, join tokens, audit).
//   - client (plain principal): only key operations its grants allow.
//   - node: node-to-node methods, and status for list-peers.
var policies = buildPolicies()

func buildPolicies() map[string]methodPolicy {
	p := map[string]methodPolicy{
		cabinetpb.OperatorService_Status_FullMethodName:                  {roles: []string{roleAdmin, roleOperator, roleNode}},
		cabinetpb.OperatorService_ListPeers_FullMethodName:               {roles: []string{roleAdmin, roleOperator}},
		cabinetpb.OperatorService_CreateJoinToken_FullMethodName:         {roles: []string{roleAdmin, roleOperator}},
		cabinetpb.OperatorService_RemovePeer_FullMethodName:              {roles: []string{roleAdmin, roleOperator, roleNode}}, // node: a follower relaying to the leader
		cabinetpb.OperatorService_TransferLeadership_FullMethodName:      {roles: []string{roleAdmin, roleOperator, roleNode}}, // node: a follower relaying to the leader
		cabinetpb.OperatorService_Join_FullMethodName:                    {noCert: true},
		cabinetpb.OperatorService_IssueCertificate_FullMethodName:        {roles: []string{roleAdmin}},
		cabinetpb.OperatorService_DenyPrincipal_FullMethodName:           {roles: []string{roleAdmin}},
		cabinetpb.OperatorService_AllowPrincipal_FullMethodName:          {roles: []string{roleAdmin}},
		cabinetpb.OperatorService_ListDeniedPrincipals_FullMethodName:    {roles: []string{roleAdmin, roleOperator}},
		cabinetpb.OperatorService_AuditTail_FullMethodName:               {roles: []string{roleAdmin, roleOperator}},
		cabinetpb.OperatorService_AuditVerify_FullMethodName:             {roles: []string{roleAdmin, roleOperator}},
		cabinetpb.OperatorService_Echo_FullMethodName:                    {roles: []string{roleAdmin, roleOperator, roleClient}},
		cabinetpb.OperatorService_ApplyNoop_FullMethodName:               {roles: []string{roleAdmin}},
		cabinetpb.OperatorService_SnapshotSave_FullMethodName:            {roles: []string{roleAdmin, roleNode}}, // node: a follower relaying to the leader
		cabinetpb.OperatorService_SnapshotRestore_FullMethodName:         {roles: []string{roleAdmin, roleNode}}, // node: a follower relaying to the leader
		cabinetpb.OperatorService_RecoveryExport_FullMethodName:          {roles: []string{roleAdmin}},
		cabinetpb.OperatorService_RotateKEK_FullMethodName:               {roles: []string{roleAdmin}},
		cabinetpb.OperatorService_RotateGossipKey_FullMethodName:         {roles: []string{roleAdmin}},
		cabinetpb.OperatorService_KEKStatus_FullMethodName:               {roles: []string{roleAdmin, roleOperator}},
		cabinetpb.NodeService_Apply_FullMethodName:                       {roles: []string{roleNode}},
		cabinetpb.NodeService_ReadIndex_FullMethodName:                   {roles: []string{roleNode}},
		cabinetpb.NodeService_AddPeer_FullMethodName:                     {roles: []string{roleNode}},
		"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo":      {roles: []string{roleAdmin, roleOperator}},
		"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": {roles: []string{roleAdmin, roleOperator}},
		"/grpc.health.v1.Health/Check":                                   {noCert: true},
		"/grpc.health.v1.Health/Watch":                                   {noCert: true},
	}
	for _, m := range cabinetpb.KeyService_ServiceDesc.Methods {
		roles := []string{roleAdmin}
		if keyUseMethods[m.MethodName] {
			roles = append(roles, roleClient)
		}
		p["/"+cabinetpb.KeyService_ServiceDesc.ServiceName+"/"+m.MethodName] = methodPolicy{roles: roles}
	}
	return p
}

// authorize authenticates the caller from its verified client certificate,
// applies the method policy and the cluster-wide deny list.
func (s *Server) authorize(ctx context.Context, method string) (context.Context, tlsutil.Identity, error) {
	id, hasCert := peerIdentity(ctx)
	if hasCert {
		ctx = context.WithValue(ctx, identityKey{}, id)
	}
	pol, ok := policies[method]
	if !ok {
		return ctx, id, status.Errorf(codes.PermissionDenied, "method %s is not allowed", method)
	}
	if pol.noCert {
		return ctx, id, nil
	}
	if !hasCert {
		return ctx, id, status.Error(codes.Unauthenticated,
			"a client certificate signed by the cluster CA is required: set CABINET_CLIENT_CERT and CABINET_CLIENT_KEY (make cluster prints them)")
	}
	if id.Role != roleNode && s.cfg.State != nil {
		if d, denied := s.cfg.State.Denied(id.Name); denied {
			return ctx, id, status.Errorf(codes.PermissionDenied, "principal %q is denied cluster-wide (%s); an admin can lift it with `cabinet operator allow %s`",
				id.Name, d.GetReason(), id.Name)
		}
	}
	for _, r := range pol.roles {
		if id.Role == r {
			if err := s.limiter.allow(id.Name); err != nil {
				return ctx, id, err
			}
			return ctx, id, nil
		}
	}
	return ctx, id, status.Errorf(codes.PermissionDenied, "%s (role %q) may not call %s; allowed roles: %s",
		id.Name, id.Role, shortMethod(method), strings.Join(pol.roles, ", "))
}

func shortMethod(full string) string {
	full = strings.TrimPrefix(full, "/")
	if i := strings.LastIndex(full, "."); i >= 0 {
		full = full[i+1:]
	}
	return full
}

func peerIdentity(ctx context.Context) (tlsutil.Identity, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.AuthInfo == nil {
		return tlsutil.Identity{}, false
	}
	ti, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(ti.State.VerifiedChains) == 0 || len(ti.State.VerifiedChains[0]) == 0 {
		return tlsutil.Identity{}, false
	}
	return tlsutil.IdentityFromCert(ti.State.VerifiedChains[0][0]), true
}

// auditNote collects what a handler learns (the key and version) for the
// request's audit record.
type auditNote struct {
	keyID   string
	version uint32
}

type auditNoteKey struct{}

// noteKey records the key (and version) a request used, for the audit.
func noteKey(ctx context.Context, keyID string, version uint32) {
	if n, ok := ctx.Value(auditNoteKey{}).(*auditNote); ok {
		if n.keyID == "" || n.keyID == keyID {
			n.keyID = keyID
			if version != 0 {
				n.version = version
			}
		}
	}
}

type requestIDer interface{ GetRequestId() string }

// unaryInterceptor: authenticate, authorize, audit (allowed or denied), and
// refuse to serve when the audit log cannot be written.
func (s *Server) unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	note := &auditNote{}
	ctx = context.WithValue(ctx, auditNoteKey{}, note)
	ctx, id, err := s.authorize(ctx, info.FullMethod)
	var resp any
	if err == nil && s.cfg.Audit != nil && !isHealthOrAudit(info.FullMethod) {
		if herr := s.cfg.Audit.Healthy(); herr != nil {
			err = status.Errorf(codes.Unavailable, "node %s cannot write its audit log and refuses requests rather than serve them unaudited: %v", s.cfg.NodeID, herr)
		}
	}
	if err == nil {
		resp, err = handler(ctx, req)
		// Aborted ("not the leader") tells a forwarding node to retry at the
		// new leader; to a client it means "try again or elsewhere".
		if status.Code(err) == codes.Aborted && !strings.HasPrefix(info.FullMethod, "/cabinet.v1.NodeService/") {
			err = status.Error(codes.Unavailable, status.Convert(err).Message())
		}
	}
	if aerr := s.audit(ctx, info.FullMethod, id, note, req, err); aerr != nil {
		return nil, aerr
	}
	return resp, err
}

func (s *Server) streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx, id, err := s.authorize(ss.Context(), info.FullMethod)
	if err == nil {
		err = handler(srv, &wrappedStream{ServerStream: ss, ctx: ctx})
	}
	if aerr := s.audit(ctx, info.FullMethod, id, &auditNote{}, nil, err); aerr != nil {
		return aerr
	}
	return err
}

// isHealthOrAudit: probes and reflection are not audited (they would drown
// the log); every Cabinet method is.
func isHealthOrAudit(method string) bool {
	return strings.HasPrefix(method, "/grpc.health.") || strings.HasPrefix(method, "/grpc.reflection.")
}

// audit appends the request's record; a failed write turns the answer into
// Unavailable (the node must not serve unaudited).
func (s *Server) audit(ctx context.Context, method string, id tlsutil.Identity, note *auditNote, req any, callErr error) error {
	if s.cfg.Audit == nil || isHealthOrAudit(method) {
		return nil
	}
	rec := audit.Record{
		Principal: id.Name, Role: id.Role, Operation: shortMethod(method),
		KeyID: note.keyID, KeyVersion: note.version, Outcome: "OK",
	}
	if rec.Principal == "" {
		rec.Principal = "anonymous"
	}
	if callErr != nil {
		rec.Outcome = status.Code(callErr).String()
	}
	if r, ok := req.(requestIDer); ok {
		rec.RequestID = r.GetRequestId()
	}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		rec.ClientAddr = p.Addr.String()
	}
	if _, err := s.cfg.Audit.Append(rec); err != nil {
		s.log.Error("audit log write failed; refusing requests", "err", err)
		return status.Errorf(codes.Unavailable, "node %s could not write its audit log and refuses to answer unaudited", s.cfg.NodeID)
	}
	return nil
}

type wrappedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (w *wrappedStream) Context() context.Context { return w.ctx }
