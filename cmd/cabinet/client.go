package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
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
	cmd.PersistentFlags().StringVar(&f.addr, "addr", envOr("CABINET_ADDR", "127.0.0.1:7101"), "address of any Cabinet node (env CABINET_ADDR)")
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

func (f *clientFlags) dial() (*grpc.ClientConn, error) {
	if f.output != "table" && f.output != "json" {
		return nil, fmt.Errorf("--output must be table or json, not %q", f.output)
	}
	cfg, err := f.tlsConfig()
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(f.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", f.addr, err)
	}
	return conn, nil
}

// connect dials the node and returns a context bounded by --timeout; done
// releases both.
func (f *clientFlags) connect(parent context.Context) (*grpc.ClientConn, context.Context, func(), error) {
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
