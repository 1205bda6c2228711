package transport

import (
	"context"
	"crypto/tls"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// NewGRPCServer builds the node's gRPC server on tlsCfg (tlsutil.ServerConfig:
// client certificates verified when given; the interceptors require one for
// every method but Join and health). The outermost interceptors give every
// request an id, log one line for it and, WithRPCMetrics, count and time it;
// inside them the authorization/audit interceptors run.
func (s *Server) NewGRPCServer(tlsCfg *tls.Config, opts ...GRPCOption) *grpc.Server {
	var o grpcOptions
	for _, opt := range opts {
		opt(&o)
	}
	g := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(tlsCfg)),
		grpc.ChainUnaryInterceptor(s.observeUnary(o.metrics), s.unaryInterceptor),
		grpc.ChainStreamInterceptor(s.observeStream(o.metrics), s.streamInterceptor),
		grpc.MaxConcurrentStreams(1024),
		grpc.MaxRecvMsgSize(4<<20),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	cabinetpb.RegisterKeyServiceServer(g, s)
	cabinetpb.RegisterOperatorServiceServer(g, s)
	cabinetpb.RegisterNodeServiceServer(g, s)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(g, hs)
	reflection.Register(g)
	s.health = hs
	return g
}

// WatchHealth keeps the gRPC health service in step with localStatus until
// ctx ends.
func (s *Server) WatchHealth(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		st := healthpb.HealthCheckResponse_NOT_SERVING
		if s.localStatus(ctx).GetHealthy() {
			st = healthpb.HealthCheckResponse_SERVING
		}
		if s.health != nil {
			s.health.SetServingStatus("", st)
			s.health.SetServingStatus("cabinet.v1.KeyService", st)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
