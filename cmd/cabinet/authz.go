package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

// Grants (key subcommands) and principals, certificates (operator
// subcommands).

func authzKeyCmds(f *clientFlags) []*cobra.Command {
	var principal, ops, reqID string
	var ctxEq []string
	grant := &cobra.Command{
		Use:   "grant ID|ALIAS --principal NAME --operations encrypt,decrypt,...",
		Short: "Let a plain principal use this key for some operations (optionally only with an encryption context)",
		Long: `grant lets the principal NAME (a client certificate's common name, role client) perform the
listed operations with this key: encrypt, decrypt, re-encrypt, generate-data-key, sign, verify,
generate-mac, verify-mac, describe. With --context-equals k=v (repeatable) the request's
encryption context must contain every pair.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			eq, err := parseContext(ctxEq)
			if err != nil {
				return fmt.Errorf("--context-equals: %w", err)
			}
			return f.withKeys(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) error {
				resp, err := kc.CreateGrant(ctx, &cabinetpb.CreateGrantRequest{KeyId: args[0], Principal: principal,
					Operations: strings.Split(ops, ","), EncryptionContextEquals: eq, RequestId: orRandom(reqID)})
				if err != nil {
					return rpcError(err)
				}
				return printGrants(cmd, f, []*cabinetpb.Grant{resp.GetGrant()})
			})
		},
	}
	grant.Flags().StringVar(&principal, "principal", "", "certificate common name of the principal")
	grant.Flags().StringVar(&ops, "operations", "", "comma-separated operations")
	grant.Flags().StringArrayVar(&ctxEq, "context-equals", nil, "required encryption context pair key=value (repeatable)")
	grant.Flags().StringVar(&reqID, "request-id", "", "idempotency key (default: random)")

	revoke := &cobra.Command{
		Use:   "revoke-grant GRANT_ID",
		Short: "Remove a grant",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.withKeys(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) error {
				if _, err := kc.RevokeGrant(ctx, &cabinetpb.RevokeGrantRequest{GrantId: args[0], RequestId: newRequestID()}); err != nil {
					return rpcError(err)
				}
				_, err := fmt.Fprintf(cmd.OutOrStdout(), "grant %s revoked\n", args[0])
				return err
			})
		},
	}
	var byPrincipal string
	list := &cobra.Command{
		Use:   "grants [ID|ALIAS]",
		Short: "List grants (of one key, or all)",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &cabinetpb.ListGrantsRequest{Principal: byPrincipal}
			if len(args) == 1 {
				req.KeyId = args[0]
			}
			return f.withKeys(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) error {
				resp, err := kc.ListGrants(ctx, req)
				if err != nil {
					return rpcError(err)
				}
				return printGrants(cmd, f, resp.GetGrants())
			})
		},
	}
	list.Flags().StringVar(&byPrincipal, "principal", "", "only this principal's grants")
	return []*cobra.Command{grant, revoke, list}
}

func printGrants(cmd *cobra.Command, f *clientFlags, gs []*cabinetpb.Grant) error {
	if f.output == "json" {
		return printJSON(cmd.OutOrStdout(), &cabinetpb.ListGrantsResponse{Grants: gs})
	}
	t := newTable(cmd.OutOrStdout())
	fmt.Fprintln(t, "GRANT ID\tKEY ID\tPRINCIPAL\tOPERATIONS\tCONTEXT MUST EQUAL")
	for _, g := range gs {
		var eq []string
		for k, v := range g.GetEncryptionContextEquals() {
			eq = append(eq, k+"="+v)
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\n", g.GetGrantId(), g.GetKeyId(), g.GetPrincipal(), strings.Join(g.GetOperations(), ","), strings.Join(eq, ","))
	}
	return t.Flush()
}

func authzOperatorCmds(f *clientFlags) []*cobra.Command {
	withOps := func(cmd *cobra.Command, fn func(ctx context.Context, oc cabinetpb.OperatorServiceClient) error) error {
		conn, ctx, done, err := f.connect(cmd.Context())
		if err != nil {
			return err
		}
		defer done()
		return fn(ctx, cabinetpb.NewOperatorServiceClient(conn))
	}
	var name, role, out string
	issue := &cobra.Command{
		Use:   "issue --name NAME --role admin|operator|client --out DIR",
		Short: "Issue a client certificate from the cluster CA (the private key is made here and never sent)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if name == "" || out == "" {
				return fmt.Errorf("--name and --out are required")
			}
			key, csr, err := tlsutil.NewClientKey(name)
			if err != nil {
				return err
			}
			return withOps(cmd, func(ctx context.Context, oc cabinetpb.OperatorServiceClient) error {
				resp, err := oc.IssueCertificate(ctx, &cabinetpb.IssueCertificateRequest{CsrDer: csr, Name: name, Role: role})
				if err != nil {
					return rpcError(err)
				}
				if err := os.MkdirAll(out, 0o700); err != nil {
					return err
				}
				if err := tlsutil.WriteKeyPEM(filepath.Join(out, name+"-key.pem"), key); err != nil {
					return err
				}
				if err := tlsutil.WriteCertPEM(filepath.Join(out, name+".pem"), resp.GetCertDer()); err != nil {
					return err
				}
				if err := tlsutil.WriteCertPEM(filepath.Join(out, "ca.pem"), resp.GetCaCertDer()); err != nil {
					return err
				}
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "Issued %s (role %s), valid until %s:\n  CABINET_CLIENT_CERT=%s\n  CABINET_CLIENT_KEY=%s\n  CABINET_CACERT=%s\n",
					name, role, resp.GetNotAfter().AsTime().Format(time.RFC3339), filepath.Join(out, name+".pem"), filepath.Join(out, name+"-key.pem"), filepath.Join(out, "ca.pem"))
				return err
			})
		},
	}
	issue.Flags().StringVar(&name, "name", "", "principal name (the certificate's common name)")
	issue.Flags().StringVar(&role, "role", "client", "admin, operator or client")
	issue.Flags().StringVar(&out, "out", "", "directory for NAME.pem, NAME-key.pem (0600) and ca.pem")
	cert := &cobra.Command{Use: "cert", Short: "Client certificates"}
	cert.AddCommand(issue)

	var reason string
	deny := &cobra.Command{
		Use:   "deny PRINCIPAL [--reason R]",
		Short: "Refuse a principal on every node at once (e.g. a leaked certificate), whatever its certificate says",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withOps(cmd, func(ctx context.Context, oc cabinetpb.OperatorServiceClient) error {
				if _, err := oc.DenyPrincipal(ctx, &cabinetpb.DenyPrincipalRequest{Principal: args[0], Reason: reason, RequestId: newRequestID()}); err != nil {
					return rpcError(err)
				}
				_, err := fmt.Fprintf(cmd.OutOrStdout(), "%s is denied cluster-wide\n", args[0])
				return err
			})
		},
	}
	deny.Flags().StringVar(&reason, "reason", "", "why (kept in the state and shown to the principal)")
	allow := &cobra.Command{
		Use:   "allow PRINCIPAL",
		Short: "Lift a principal's cluster-wide denial",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withOps(cmd, func(ctx context.Context, oc cabinetpb.OperatorServiceClient) error {
				if _, err := oc.AllowPrincipal(ctx, &cabinetpb.AllowPrincipalRequest{Principal: args[0], RequestId: newRequestID()}); err != nil {
					return rpcError(err)
				}
				_, err := fmt.Fprintf(cmd.OutOrStdout(), "%s is no longer denied\n", args[0])
				return err
			})
		},
	}
	denied := &cobra.Command{
		Use:   "denied",
		Short: "List denied principals",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withOps(cmd, func(ctx context.Context, oc cabinetpb.OperatorServiceClient) error {
				resp, err := oc.ListDeniedPrincipals(ctx, &cabinetpb.ListDeniedPrincipalsRequest{})
				if err != nil {
					return rpcError(err)
				}
				if f.output == "json" {
					return printJSON(cmd.OutOrStdout(), resp)
				}
				t := newTable(cmd.OutOrStdout())
				fmt.Fprintln(t, "PRINCIPAL\tREASON\tDENIED AT\tBY")
				for _, d := range resp.GetPrincipals() {
					fmt.Fprintf(t, "%s\t%s\t%s\t%s\n", d.GetPrincipal(), d.GetReason(), d.GetDeniedAt().AsTime().Format(time.RFC3339), d.GetDeniedBy())
				}
				return t.Flush()
			})
		},
	}
	return []*cobra.Command{cert, deny, allow, denied}
}
