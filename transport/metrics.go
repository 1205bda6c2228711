package transport

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// RequestIDHeader is the gRPC metadata key carrying a request's trace id. A
// caller may set it (it is kept if it looks sane); otherwise the node makes
// one. The node returns it in the response header either way, and every log
// line about the request carries it as request_id.
const RequestIDHeader = "x-request-id"

// RPCMetrics counts and times every gRPC request by method and status code.
type RPCMetrics struct {
	requests *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	inFlight prometheus.Gauge
}

// NewRPCMetrics registers the request metrics on reg.
func NewRPCMetrics(reg prometheus.Registerer) *RPCMetrics {
	m := &RPCMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "cabinet", Subsystem: "grpc", Name: "requests_total",
			Help: "gRPC requests handled, by service, method and status code.",
		}, []string{"service", "method", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "cabinet", Subsystem: "grpc", Name: "request_duration_seconds",
			Help:    "gRPC request latency (authorization, audit and handler), by service and method.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"service", "method"}),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "cabinet", Subsystem: "grpc", Name: "requests_in_flight",
			Help: "gRPC requests being handled now.",
		}),
	}
	reg.MustRegister(m.requests, m.latency, m.inFlight)
	return m
}

func (m *RPCMetrics) observe(fullMethod string, code string, d time.Duration) {
	if m == nil {
		return
	}
	svc, meth := splitMethod(fullMethod)
	m.requests.WithLabelValues(svc, meth, code).Inc()
	m.latency.WithLabelValues(svc, meth).Observe(d.Seconds())
}

// splitMethod turns "/pkg.Service/Method" into ("pkg.Service", "Method").
func splitMethod(full string) (string, string) {
	if len(full) > 0 && full[0] == '/' {
		full = full[1:]
	}
	for i := len(full) - 1; i >= 0; i-- {
		if full[i] == '/' {
			return full[:i], full[i+1:]
		}
	}
	return "unknown", full
}

// GRPCOption adds optional behaviour to NewGRPCServer.
type GRPCOption func(*grpcOptions)

type grpcOptions struct {
	metrics *RPCMetrics
}

// WithRPCMetrics records request counts and latencies in m.
func WithRPCMetrics(m *RPCMetrics) GRPCOption {
	return func(o *grpcOptions) { o.metrics = m }
}

type requestIDKey struct{}

// RequestIDFrom returns the trace id of the request ctx belongs to.
func RequestIDFrom(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey{}).(string)
	return id
}

// incomingRequestID takes the caller's x-request-id if it is short and
// printable, or makes a fresh one.
func incomingRequestID(ctx context.Context) string {
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get(RequestIDHeader); len(v) > 0 && validRequestID(v[0]) {
			return v[0]
		}
	}
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func validRequestID(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	for _, r := range s {
		if r < 0x21 || r > 0x7e {
			return false
		}
	}
	return true
}

// requestLogLevel: health checks and node-to-node traffic are frequent and
// routine, so they log at debug; everything a client asked for logs at info.
func requestLogLevel(fullMethod string, failed bool) slog.Level {
	svc, _ := splitMethod(fullMethod)
	switch {
	case svc == "grpc.health.v1.Health" || svc == "cabinet.v1.NodeService" ||
		svc == "grpc.reflection.v1.ServerReflection" || svc == "grpc.reflection.v1alpha.ServerReflection":
		return slog.LevelDebug
	case failed:
		return slog.LevelWarn
	}
	return slog.LevelInfo
}

// observeUnary is the outermost unary interceptor: it gives the request its
// id (context and response header), then logs one line and records metrics
// for it once authorization, audit and the handler are done.
func (s *Server) observeUnary(m *RPCMetrics) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		rid := incomingRequestID(ctx)
		ctx = context.WithValue(ctx, requestIDKey{}, rid)
		_ = grpc.SetHeader(ctx, metadata.Pairs(RequestIDHeader, rid))
		if m != nil {
			m.inFlight.Inc()
			defer m.inFlight.Dec()
		}
		start := time.Now()
		resp, err := handler(ctx, req)
		d := time.Since(start)
		code := status.Code(err).String()
		m.observe(info.FullMethod, code, d)
		s.logRequest(ctx, rid, info.FullMethod, req, code, d, err)
		return resp, err
	}
}

// observeStream does for streams what observeUnary does for unary calls.
func (s *Server) observeStream(m *RPCMetrics) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		rid := incomingRequestID(ss.Context())
		ctx := context.WithValue(ss.Context(), requestIDKey{}, rid)
		_ = ss.SetHeader(metadata.Pairs(RequestIDHeader, rid))
		if m != nil {
			m.inFlight.Inc()
			defer m.inFlight.Dec()
		}
		start := time.Now()
		err := handler(srv, &wrappedStream{ServerStream: ss, ctx: ctx})
		d := time.Since(start)
		code := status.Code(err).String()
		m.observe(info.FullMethod, code, d)
		s.logRequest(ctx, rid, info.FullMethod, nil, code, d, err)
		return err
	}
}

func (s *Server) logRequest(ctx context.Context, rid, fullMethod string, req any, code string, d time.Duration, err error) {
	lv := requestLogLevel(fullMethod, err != nil)
	if !s.log.Enabled(ctx, lv) {
		return
	}
	attrs := []slog.Attr{
		slog.String("request_id", rid),
		slog.String("method", fullMethod),
		slog.String("code", code),
		slog.Duration("duration", d),
	}
	// The identity is attached by the authorization interceptor inside this
	// one, so read it from the peer certificate here.
	if id, ok := peerIdentity(ctx); ok {
		attrs = append(attrs, slog.String("principal", id.Role+":"+id.Name))
	}
	if r, ok := req.(requestIDer); ok && r.GetRequestId() != "" {
		attrs = append(attrs, slog.String("idempotency_key", r.GetRequestId()))
	}
	if err != nil {
		attrs = append(attrs, slog.String("err", status.Convert(err).Message()))
	}
	s.log.LogAttrs(ctx, lv, "request", attrs...)
}
