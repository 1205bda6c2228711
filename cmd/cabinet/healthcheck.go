package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// newHealthcheckCmd asks a node's standard gRPC health service, which needs
// no client certificate: for container HEALTHCHECKs, Kubernetes exec probes
// and scripts. It exits 0 only when the node reports SERVING.
func newHealthcheckCmd() *cobra.Command {
	var addr, caCert, dataDir, service string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "healthcheck",
		Short: "Exit 0 if a node's gRPC health service reports SERVING (no client certificate needed)",
		Long: `Ask a node's gRPC health service (grpc.health.v1) whether it serves. It reports
NOT_SERVING while the node has no verified KEK, has not heard from a quorum
within --max-staleness, its HSM is unavailable, or it cannot write its audit log.

With --data-dir (env CABINET_DATA_DIR) the node's own address and cluster CA are
read from the data dir, so on a node "cabinet healthcheck" needs no flags.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dataDir != "" {
				if caCert == "" {
					caCert = filepath.Join(tlsDir(dataDir), "ca.pem")
				}
				if addr == "" {
					nc, err := loadNodeConfig(dataDir)
					if err != nil {
						return err
					}
					addr = nc.APIAddr
				}
			}
			if addr == "" || caCert == "" {
				return fmt.Errorf("give --data-dir, or --addr and --ca-cert")
			}
			pem, err := os.ReadFile(caCert)
			if err != nil {
				return fmt.Errorf("read CA certificate: %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return fmt.Errorf("%s holds no PEM certificate", caCert)
			}
			host, _, err := net.SplitHostPort(addr)
			if err != nil {
				return fmt.Errorf("--addr: %w", err)
			}
			conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
				RootCAs: pool, ServerName: host, MinVersion: tls.VersionTLS12,
			})))
			if err != nil {
				return err
			}
			defer conn.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
			if err != nil {
				return fmt.Errorf("health check of %s: %w", addr, err)
			}
			fmt.Fprintln(cmd.OutOrStdout(), resp.GetStatus())
			if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
				return fmt.Errorf("%s is %s (`cabinet operator status` says why)", addr, resp.GetStatus())
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", os.Getenv("CABINET_DATA_DIR"), "a node's data dir: take its API address and cluster CA from there (env CABINET_DATA_DIR)")
	cmd.Flags().StringVar(&addr, "addr", "", "node API address (default: the data dir's)")
	cmd.Flags().StringVar(&caCert, "ca-cert", "", "cluster CA certificate PEM (default: the data dir's)")
	cmd.Flags().StringVar(&service, "service", "cabinet.v1.KeyService", `health service name ("" for the whole server)`)
	cmd.Flags().DurationVar(&timeout, "timeout", 5*time.Second, "deadline for the check")
	return cmd
}
