package main

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

func newKeyCmd() *cobra.Command {
	f := &clientFlags{}
	cmd := &cobra.Command{Use: "key", Short: "Create keys and use them (encrypt, decrypt, data keys)"}
	addClientFlags(cmd, f)
	cmd.AddCommand(keyCreateCmd(f), keyListCmd(f), keyDescribeCmd(f), keyEncryptCmd(f), keyDecryptCmd(f), keyDataKeyCmd(f))
	cmd.AddCommand(lifecycleCmds(f)...)
	cmd.AddCommand(cryptoCmds(f)...)
	cmd.AddCommand(authzKeyCmds(f)...)
	return cmd
}

func newRequestID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return "cli-" + hex.EncodeToString(b)
}

func parseSpec(s string) (cabinetpb.KeySpec, error) {
	v, ok := cabinetpb.KeySpec_value[strings.ToUpper(s)]
	if !ok || v == 0 {
		var names []string
		for i := int32(1); ; i++ {
			n, ok := cabinetpb.KeySpec_name[i]
			if !ok {
				break
			}
			names = append(names, n)
		}
		return 0, fmt.Errorf("unknown --spec %q; one of %s", s, strings.Join(names, ", "))
	}
	return cabinetpb.KeySpec(v), nil
}

func keyCreateCmd(f *clientFlags) *cobra.Command {
	var spec, alias, desc, reqID, usage string
	var tags []string
	var rotation time.Duration
	c := &cobra.Command{
		Use:   "create",
		Short: "Create a key (material generated and wrapped by the cluster's HSMs)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := parseSpec(spec)
			if err != nil {
				return err
			}
			tagMap, err := parseContext(tags)
			if err != nil {
				return fmt.Errorf("--tag: %w", err)
			}
			if reqID == "" {
				reqID = newRequestID()
			}
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			var u cabinetpb.KeyUsage
			if usage != "" {
				v, ok := cabinetpb.KeyUsage_value[strings.ToUpper(usage)]
				if !ok {
					return fmt.Errorf("--usage must be ENCRYPT_DECRYPT, SIGN_VERIFY or GENERATE_VERIFY_MAC")
				}
				u = cabinetpb.KeyUsage(v)
			}
			resp, err := cabinetpb.NewKeyServiceClient(conn).CreateKey(ctx, &cabinetpb.CreateKeyRequest{
				Spec: s, Usage: u, Alias: alias, Description: desc, Tags: tagMap, RequestId: reqID,
				RotationPeriodSeconds: int64(rotation / time.Second),
			})
			if err != nil {
				return rpcError(err)
			}
			return printKey(cmd.OutOrStdout(), f, resp.GetKey())
		},
	}
	c.Flags().StringVar(&spec, "spec", "AES_256", "key spec: AES_256, HMAC_SHA256, HMAC_SHA512, RSA_2048, RSA_3072, RSA_4096, EC_P256, EC_P384, ED25519")
	c.Flags().StringVar(&usage, "usage", "", "RSA keys: ENCRYPT_DECRYPT or SIGN_VERIFY (others follow from the spec)")
	c.Flags().DurationVar(&rotation, "rotation-period", 0, "rotate automatically every period, e.g. 2160h (symmetric keys)")
	c.Flags().StringVar(&alias, "alias", "", "optional unique alias ([A-Za-z0-9/_-], not starting with k-)")
	c.Flags().StringVar(&desc, "description", "", "optional description")
	c.Flags().StringArrayVar(&tags, "tag", nil, "tag key=value (repeatable)")
	c.Flags().StringVar(&reqID, "request-id", "", "idempotency key: retrying with the same id returns the same key (default: random)")
	return c
}

func printKey(w io.Writer, f *clientFlags, k *cabinetpb.Key) error {
	if f.output == "json" {
		return printJSON(w, k)
	}
	t := newTable(w)
	fmt.Fprintf(t, "Key ID\t%s\n", k.GetKeyId())
	if k.GetAlias() != "" {
		fmt.Fprintf(t, "Alias\t%s\n", k.GetAlias())
	}
	fmt.Fprintf(t, "Spec\t%s\n", k.GetSpec())
	fmt.Fprintf(t, "Usage\t%s\n", k.GetUsage())
	fmt.Fprintf(t, "State\t%s\n", k.GetState())
	fmt.Fprintf(t, "Primary version\t%d\n", k.GetPrimaryVersion())
	fmt.Fprintf(t, "Created\t%s by %s\n", k.GetCreatedAt().AsTime().Format("2006-01-02T15:04:05Z07:00"), k.GetCreatedBy())
	if k.GetDescription() != "" {
		fmt.Fprintf(t, "Description\t%s\n", k.GetDescription())
	}
	for tk, tv := range k.GetTags() {
		fmt.Fprintf(t, "Tag\t%s=%s\n", tk, tv)
	}
	for _, v := range k.GetVersions() {
		fmt.Fprintf(t, "Version %d\t%s, created %s\n", v.GetVersion(), v.GetState(), v.GetCreatedAt().AsTime().Format("2006-01-02T15:04:05Z07:00"))
	}
	return t.Flush()
}

func keyListCmd(f *clientFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List keys",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			all := &cabinetpb.ListKeysResponse{}
			token := ""
			for {
				resp, err := cabinetpb.NewKeyServiceClient(conn).ListKeys(ctx, &cabinetpb.ListKeysRequest{PageSize: 1000, PageToken: token})
				if err != nil {
					return rpcError(err)
				}
				all.Keys = append(all.Keys, resp.GetKeys()...)
				if token = resp.GetNextPageToken(); token == "" {
					break
				}
			}
			if f.output == "json" {
				return printJSON(cmd.OutOrStdout(), all)
			}
			t := newTable(cmd.OutOrStdout())
			fmt.Fprintln(t, "KEY ID\tALIAS\tSPEC\tSTATE\tPRIMARY\tCREATED")
			for _, k := range all.GetKeys() {
				fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%d\t%s\n", k.GetKeyId(), k.GetAlias(), k.GetSpec(), k.GetState(),
					k.GetPrimaryVersion(), k.GetCreatedAt().AsTime().Format("2006-01-02T15:04:05Z"))
			}
			return t.Flush()
		},
	}
}

func keyDescribeCmd(f *clientFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "describe ID|ALIAS",
		Short: "Show a key's metadata",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			resp, err := cabinetpb.NewKeyServiceClient(conn).DescribeKey(ctx, &cabinetpb.DescribeKeyRequest{KeyId: args[0]})
			if err != nil {
				return rpcError(err)
			}
			return printKey(cmd.OutOrStdout(), f, resp.GetKey())
		},
	}
}

// readInput reads from a file or, with "" or "-", from stdin.
func readInput(cmd *cobra.Command, path string, max int64) ([]byte, error) {
	var r io.Reader = cmd.InOrStdin()
	if path != "" && path != "-" {
		fh, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer fh.Close()
		r = fh
	}
	b, err := io.ReadAll(io.LimitReader(r, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("input is larger than %d bytes; for large data use envelope encryption with `cabinet key data-key`", max)
	}
	return b, nil
}

func consistency(strong bool) cabinetpb.Consistency {
	if strong {
		return cabinetpb.Consistency_STRONG
	}
	return cabinetpb.Consistency_BOUNDED_STALENESS
}

func keyEncryptCmd(f *clientFlags) *cobra.Command {
	var keyID, in string
	var ctxPairs []string
	var strong bool
	c := &cobra.Command{
		Use:   "encrypt",
		Short: "Encrypt plaintext (from --in FILE or stdin, at most 64 KiB); prints base64 ciphertext",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if keyID == "" {
				return fmt.Errorf("--key is required (a key id or alias)")
			}
			ec, err := parseContext(ctxPairs)
			if err != nil {
				return err
			}
			pt, err := readInput(cmd, in, 64<<10)
			if err != nil {
				return err
			}
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			resp, err := cabinetpb.NewKeyServiceClient(conn).Encrypt(ctx, &cabinetpb.EncryptRequest{
				KeyId: keyID, Plaintext: pt, EncryptionContext: ec, Consistency: consistency(strong),
			})
			if err != nil {
				return rpcError(err)
			}
			b64 := base64.StdEncoding.EncodeToString(resp.GetCiphertext())
			if f.output == "json" {
				return printAnyJSON(cmd.OutOrStdout(), map[string]any{"ciphertext": b64, "key_id": resp.GetKeyId(), "key_version": resp.GetKeyVersion()})
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), b64)
			return err
		},
	}
	c.Flags().StringVar(&keyID, "key", "", "key id or alias")
	c.Flags().StringVar(&in, "in", "", "plaintext file (default stdin)")
	c.Flags().StringArrayVar(&ctxPairs, "context", nil, "encryption context key=value (repeatable); the same pairs are needed to decrypt")
	c.Flags().BoolVar(&strong, "strong", false, "STRONG consistency: the node catches up with the leader first")
	return c
}

func keyDecryptCmd(f *clientFlags) *cobra.Command {
	var in, out, keyID string
	var version uint32
	var ctxPairs []string
	var strong, allowCompromised bool
	c := &cobra.Command{
		Use:   "decrypt",
		Short: "Decrypt base64 ciphertext (from --in FILE or stdin); writes the plaintext to stdout or --out",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ec, err := parseContext(ctxPairs)
			if err != nil {
				return err
			}
			raw, err := readInput(cmd, in, 1<<20)
			if err != nil {
				return err
			}
			ct, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(raw)))
			if err != nil {
				return fmt.Errorf("the ciphertext must be the base64 text printed by `cabinet key encrypt`: %v", err)
			}
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			resp, err := cabinetpb.NewKeyServiceClient(conn).Decrypt(ctx, &cabinetpb.DecryptRequest{
				Ciphertext: ct, EncryptionContext: ec, Consistency: consistency(strong),
				KeyId: keyID, KeyVersion: version, AllowCompromised: allowCompromised,
			})
			if err != nil {
				return rpcError(err)
			}
			if f.output == "json" {
				return printAnyJSON(cmd.OutOrStdout(), map[string]any{
					"plaintext": base64.StdEncoding.EncodeToString(resp.GetPlaintext()), "key_id": resp.GetKeyId(), "key_version": resp.GetKeyVersion()})
			}
			if out != "" && out != "-" {
				return os.WriteFile(out, resp.GetPlaintext(), 0o600)
			}
			_, err = cmd.OutOrStdout().Write(resp.GetPlaintext())
			return err
		},
	}
	c.Flags().StringVar(&in, "in", "", "file with the base64 ciphertext (default stdin)")
	c.Flags().StringVar(&out, "out", "", "write the plaintext to this file (mode 0600) instead of stdout")
	c.Flags().StringArrayVar(&ctxPairs, "context", nil, "encryption context key=value (repeatable), as given to encrypt")
	c.Flags().StringVar(&keyID, "key", "", "RSA keys only: the key (their ciphertexts are raw RSA-OAEP and name no key)")
	c.Flags().Uint32Var(&version, "version", 0, "RSA keys only: the key version (default: primary)")
	c.Flags().BoolVar(&allowCompromised, "allow-compromised", false, "admin recovery override: decrypt with a COMPROMISED key")
	c.Flags().BoolVar(&strong, "strong", false, "STRONG consistency: the node catches up with the leader first")
	return c
}

func keyDataKeyCmd(f *clientFlags) *cobra.Command {
	var keyID string
	var n int
	var ctxPairs []string
	var noPlaintext bool
	c := &cobra.Command{
		Use:   "data-key",
		Short: "Generate a data key: prints its plaintext and its ciphertext under --key (base64)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if keyID == "" {
				return fmt.Errorf("--key is required (a key id or alias)")
			}
			ec, err := parseContext(ctxPairs)
			if err != nil {
				return err
			}
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			gdk := &cabinetpb.GenerateDataKeyRequest{KeyId: keyID, NumberOfBytes: int32(n), EncryptionContext: ec}
			if noPlaintext {
				resp, err := cabinetpb.NewKeyServiceClient(conn).GenerateDataKeyWithoutPlaintext(ctx, gdk)
				if err != nil {
					return rpcError(err)
				}
				ct := base64.StdEncoding.EncodeToString(resp.GetCiphertext())
				if f.output == "json" {
					return printAnyJSON(cmd.OutOrStdout(), map[string]any{"ciphertext": ct, "key_id": resp.GetKeyId(), "key_version": resp.GetKeyVersion()})
				}
				_, err = fmt.Fprintln(cmd.OutOrStdout(), ct)
				return err
			}
			resp, err := cabinetpb.NewKeyServiceClient(conn).GenerateDataKey(ctx, gdk)
			if err != nil {
				return rpcError(err)
			}
			pt := base64.StdEncoding.EncodeToString(resp.GetPlaintext())
			ct := base64.StdEncoding.EncodeToString(resp.GetCiphertext())
			if f.output == "json" {
				return printAnyJSON(cmd.OutOrStdout(), map[string]any{"plaintext": pt, "ciphertext": ct, "key_id": resp.GetKeyId(), "key_version": resp.GetKeyVersion()})
			}
			t := newTable(cmd.OutOrStdout())
			fmt.Fprintf(t, "Key ID\t%s (version %d)\n", resp.GetKeyId(), resp.GetKeyVersion())
			fmt.Fprintf(t, "Plaintext\t%s\n", pt)
			fmt.Fprintf(t, "Ciphertext\t%s\n", ct)
			return t.Flush()
		},
	}
	c.Flags().StringVar(&keyID, "key", "", "key id or alias")
	c.Flags().IntVar(&n, "bytes", 32, "data key length in bytes (1..1024)")
	c.Flags().BoolVar(&noPlaintext, "no-plaintext", false, "return only the encrypted data key (GenerateDataKeyWithoutPlaintext)")
	c.Flags().StringArrayVar(&ctxPairs, "context", nil, "encryption context key=value (repeatable)")
	return c
}
