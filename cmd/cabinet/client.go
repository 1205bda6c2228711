package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/client"
)

// clientFlags are the connection flags every client command takes; each
// falls back to an environment variable (what `make cluster` prints).
type clientFlags struct {
	addr       string
	caCert     string
	clientCert string
	clientKey  string
	output     string
	timeout    time.Duration
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func addClientFlags(cmd *cobra.Command, f *clientFlags) {
	cmd.PersistentFlags().StringVar(&f.addr, "addr", envOr("CABINET_ADDR", "127.0.0.1:7101"), "address of any Cabinet node, or several comma-separated to fail over between them (env CABINET_ADDR)")
	cmd.PersistentFlags().StringVar(&f.caCert, "ca-cert", os.Getenv("CABINET_CACERT"), "cluster CA certificate PEM (env CABINET_CACERT)")
	cmd.PersistentFlags().StringVar(&f.clientCert, "client-cert", os.Getenv("CABINET_CLIENT_CERT"), "client certificate PEM (env CABINET_CLIENT_CERT)")
	cmd.PersistentFlags().StringVar(&f.clientKey, "client-key", os.Getenv("CABINET_CLIENT_KEY"), "client private key PEM (env CABINET_CLIENT_KEY)")
	cmd.PersistentFlags().StringVarP(&f.output, "output", "o", "table", "output format: table or json")
	cmd.PersistentFlags().DurationVar(&f.timeout, "timeout", 30*time.Second, "deadline for the request")
}

func (f *clientFlags) tlsConfig() (*tls.Config, error) {
	if f.caCert == "" || f.clientCert == "" || f.clientKey == "" {
		return nil, fmt.Errorf("a client certificate is required: set CABINET_CACERT, CABINET_CLIENT_CERT and CABINET_CLIENT_KEY (or --ca-cert, --client-cert, --client-key); `make cluster` prints them")
	}
	pem, err := os.ReadFile(f.caCert)
	if err != nil {
		return nil, fmt.Errorf("read CA certificate: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", f.caCert)
	}
	cert, err := tls.LoadX509KeyPair(f.clientCert, f.clientKey)
	if err != nil {
		return nil, fmt.Errorf("load client certificate: %w", err)
	}
	return &tls.Config{MinVersion: tls.VersionTLS13, RootCAs: pool, Certificates: []tls.Certificate{cert}}, nil
}

// cliConn is what client commands call through: one node's connection, or
// the client library's failover over several.
type cliConn interface {
	grpc.ClientConnInterface
	Close() error
}

// libConn adapts a client.Client (failover, retries) to cliConn.
type libConn struct{ c *client.Client }

func (l libConn) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	return l.c.Conn().Invoke(ctx, method, args, reply, opts...)
}

func (l libConn) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	return l.c.Conn().NewStream(ctx, desc, method, opts...)
}

func (l libConn) Close() error { return l.c.Close() }

// dial connects to --addr: one node, or with a comma-separated list every
// listed node, unary calls failing over between them (as the client library
// does: Unavailable and Aborted answers move on, with backoff, until
// --timeout; writes keep their request id, so a retry applies once).
func (f *clientFlags) dial() (cliConn, error) {
	if f.output != "table" && f.output != "json" {
		return nil, fmt.Errorf("--output must be table or json, not %q", f.output)
	}
	cfg, err := f.tlsConfig()
	if err != nil {
		return nil, err
	}
	eps := client.SplitEndpoints(f.addr)
	switch len(eps) {
	case 0:
		return nil, errors.New("--addr is empty: give a node's host:port (or several, comma-separated)")
	case 1:
		conn, err := grpc.NewClient(eps[0], grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			return nil, fmt.Errorf("connect to %s: %w", eps[0], err)
		}
		return conn, nil
	}
	c, err := client.New(eps, client.WithTLSConfig(cfg), client.WithCallTimeout(f.timeout))
	if err != nil {
		return nil, err
	}
	return libConn{c}, nil
}

// connect dials the node(s) and returns a context bounded by --timeout;
// done releases both.
func (f *clientFlags) connect(parent context.Context) (cliConn, context.Context, func(), error) {
	conn, err := f.dial()
	if err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := context.WithTimeout(parent, f.timeout)
	return conn, ctx, func() { cancel(); conn.Close() }, nil
}

// rpcError turns a gRPC status into "CODE: message" for the user.
func rpcError(err error) error {
	if st, ok := status.FromError(err); ok {
		return fmt.Errorf("%s: %s", st.Code(), st.Message())
	}
	return err
}

func printJSON(w io.Writer, m proto.Message) error {
	b, err := protojson.MarshalOptions{Multiline: true, Indent: "  ", EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(w, string(b))
	return err
}

func printAnyJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newTable(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 4, 2, ' ', 0) }

// parseContext turns repeated k=v flags into an encryption context.
func parseContext(pairs []string) (map[string]string, error) {
	if len(pairs) == 0 {
		return nil, nil
	}
	out := map[string]string{}
	for _, p := range pairs {
		k, v, ok := strings.Cut(p, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--context %q must be key=value", p)
		}
		if _, dup := out[k]; dup {
			return nil, fmt.Errorf("--context key %q given twice", k)
		}
		out[k] = v
	}
	return out, nil
}
