package transport

import (
	"context"
	"crypto/x509"
	"fmt"
	"sort"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/keyops"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

// Per-key authorization for plain principals, grants, the deny list and
// certificate issuance.

var grantOpNames = map[string]fsmpb.GrantOperation{
	"encrypt":           fsmpb.GrantOperation_GRANT_OPERATION_ENCRYPT,
	"decrypt":           fsmpb.GrantOperation_GRANT_OPERATION_DECRYPT,
	"re-encrypt":        fsmpb.GrantOperation_GRANT_OPERATION_RE_ENCRYPT,
	"generate-data-key": fsmpb.GrantOperation_GRANT_OPERATION_GENERATE_DATA_KEY,
	"sign":              fsmpb.GrantOperation_GRANT_OPERATION_SIGN,
	"verify":            fsmpb.GrantOperation_GRANT_OPERATION_VERIFY,
	"generate-mac":      fsmpb.GrantOperation_GRANT_OPERATION_GENERATE_MAC,
	"verify-mac":        fsmpb.GrantOperation_GRANT_OPERATION_VERIFY_MAC,
	"describe":          fsmpb.GrantOperation_GRANT_OPERATION_DESCRIBE,
}

func grantOpName(op fsmpb.GrantOperation) string {
	for n, o := range grantOpNames {
		if o == op {
			return n
		}
	}
	return op.String()
}

// authorizeKey decides whether the caller may perform one of ops with key k
// and this encryption context. Admins may use every key; a plain principal
// needs a grant on k for the operation whose context constraint the request
// meets; other roles may not use keys.
func (s *Server) authorizeKey(ctx context.Context, k *fsmpb.KeyRecord, encCtx map[string]string, ops ...fsmpb.GrantOperation) error {
	noteKey(ctx, k.GetKeyId(), 0)
	id, ok := IdentityFrom(ctx)
	if !ok {
		return status.Error(codes.Unauthenticated, "a client certificate is required")
	}
	if id.Role == roleAdmin {
		return nil
	}
	if id.Role == roleClient {
		for _, g := range s.cfg.State.GrantsFor(k.GetKeyId(), id.Name) {
			if grantAllows(g, encCtx, ops) {
				return nil
			}
		}
	}
	var names []string
	for _, op := range ops {
		names = append(names, grantOpName(op))
	}
	return status.Errorf(codes.PermissionDenied, "%s has no grant to %s with key %s (or the grant's encryption context constraint is not met); an admin can add one with `cabinet key grant`",
		id.Name, strings.Join(names, " or "), k.GetKeyId())
}

func grantAllows(g *fsmpb.Grant, encCtx map[string]string, ops []fsmpb.GrantOperation) bool {
	has := false
	for _, gop := range g.GetOperations() {
		for _, op := range ops {
			if gop == op {
				has = true
			}
		}
	}
	if !has {
		return false
	}
	for k, v := range g.GetEncryptionContextEquals() {
		if got, ok := encCtx[k]; !ok || got != v {
			return false
		}
	}
	return true
}

func grantToAPI(g *fsmpb.Grant) *cabinetpb.Grant {
	if g == nil {
		return nil
	}
	out := &cabinetpb.Grant{GrantId: g.GetGrantId(), KeyId: g.GetKeyId(), Principal: g.GetPrincipal(),
		EncryptionContextEquals: g.GetEncryptionContextEquals(), CreatedAt: ts(g.GetCreatedUnixNano()), CreatedBy: g.GetCreatedBy()}
	for _, op := range g.GetOperations() {
		out.Operations = append(out.Operations, grantOpName(op))
	}
	return out
}

func (s *Server) CreateGrant(ctx context.Context, req *cabinetpb.CreateGrantRequest) (*cabinetpb.GrantResponse, error) {
	if req.GetPrincipal() == "" || len(req.GetOperations()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "principal and at least one operation are required")
	}
	var ops []fsmpb.GrantOperation
	for _, o := range req.GetOperations() {
		op, ok := grantOpNames[strings.ToLower(strings.TrimSpace(o))]
		if !ok {
			var valid []string
			for n := range grantOpNames {
				valid = append(valid, n)
			}
			sort.Strings(valid)
			return nil, status.Errorf(codes.InvalidArgument, "unknown operation %q; one of %s", o, strings.Join(valid, ", "))
		}
		ops = append(ops, op)
	}
	k, err := s.lookupKey(ctx, req.GetKeyId())
	if err != nil {
		return nil, err
	}
	noteKey(ctx, k.GetKeyId(), 0)
	gid, err := keyops.NewKeyID()
	if err != nil {
		return nil, toStatus(err)
	}
	gid = "g-" + strings.TrimPrefix(gid, "k-")
	res, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_CREATE_GRANT, &fsmpb.CreateGrant{Grant: &fsmpb.Grant{
		GrantId: gid, KeyId: k.GetKeyId(), Principal: req.GetPrincipal(), Operations: ops, EncryptionContextEquals: req.GetEncryptionContextEquals(),
	}}, requestID(ctx, req.GetRequestId()), principal(ctx))
	if err != nil {
		return nil, err
	}
	return &cabinetpb.GrantResponse{Grant: grantToAPI(res.GetGrant())}, nil
}

func (s *Server) RevokeGrant(ctx context.Context, req *cabinetpb.RevokeGrantRequest) (*cabinetpb.RevokeGrantResponse, error) {
	if req.GetGrantId() == "" {
		return nil, status.Error(codes.InvalidArgument, "grant_id is required (see `cabinet key grants`)")
	}
	res, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_REVOKE_GRANT, &fsmpb.RevokeGrant{GrantId: req.GetGrantId()},
		requestID(ctx, req.GetRequestId()), principal(ctx))
	if err != nil {
		return nil, err
	}
	noteKey(ctx, res.GetGrant().GetKeyId(), 0)
	return &cabinetpb.RevokeGrantResponse{}, nil
}

func (s *Server) ListGrants(ctx context.Context, req *cabinetpb.ListGrantsRequest) (*cabinetpb.ListGrantsResponse, error) {
	keyID := ""
	if req.GetKeyId() != "" {
		k, err := s.lookupKey(ctx, req.GetKeyId())
		if err != nil {
			return nil, err
		}
		keyID = k.GetKeyId()
	}
	out := &cabinetpb.ListGrantsResponse{}
	for _, g := range s.cfg.State.Grants(keyID, req.GetPrincipal()) {
		out.Grants = append(out.Grants, grantToAPI(g))
	}
	return out, nil
}

func (s *Server) DenyPrincipal(ctx context.Context, req *cabinetpb.DenyPrincipalRequest) (*cabinetpb.DenyPrincipalResponse, error) {
	if req.GetPrincipal() == "" {
		return nil, status.Error(codes.InvalidArgument, "principal is required (the certificate's common name)")
	}
	if _, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_DENY_PRINCIPAL, &fsmpb.DenyPrincipal{Principal: req.GetPrincipal(), Reason: req.GetReason()},
		requestID(ctx, req.GetRequestId()), principal(ctx)); err != nil {
		return nil, err
	}
	return &cabinetpb.DenyPrincipalResponse{}, nil
}

func (s *Server) AllowPrincipal(ctx context.Context, req *cabinetpb.AllowPrincipalRequest) (*cabinetpb.AllowPrincipalResponse, error) {
	if req.GetPrincipal() == "" {
		return nil, status.Error(codes.InvalidArgument, "principal is required")
	}
	if _, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_ALLOW_PRINCIPAL, &fsmpb.AllowPrincipal{Principal: req.GetPrincipal()},
		requestID(ctx, req.GetRequestId()), principal(ctx)); err != nil {
		return nil, err
	}
	return &cabinetpb.AllowPrincipalResponse{}, nil
}

func (s *Server) ListDeniedPrincipals(ctx context.Context, _ *cabinetpb.ListDeniedPrincipalsRequest) (*cabinetpb.ListDeniedPrincipalsResponse, error) {
	out := &cabinetpb.ListDeniedPrincipalsResponse{}
	for _, d := range s.cfg.State.DeniedPrincipals() {
		out.Principals = append(out.Principals, &cabinetpb.DeniedPrincipal{Principal: d.GetPrincipal(), Reason: d.GetReason(),
			DeniedAt: ts(d.GetDeniedUnixNano()), DeniedBy: d.GetDeniedBy()})
	}
	return out, nil
}

// IssueCertificate signs a client CSR with the cluster CA, whose key this
// node's HSM unseals for the moment it takes.
func (s *Server) IssueCertificate(ctx context.Context, req *cabinetpb.IssueCertificateRequest) (*cabinetpb.IssueCertificateResponse, error) {
	switch req.GetRole() {
	case roleAdmin, roleOperator, roleClient:
	default:
		return nil, status.Errorf(codes.InvalidArgument, "role must be admin, operator or client, not %q", req.GetRole())
	}
	ci := s.cfg.State.Cluster()
	if ci == nil {
		return nil, status.Error(codes.Unavailable, "the cluster is not initialised yet")
	}
	if _, err := x509.ParseCertificateRequest(req.GetCsrDer()); err != nil {
		return nil, status.Error(codes.InvalidArgument, "csr_der is not a PKCS#10 certificate request")
	}
	caKey, err := s.cfg.HSM.Open(ctx, ci.GetCaKey().GetKekVersion(), ci.GetCaKey().GetBlob(), CAKeyAAD(ci.GetClusterId()))
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "this node's HSM could not unseal the cluster CA key: %v", err)
	}
	ca, err := tlsutil.LoadCA(ci.GetCaCertDer(), caKey)
	clear(caKey)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "load cluster CA: %v", err)
	}
	der, err := ca.IssueClientCSR(req.GetCsrDer(), req.GetName(), req.GetRole(), s.cfg.Clock())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "parse issued certificate: %v", err)
	}
	s.log.Info("issued client certificate", "name", req.GetName(), "role", req.GetRole(), "by", principal(ctx), "serial", fmt.Sprintf("%x", cert.SerialNumber))
	return &cabinetpb.IssueCertificateResponse{CertDer: der, CaCertDer: ci.GetCaCertDer(), NotAfter: timestamppb.New(cert.NotAfter)}, nil
}
