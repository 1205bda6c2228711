// Package client is the Go client library of Cabinet.
//
// A Client talks to any number of Cabinet nodes (endpoints) over mutual TLS
// 1.3. Every node serves every method, so the client sticks to one endpoint
// and moves to the next when a call fails with Unavailable (the node is
// down, stale, has no leader or lost its HSM) or Aborted, with jittered,
// bounded backoff between attempts, until the call's deadline. Calls whose
// context has no deadline get one (WithCallTimeout, 10 s by default).
//
// Writes are safe to retry: a request that has a request_id field (CreateKey,
// RotateKey and every other lifecycle write) gets a fresh id once, before the
// first attempt, unless the caller set one, and every retry carries the same
// id, so the cluster applies it once (a retried CreateKey never creates a
// second key). InvalidArgument, NotFound, PermissionDenied,
// FailedPrecondition and every other definite answer are returned at once.
//
//	c, err := client.New(nil, client.FromEnv()) // CABINET_ADDR, CABINET_CACERT, ...
//	c, err := client.New([]string{"10.0.0.1:7101", "10.0.0.2:7101"},
//		client.WithTLSFiles("ca.pem", "app.pem", "app-key.pem"))
//
// Envelope encrypts data of any size locally under a data key from
// GenerateDataKey; see Envelope and DESIGN.md in this directory.
//
// The package imports only the generated API (transport/cabinetpb), gRPC
// and protobuf: no server package.
package client

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// Defaults of the call policy.
const (
	// DefaultCallTimeout bounds a call (all its attempts) whose context has
	// no deadline.
	DefaultCallTimeout = 10 * time.Second
	// DefaultInitialBackoff is the first pause between attempts; it doubles
	// up to DefaultMaxBackoff. Each pause is jittered to [d/2, d).
	DefaultInitialBackoff = 50 * time.Millisecond
	// DefaultMaxBackoff caps the pause between attempts.
	DefaultMaxBackoff = time.Second
)

// Environment variables read by FromEnv; the CLI reads the same ones.
const (
	EnvAddr       = "CABINET_ADDR" // one endpoint or a comma-separated list
	EnvCACert     = "CABINET_CACERT"
	EnvClientCert = "CABINET_CLIENT_CERT"
	EnvClientKey  = "CABINET_CLIENT_KEY"
)

// Option configures New.
type Option func(*options) error

type options struct {
	endpoints      []string // from FromEnv, used when New gets none
	tlsConfig      *tls.Config
	callTimeout    time.Duration
	attemptTimeout time.Duration
	maxAttempts    int
	initialBackoff time.Duration
	maxBackoff     time.Duration
	consistency    cabinetpb.Consistency
	dialOptions    []grpc.DialOption
}

// WithTLSFiles authenticates with the client certificate and key in
// certFile/keyFile (PEM) and trusts the servers' certificates signed by the
// CA in caFile (PEM): the files `cabinet operator init --admin-out` and
// `cabinet operator cert issue` write.
func WithTLSFiles(caFile, certFile, keyFile string) Option {
	return func(o *options) error {
		cfg, err := tlsFromFiles(caFile, certFile, keyFile)
		if err != nil {
			return err
		}
		o.tlsConfig = cfg
		return nil
	}
}

// WithTLSConfig uses cfg (cloned) for every connection. It must carry a
// client certificate; its minimum version is raised to TLS 1.3.
func WithTLSConfig(cfg *tls.Config) Option {
	return func(o *options) error {
		if cfg == nil {
			return errors.New("client: WithTLSConfig: nil config")
		}
		c := cfg.Clone()
		if c.MinVersion < tls.VersionTLS13 {
			c.MinVersion = tls.VersionTLS13
		}
		o.tlsConfig = c
		return nil
	}
}

// FromEnv reads the environment the cabinet CLI uses: the endpoints from
// CABINET_ADDR (comma-separated; used only when New is given none) and the
// mTLS files from CABINET_CACERT, CABINET_CLIENT_CERT and CABINET_CLIENT_KEY
// (`make cluster` prints all four). Options after it override it.
func FromEnv() Option {
	return func(o *options) error {
		o.endpoints = SplitEndpoints(os.Getenv(EnvAddr))
		ca, cert, key := os.Getenv(EnvCACert), os.Getenv(EnvClientCert), os.Getenv(EnvClientKey)
		if ca == "" || cert == "" || key == "" {
			return fmt.Errorf("client: FromEnv: %s, %s and %s must all be set", EnvCACert, EnvClientCert, EnvClientKey)
		}
		return WithTLSFiles(ca, cert, key)(o)
	}
}

// WithCallTimeout sets the deadline given to calls whose context has none
// (DefaultCallTimeout; 0 keeps calls without a deadline).
func WithCallTimeout(d time.Duration) Option {
	return func(o *options) error {
		if d < 0 {
			return errors.New("client: WithCallTimeout: negative duration")
		}
		o.callTimeout = d
		return nil
	}
}

// WithAttemptTimeout bounds each attempt of a call, so a node that accepts
// connections but does not answer (paused, partitioned without resets) is
// left for the next endpoint before the call's deadline. 0 (the default)
// lets an attempt use the whole call deadline: pick a value above your
// slowest expected call (creating an RSA-4096 key takes seconds).
func WithAttemptTimeout(d time.Duration) Option {
	return func(o *options) error {
		if d < 0 {
			return errors.New("client: WithAttemptTimeout: negative duration")
		}
		o.attemptTimeout = d
		return nil
	}
}

// WithMaxAttempts caps the attempts of one call (0, the default: retry
// until the call's deadline).
func WithMaxAttempts(n int) Option {
	return func(o *options) error {
		if n < 0 {
			return errors.New("client: WithMaxAttempts: negative count")
		}
		o.maxAttempts = n
		return nil
	}
}

// WithBackoff sets the first pause between attempts and its cap (defaults
// DefaultInitialBackoff and DefaultMaxBackoff).
func WithBackoff(initial, max time.Duration) Option {
	return func(o *options) error {
		if initial <= 0 || max < initial {
			return errors.New("client: WithBackoff: need 0 < initial <= max")
		}
		o.initialBackoff, o.maxBackoff = initial, max
		return nil
	}
}

// WithConsistency sets the consistency of the crypto operations made by the
// typed methods (and the Envelope): BOUNDED_STALENESS (the default) or
// STRONG (the node first catches up with the leader's commit index).
func WithConsistency(c cabinetpb.Consistency) Option {
	return func(o *options) error {
		o.consistency = c
		return nil
	}
}

// WithDialOptions adds gRPC dial options to every endpoint's connection
// (interceptors, user agent, ...).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) error {
		o.dialOptions = append(o.dialOptions, opts...)
		return nil
	}
}

// Client is a Cabinet client. It is safe for concurrent use; Close it when
// done.
type Client struct {
	conn        *failoverConn
	keys        cabinetpb.KeyServiceClient
	ops         cabinetpb.OperatorServiceClient
	consistency cabinetpb.Consistency
}

// New connects to the Cabinet nodes at endpoints ("host:port", tried in
// order, the first one preferred). With no endpoints it uses those from
// FromEnv. mTLS is required: pass WithTLSFiles, WithTLSConfig or FromEnv.
// Connections are made lazily, so New does not fail when a node is down.
func New(endpoints []string, opts ...Option) (*Client, error) {
	o := &options{callTimeout: DefaultCallTimeout, initialBackoff: DefaultInitialBackoff, maxBackoff: DefaultMaxBackoff}
	for _, opt := range opts {
		if err := opt(o); err != nil {
			return nil, err
		}
	}
	var eps []string
	for _, e := range endpoints {
		eps = append(eps, SplitEndpoints(e)...)
	}
	if len(eps) == 0 {
		eps = o.endpoints
	}
	if len(eps) == 0 {
		return nil, fmt.Errorf("client: no endpoints: pass them to New or set %s with FromEnv", EnvAddr)
	}
	if o.tlsConfig == nil {
		return nil, errors.New("client: a client certificate is required: use WithTLSFiles, WithTLSConfig or FromEnv")
	}
	dial := append([]grpc.DialOption{
		grpc.WithTransportCredentials(credentials.NewTLS(o.tlsConfig)),
		// Reconnect soon after a node returns instead of gRPC's default of up
		// to two minutes; failover, not reconnection, keeps calls going.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 2 * time.Second},
			MinConnectTimeout: 5 * time.Second,
		}),
		grpc.WithUserAgent("cabinet-go-client"),
	}, o.dialOptions...)
	fc := &failoverConn{
		endpoints:      eps,
		callTimeout:    o.callTimeout,
		attemptTimeout: o.attemptTimeout,
		maxAttempts:    o.maxAttempts,
		initialBackoff: o.initialBackoff,
		maxBackoff:     o.maxBackoff,
	}
	for _, ep := range eps {
		cc, err := grpc.NewClient(ep, dial...)
		if err != nil {
			fc.close()
			return nil, fmt.Errorf("client: endpoint %q: %w", ep, err)
		}
		fc.conns = append(fc.conns, cc)
	}
	return &Client{
		conn:        fc,
		keys:        cabinetpb.NewKeyServiceClient(fc),
		ops:         cabinetpb.NewOperatorServiceClient(fc),
		consistency: o.consistency,
	}, nil
}

// SplitEndpoints splits a comma-separated endpoint list (as in
// CABINET_ADDR), dropping blanks.
func SplitEndpoints(s string) []string {
	var out []string
	for _, e := range strings.Split(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

// Conn returns the failover connection itself, for generated stubs of
// any Cabinet service (unary calls fail over and retry as the typed methods
// do; streams go to the current endpoint).
func (c *Client) Conn() grpc.ClientConnInterface { return c.conn }

// Close closes every connection.
func (c *Client) Close() error { return c.conn.close() }

// Raw returns the full KeyService API with the same failover, retries,
// request ids and deadlines as the typed methods. Requests are not
// modified: one that needs a request id is cloned before it gets one.
func (c *Client) Raw() cabinetpb.KeyServiceClient { return c.keys }

// Operator returns the OperatorService API (status, peers, join tokens,
// ...) with the same failover and retries. Status and ListPeers answer
// for whichever node the client uses now; see Endpoint.
func (c *Client) Operator() cabinetpb.OperatorServiceClient { return c.ops }

// Endpoints returns the endpoints in the order they are tried.
func (c *Client) Endpoints() []string { return append([]string(nil), c.conn.endpoints...) }

// Endpoint returns the endpoint the next call goes to first: the last one
// that answered.
func (c *Client) Endpoint() string { return c.conn.endpoints[c.conn.current.Load()] }

func tlsFromFiles(caFile, certFile, keyFile string) (*tls.Config, error) {
	if caFile == "" || certFile == "" || keyFile == "" {
		return nil, errors.New("client: the CA certificate, client certificate and client key files are all required")
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("client: read CA certificate: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("client: %s holds no PEM certificate", caFile)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("client: load client certificate: %w", err)
	}
	return &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, Certificates: []tls.Certificate{cert}}, nil
}

// NewRequestID returns a fresh random request id ("go-" and 32 hex
// digits). Set one yourself to make a write idempotent across separate
// calls (e.g. across process restarts).
func NewRequestID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // crypto/rand.Read never fails on supported platforms
	return "go-" + hex.EncodeToString(b)
}
