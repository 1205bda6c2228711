package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/cabinet-kms/cabinet/keyops"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// Lifecycle commands: each resolves to one KeyService write and prints the
// key as `describe` does.

func lifecycleCmds(f *clientFlags) []*cobra.Command {
	simple := func(use, short string, call func(ctx context.Context, c cabinetpb.KeyServiceClient, req *cabinetpb.KeyRefRequest) (*cabinetpb.KeyResponse, error)) *cobra.Command {
		var reqID string
		c := &cobra.Command{
			Use:   use + " ID|ALIAS",
			Short: short,
			Args:  cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				return f.keyCall(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) (*cabinetpb.KeyResponse, error) {
					return call(ctx, kc, &cabinetpb.KeyRefRequest{KeyId: args[0], RequestId: orRandom(reqID)})
				})
			},
		}
		c.Flags().StringVar(&reqID, "request-id", "", "idempotency key (default: random)")
		return c
	}
	return []*cobra.Command{
		simple("rotate", "Add a new key version and make it primary (old versions keep decrypting/verifying)",
			func(ctx context.Context, c cabinetpb.KeyServiceClient, r *cabinetpb.KeyRefRequest) (*cabinetpb.KeyResponse, error) {
				return c.RotateKey(ctx, r)
			}),
		simple("enable", "Enable a DISABLED key",
			func(ctx context.Context, c cabinetpb.KeyServiceClient, r *cabinetpb.KeyRefRequest) (*cabinetpb.KeyResponse, error) {
				return c.EnableKey(ctx, r)
			}),
		simple("disable", "Disable a key (reversible: no use until enabled)",
			func(ctx context.Context, c cabinetpb.KeyServiceClient, r *cabinetpb.KeyRefRequest) (*cabinetpb.KeyResponse, error) {
				return c.DisableKey(ctx, r)
			}),
		simple("cancel-destruction", "Cancel a scheduled destruction (the key becomes DISABLED)",
			func(ctx context.Context, c cabinetpb.KeyServiceClient, r *cabinetpb.KeyRefRequest) (*cabinetpb.KeyResponse, error) {
				return c.CancelKeyDestruction(ctx, r)
			}),
		revokeCmd(f), scheduleDestructionCmd(f), updateCmd(f), aliasCmd(f), rotationCmd(f), versionCmd(f),
		minVersionCmd(f), importCmd(f),
	}
}

func orRandom(id string) string {
	if id == "" {
		return newRequestID()
	}
	return id
}

// keyCall runs one KeyService call that returns a key and prints it.
func (f *clientFlags) keyCall(cmd *cobra.Command, call func(ctx context.Context, kc cabinetpb.KeyServiceClient) (*cabinetpb.KeyResponse, error)) error {
	return f.withKeys(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) error {
		resp, err := call(ctx, kc)
		if err != nil {
			return rpcError(err)
		}
		return printKey(cmd.OutOrStdout(), f, resp.GetKey())
	})
}

// withKeys dials and hands a KeyService client to fn.
func (f *clientFlags) withKeys(cmd *cobra.Command, fn func(ctx context.Context, kc cabinetpb.KeyServiceClient) error) error {
	conn, ctx, done, err := f.connect(cmd.Context())
	if err != nil {
		return err
	}
	defer done()
	return fn(ctx, cabinetpb.NewKeyServiceClient(conn))
}

func revokeCmd(f *clientFlags) *cobra.Command {
	var reason, comment, reqID string
	c := &cobra.Command{
		Use:   "revoke ID|ALIAS --reason superseded|ceased|compromised",
		Short: "Revoke a key: superseded/ceased -> DEACTIVATED (decrypt/verify only); compromised -> COMPROMISED (no use)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var r cabinetpb.RevocationReason
			switch strings.ToLower(reason) {
			case "superseded":
				r = cabinetpb.RevocationReason_SUPERSEDED
			case "ceased":
				r = cabinetpb.RevocationReason_CEASED
			case "compromised", "key-compromise":
				r = cabinetpb.RevocationReason_KEY_COMPROMISE
			default:
				return fmt.Errorf("--reason must be superseded, ceased or compromised")
			}
			return f.keyCall(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) (*cabinetpb.KeyResponse, error) {
				return kc.RevokeKey(ctx, &cabinetpb.RevokeKeyRequest{KeyId: args[0], Reason: r, Comment: comment, RequestId: orRandom(reqID)})
			})
		},
	}
	c.Flags().StringVar(&reason, "reason", "", "superseded, ceased or compromised")
	c.Flags().StringVar(&comment, "comment", "", "free-text note kept with the key")
	c.Flags().StringVar(&reqID, "request-id", "", "idempotency key (default: random)")
	return c
}

func scheduleDestructionCmd(f *clientFlags) *cobra.Command {
	var window time.Duration
	var reqID string
	c := &cobra.Command{
		Use:   "schedule-destruction ID|ALIAS",
		Short: "Schedule a key's destruction after a waiting period (default 30 days); cancel-destruction undoes it until then",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.keyCall(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) (*cabinetpb.KeyResponse, error) {
				return kc.ScheduleKeyDestruction(ctx, &cabinetpb.ScheduleKeyDestructionRequest{
					KeyId: args[0], PendingWindowSeconds: int64(window / time.Second), RequestId: orRandom(reqID)})
			})
		},
	}
	c.Flags().DurationVar(&window, "window", 0, "waiting period, e.g. 720h (default 30 days; at least the server's --min-pending-window)")
	c.Flags().StringVar(&reqID, "request-id", "", "idempotency key (default: random)")
	return c
}

func updateCmd(f *clientFlags) *cobra.Command {
	var desc string
	var tags []string
	var replaceTags bool
	c := &cobra.Command{
		Use:   "update ID|ALIAS [--description D] [--tag k=v ... --replace-tags]",
		Short: "Change a key's description and/or tags",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req := &cabinetpb.UpdateKeyRequest{KeyId: args[0], RequestId: newRequestID()}
			if cmd.Flags().Changed("description") {
				req.Description = &desc
			}
			if replaceTags || len(tags) > 0 {
				m, err := parseContext(tags)
				if err != nil {
					return fmt.Errorf("--tag: %w", err)
				}
				req.ReplaceTags, req.Tags = true, m
			}
			return f.keyCall(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) (*cabinetpb.KeyResponse, error) {
				return kc.UpdateKey(ctx, req)
			})
		},
	}
	c.Flags().StringVar(&desc, "description", "", "new description")
	c.Flags().StringArrayVar(&tags, "tag", nil, "tag key=value (repeatable); replaces all tags")
	c.Flags().BoolVar(&replaceTags, "replace-tags", false, "replace the tags even with none given (clears them)")
	return c
}

func aliasCmd(f *clientFlags) *cobra.Command {
	c := &cobra.Command{Use: "alias", Short: "Point an alias at a key (create or move) or delete it"}
	c.AddCommand(&cobra.Command{
		Use:   "set ALIAS ID|ALIAS",
		Short: "Create the alias, or move it to this key",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.keyCall(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) (*cabinetpb.KeyResponse, error) {
				return kc.SetAlias(ctx, &cabinetpb.SetAliasRequest{Alias: args[0], KeyId: args[1], RequestId: newRequestID()})
			})
		},
	}, &cobra.Command{
		Use:   "delete ALIAS",
		Short: "Delete an alias (the key stays)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.withKeys(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) error {
				if _, err := kc.DeleteAlias(ctx, &cabinetpb.DeleteAliasRequest{Alias: args[0], RequestId: newRequestID()}); err != nil {
					return rpcError(err)
				}
				_, err := fmt.Fprintf(cmd.OutOrStdout(), "alias %s deleted\n", args[0])
				return err
			})
		},
	})
	return c
}

func rotationCmd(f *clientFlags) *cobra.Command {
	var period time.Duration
	c := &cobra.Command{
		Use:   "set-rotation ID|ALIAS --period 720h",
		Short: "Set the automatic rotation period (0 disables); the leader rotates when due",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.keyCall(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) (*cabinetpb.KeyResponse, error) {
				return kc.SetRotationPolicy(ctx, &cabinetpb.SetRotationPolicyRequest{KeyId: args[0], PeriodSeconds: int64(period / time.Second), RequestId: newRequestID()})
			})
		},
	}
	c.Flags().DurationVar(&period, "period", 0, "rotation period (at least the server's --min-rotation-period), 0 to disable")
	return c
}

func versionCmd(f *clientFlags) *cobra.Command {
	mk := func(use string, enabled bool) *cobra.Command {
		return &cobra.Command{
			Use:   use + " ID|ALIAS VERSION",
			Short: strings.Title(use) + " one key version",
			Args:  cobra.ExactArgs(2),
			RunE: func(cmd *cobra.Command, args []string) error {
				var v uint32
				if _, err := fmt.Sscan(args[1], &v); err != nil || v == 0 {
					return fmt.Errorf("VERSION must be a positive number")
				}
				return f.keyCall(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) (*cabinetpb.KeyResponse, error) {
					return kc.SetKeyVersionState(ctx, &cabinetpb.SetKeyVersionStateRequest{KeyId: args[0], Version: v, Enabled: enabled, RequestId: newRequestID()})
				})
			},
		}
	}
	c := &cobra.Command{Use: "version", Short: "Enable or disable a single key version"}
	c.AddCommand(mk("enable", true), mk("disable", false))
	return c
}

func minVersionCmd(f *clientFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "set-min-decryption-version ID|ALIAS VERSION",
		Short: "Refuse decrypt/verify with versions below VERSION",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			var v uint32
			if _, err := fmt.Sscan(args[1], &v); err != nil || v == 0 {
				return fmt.Errorf("VERSION must be a positive number")
			}
			return f.keyCall(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) (*cabinetpb.KeyResponse, error) {
				return kc.SetMinDecryptionVersion(ctx, &cabinetpb.SetMinDecryptionVersionRequest{KeyId: args[0], Version: v, RequestId: newRequestID()})
			})
		},
	}
}

func importCmd(f *clientFlags) *cobra.Command {
	var spec, usage, alias, desc, in string
	c := &cobra.Command{
		Use:   "import --spec SPEC --in MATERIAL_FILE",
		Short: "Import your own key material (BYOK): it is wrapped here, before it leaves this machine",
		Long: `import asks the cluster for import parameters (an RSA-3072 wrapping public key and an
expiring import token), wraps the material locally with RSA_AES_KEY_WRAP_SHA_256 and imports it.
MATERIAL_FILE holds raw bytes for AES_256 (32) and HMAC keys, or a PKCS#8 DER private key for RSA,
EC and ED25519 keys. The plaintext material never travels: only the wrapped form does.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := parseSpec(spec)
			if err != nil {
				return err
			}
			var u cabinetpb.KeyUsage
			if usage != "" {
				v, ok := cabinetpb.KeyUsage_value[strings.ToUpper(usage)]
				if !ok {
					return fmt.Errorf("--usage must be ENCRYPT_DECRYPT, SIGN_VERIFY or GENERATE_VERIFY_MAC")
				}
				u = cabinetpb.KeyUsage(v)
			}
			if in == "" {
				return fmt.Errorf("--in is required: the file holding the key material")
			}
			material, err := os.ReadFile(in)
			if err != nil {
				return err
			}
			defer clear(material)
			return f.keyCall(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) (*cabinetpb.KeyResponse, error) {
				params, err := kc.GetImportParameters(ctx, &cabinetpb.GetImportParametersRequest{Spec: s})
				if err != nil {
					return nil, err
				}
				wrapped, err := keyops.WrapForImport(params.GetPublicKeyDer(), material)
				if err != nil {
					return nil, fmt.Errorf("wrap material: %w", err)
				}
				return kc.ImportKey(ctx, &cabinetpb.ImportKeyRequest{ImportToken: params.GetImportToken(), WrappedMaterial: wrapped,
					Spec: s, Usage: u, Alias: alias, Description: desc, RequestId: newRequestID()})
			})
		},
	}
	c.Flags().StringVar(&spec, "spec", "", "key spec of the material")
	c.Flags().StringVar(&usage, "usage", "", "ENCRYPT_DECRYPT or SIGN_VERIFY for RSA keys (others are fixed by the spec)")
	c.Flags().StringVar(&alias, "alias", "", "optional alias")
	c.Flags().StringVar(&desc, "description", "", "optional description")
	c.Flags().StringVar(&in, "in", "", "file with the key material")
	return c
}
