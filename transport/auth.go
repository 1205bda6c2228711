package transport

import (
	"context"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

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
// from the table is refused for everyone.
type methodPolicy struct {
	noCert bool     // callable without a client certificate (Join only)
	roles  []string // roles allowed
}

var (
	adminOrNode = []string{tlsutil.RoleAdmin, tlsutil.RoleNode}
	nodeOnly    = []string{tlsutil.RoleNode}
)

// policies: roles beyond admin (grants for plain principals, the operator
// role) arrive with the authorization issue; until then only admins and
// nodes may call anything.
var policies = buildPolicies()

func buildPolicies() map[string]methodPolicy {
	p := map[string]methodPolicy{
		cabinetpb.OperatorService_Status_FullMethodName:                  {roles: adminOrNode},
		cabinetpb.OperatorService_ListPeers_FullMethodName:               {roles: adminOrNode},
		cabinetpb.OperatorService_CreateJoinToken_FullMethodName:         {roles: []string{tlsutil.RoleAdmin}},
		cabinetpb.OperatorService_Join_FullMethodName:                    {noCert: true},
		cabinetpb.NodeService_Apply_FullMethodName:                       {roles: nodeOnly},
		cabinetpb.NodeService_ReadIndex_FullMethodName:                   {roles: nodeOnly},
		cabinetpb.NodeService_AddPeer_FullMethodName:                     {roles: nodeOnly},
		"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo":      {roles: adminOrNode},
		"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": {roles: adminOrNode},
		"/grpc.health.v1.Health/Check":                                   {noCert: true},
		"/grpc.health.v1.Health/Watch":                                   {noCert: true},
	}
	// Every KeyService method: admins and nodes until per-key grants arrive.
	for _, m := range cabinetpb.KeyService_ServiceDesc.Methods {
		p["/"+cabinetpb.KeyService_ServiceDesc.ServiceName+"/"+m.MethodName] = methodPolicy{roles: adminOrNode}
	}
	return p
}

// authorize authenticates the caller from its verified client certificate
// and applies the method policy.
func authorize(ctx context.Context, method string) (context.Context, error) {
	pol, ok := policies[method]
	if !ok {
		return nil, status.Errorf(codes.PermissionDenied, "method %s is not allowed", method)
	}
	id, hasCert := peerIdentity(ctx)
	if hasCert {
		ctx = context.WithValue(ctx, identityKey{}, id)
	}
	if pol.noCert {
		return ctx, nil
	}
	if !hasCert {
		return nil, status.Error(codes.Unauthenticated,
			"a client certificate signed by the cluster CA is required: set CABINET_CLIENT_CERT and CABINET_CLIENT_KEY (make cluster prints them)")
	}
	for _, r := range pol.roles {
		if id.Role == r {
			return ctx, nil
		}
	}
	return nil, status.Errorf(codes.PermissionDenied, "%s (role %q) may not call %s; allowed roles: %s",
		id.Name, id.Role, method[strings.LastIndex(method, "/")+1:], strings.Join(pol.roles, ", "))
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

func unaryAuth(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	ctx, err := authorize(ctx, info.FullMethod)
	if err != nil {
		return nil, err
	}
	resp, err := handler(ctx, req)
	// Aborted ("not the leader") tells a forwarding node to retry at the new
	// leader; to a client it means "try again or elsewhere": Unavailable.
	if status.Code(err) == codes.Aborted && !strings.HasPrefix(info.FullMethod, "/cabinet.v1.NodeService/") {
		err = status.Error(codes.Unavailable, status.Convert(err).Message())
	}
	return resp, err
}

func streamAuth(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx, err := authorize(ss.Context(), info.FullMethod)
	if err != nil {
		return err
	}
	return handler(srv, &wrappedStream{ServerStream: ss, ctx: ctx})
}

type wrappedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (w *wrappedStream) Context() context.Context { return w.ctx }
