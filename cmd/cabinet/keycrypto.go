package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// Crypto commands beyond encrypt/decrypt/data-key.

func cryptoCmds(f *clientFlags) []*cobra.Command {
	return []*cobra.Command{signCmd(f), verifyCmd(f), publicKeyCmd(f), macCmd(f), verifyMacCmd(f), reEncryptCmd(f),
		randomCmd(f), batchEncryptCmd(f), batchDecryptCmd(f)}
}

func messageType(digest bool) cabinetpb.MessageType {
	if digest {
		return cabinetpb.MessageType_DIGEST
	}
	return cabinetpb.MessageType_RAW
}

func decodeB64Flag(name, v string) ([]byte, error) {
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(v))
	if err != nil {
		return nil, fmt.Errorf("--%s must be base64: %v", name, err)
	}
	return b, nil
}

func signCmd(f *clientFlags) *cobra.Command {
	var keyID, alg, in string
	var digest bool
	c := &cobra.Command{
		Use:   "sign --key K --algorithm ALG [--in FILE] [--digest]",
		Short: "Sign a message (or a digest with --digest); prints the base64 signature",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			msg, err := readInput(cmd, in, 64<<10)
			if err != nil {
				return err
			}
			return f.withKeys(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) error {
				resp, err := kc.Sign(ctx, &cabinetpb.SignRequest{KeyId: keyID, Message: msg, MessageType: messageType(digest), SigningAlgorithm: alg})
				if err != nil {
					return rpcError(err)
				}
				sig := base64.StdEncoding.EncodeToString(resp.GetSignature())
				if f.output == "json" {
					return printAnyJSON(cmd.OutOrStdout(), map[string]any{"signature": sig, "key_id": resp.GetKeyId(), "key_version": resp.GetKeyVersion(), "signing_algorithm": resp.GetSigningAlgorithm()})
				}
				_, err = fmt.Fprintln(cmd.OutOrStdout(), sig)
				return err
			})
		},
	}
	c.Flags().StringVar(&keyID, "key", "", "key id or alias")
	c.Flags().StringVar(&alg, "algorithm", "", "RSASSA_PSS_SHA_256|384|512, RSASSA_PKCS1_V1_5_SHA_256|384|512, ECDSA_SHA_256, ECDSA_SHA_384, ED25519")
	c.Flags().StringVar(&in, "in", "", "message file (default stdin)")
	c.Flags().BoolVar(&digest, "digest", false, "the input is already a digest of the algorithm's hash")
	return c
}

func verifyCmd(f *clientFlags) *cobra.Command {
	var keyID, alg, in, sig string
	var version uint32
	var digest, allowCompromised bool
	c := &cobra.Command{
		Use:   "verify --key K --algorithm ALG --signature B64 [--in FILE] [--digest]",
		Short: "Verify a signature; exits non-zero when it is invalid",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := decodeB64Flag("signature", sig)
			if err != nil {
				return err
			}
			msg, err := readInput(cmd, in, 64<<10)
			if err != nil {
				return err
			}
			return f.withKeys(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) error {
				resp, err := kc.Verify(ctx, &cabinetpb.VerifyRequest{KeyId: keyID, KeyVersion: version, Message: msg, MessageType: messageType(digest),
					SigningAlgorithm: alg, Signature: s, AllowCompromised: allowCompromised})
				if err != nil {
					return rpcError(err)
				}
				return reportValid(cmd, f, resp.GetValid(), resp.GetKeyId(), resp.GetKeyVersion(), "signature")
			})
		},
	}
	c.Flags().StringVar(&keyID, "key", "", "key id or alias")
	c.Flags().Uint32Var(&version, "version", 0, "key version (default: primary)")
	c.Flags().StringVar(&alg, "algorithm", "", "signing algorithm used")
	c.Flags().StringVar(&sig, "signature", "", "base64 signature")
	c.Flags().StringVar(&in, "in", "", "message file (default stdin)")
	c.Flags().BoolVar(&digest, "digest", false, "the input is a digest")
	c.Flags().BoolVar(&allowCompromised, "allow-compromised", false, "admin recovery override for a COMPROMISED key")
	return c
}

func reportValid(cmd *cobra.Command, f *clientFlags, valid bool, keyID string, version uint32, what string) error {
	if f.output == "json" {
		if err := printAnyJSON(cmd.OutOrStdout(), map[string]any{"valid": valid, "key_id": keyID, "key_version": version}); err != nil {
			return err
		}
	} else if valid {
		fmt.Fprintf(cmd.OutOrStdout(), "%s valid (key %s version %d)\n", what, keyID, version)
	}
	if !valid {
		return fmt.Errorf("%s is NOT valid for key %s version %d", what, keyID, version)
	}
	return nil
}

func publicKeyCmd(f *clientFlags) *cobra.Command {
	var version uint32
	var out string
	var der bool
	c := &cobra.Command{
		Use:   "public-key ID|ALIAS [--version N] [--out FILE] [--der]",
		Short: "Export an asymmetric key's public key (PEM, or DER with --der)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return f.withKeys(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) error {
				resp, err := kc.GetPublicKey(ctx, &cabinetpb.GetPublicKeyRequest{KeyId: args[0], KeyVersion: version})
				if err != nil {
					return rpcError(err)
				}
				if f.output == "json" {
					return printJSON(cmd.OutOrStdout(), resp)
				}
				data := []byte(resp.GetPublicKeyPem())
				if der {
					data = resp.GetPublicKeyDer()
				}
				if out != "" {
					return os.WriteFile(out, data, 0o644)
				}
				_, err = cmd.OutOrStdout().Write(data)
				return err
			})
		},
	}
	c.Flags().Uint32Var(&version, "version", 0, "key version (default: primary)")
	c.Flags().StringVar(&out, "out", "", "write to this file instead of stdout")
	c.Flags().BoolVar(&der, "der", false, "DER instead of PEM")
	return c
}

func macCmd(f *clientFlags) *cobra.Command {
	var keyID, in string
	c := &cobra.Command{
		Use:   "mac --key K [--in FILE]",
		Short: "Compute an HMAC with a GENERATE_VERIFY_MAC key; prints it in base64",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			msg, err := readInput(cmd, in, 64<<10)
			if err != nil {
				return err
			}
			return f.withKeys(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) error {
				resp, err := kc.GenerateMac(ctx, &cabinetpb.GenerateMacRequest{KeyId: keyID, Message: msg})
				if err != nil {
					return rpcError(err)
				}
				mac := base64.StdEncoding.EncodeToString(resp.GetMac())
				if f.output == "json" {
					return printAnyJSON(cmd.OutOrStdout(), map[string]any{"mac": mac, "key_id": resp.GetKeyId(), "key_version": resp.GetKeyVersion()})
				}
				_, err = fmt.Fprintln(cmd.OutOrStdout(), mac)
				return err
			})
		},
	}
	c.Flags().StringVar(&keyID, "key", "", "key id or alias")
	c.Flags().StringVar(&in, "in", "", "message file (default stdin)")
	return c
}

func verifyMacCmd(f *clientFlags) *cobra.Command {
	var keyID, in, mac string
	var version uint32
	c := &cobra.Command{
		Use:   "verify-mac --key K --mac B64 [--in FILE]",
		Short: "Verify an HMAC; exits non-zero when it is invalid",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := decodeB64Flag("mac", mac)
			if err != nil {
				return err
			}
			msg, err := readInput(cmd, in, 64<<10)
			if err != nil {
				return err
			}
			return f.withKeys(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) error {
				resp, err := kc.VerifyMac(ctx, &cabinetpb.VerifyMacRequest{KeyId: keyID, KeyVersion: version, Message: msg, Mac: m})
				if err != nil {
					return rpcError(err)
				}
				return reportValid(cmd, f, resp.GetValid(), resp.GetKeyId(), resp.GetKeyVersion(), "MAC")
			})
		},
	}
	c.Flags().StringVar(&keyID, "key", "", "key id or alias")
	c.Flags().Uint32Var(&version, "version", 0, "key version (default: primary)")
	c.Flags().StringVar(&mac, "mac", "", "base64 MAC")
	c.Flags().StringVar(&in, "in", "", "message file (default stdin)")
	return c
}

func reEncryptCmd(f *clientFlags) *cobra.Command {
	var dest, in string
	var srcCtx, dstCtx []string
	c := &cobra.Command{
		Use:   "re-encrypt [--to K] [--in FILE]",
		Short: "Re-encrypt a base64 ciphertext under a key's primary version (the same key by default) without exposing the plaintext",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			raw, err := readInput(cmd, in, 1<<20)
			if err != nil {
				return err
			}
			ct, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(raw)))
			if err != nil {
				return fmt.Errorf("the ciphertext must be base64: %v", err)
			}
			sc, err := parseContext(srcCtx)
			if err != nil {
				return err
			}
			dc, err := parseContext(dstCtx)
			if err != nil {
				return err
			}
			return f.withKeys(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) error {
				resp, err := kc.ReEncrypt(ctx, &cabinetpb.ReEncryptRequest{Ciphertext: ct, SourceEncryptionContext: sc, DestinationKeyId: dest, DestinationEncryptionContext: dc})
				if err != nil {
					return rpcError(err)
				}
				b64 := base64.StdEncoding.EncodeToString(resp.GetCiphertext())
				if f.output == "json" {
					return printAnyJSON(cmd.OutOrStdout(), map[string]any{"ciphertext": b64, "key_id": resp.GetKeyId(), "key_version": resp.GetKeyVersion(),
						"source_key_id": resp.GetSourceKeyId(), "source_key_version": resp.GetSourceKeyVersion()})
				}
				_, err = fmt.Fprintln(cmd.OutOrStdout(), b64)
				return err
			})
		},
	}
	c.Flags().StringVar(&dest, "to", "", "destination key id or alias (default: the ciphertext's key)")
	c.Flags().StringVar(&in, "in", "", "file with the base64 ciphertext (default stdin)")
	c.Flags().StringArrayVar(&srcCtx, "context", nil, "encryption context of the ciphertext, key=value (repeatable)")
	c.Flags().StringArrayVar(&dstCtx, "to-context", nil, "encryption context for the new ciphertext, key=value (repeatable)")
	return c
}

func randomCmd(f *clientFlags) *cobra.Command {
	var n int
	c := &cobra.Command{
		Use:   "random [--bytes N]",
		Short: "Random bytes from a node's HSM, base64",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return f.withKeys(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) error {
				resp, err := kc.GenerateRandom(ctx, &cabinetpb.GenerateRandomRequest{NumberOfBytes: int32(n)})
				if err != nil {
					return rpcError(err)
				}
				_, err = fmt.Fprintln(cmd.OutOrStdout(), base64.StdEncoding.EncodeToString(resp.GetRandom()))
				return err
			})
		},
	}
	c.Flags().IntVar(&n, "bytes", 32, "1..1024")
	return c
}

// readLines reads one non-empty line per item (at most 1000).
func readLines(cmd *cobra.Command, path string) ([]string, error) {
	raw, err := readInput(cmd, path, 64<<20)
	if err != nil {
		return nil, err
	}
	var out []string
	sc := bufio.NewScanner(strings.NewReader(string(raw)))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" {
			out = append(out, l)
		}
	}
	if len(out) == 0 || len(out) > 1000 {
		return nil, fmt.Errorf("give 1 to 1000 items, one per line (got %d)", len(out))
	}
	return out, sc.Err()
}

// printBatch prints one line per item: the value, or "ERROR <code>: <message>".
func printBatch(cmd *cobra.Command, values []string, errs []*cabinetpb.ItemError) error {
	failed := 0
	for i := range values {
		if errs[i] != nil {
			failed++
			fmt.Fprintf(cmd.OutOrStdout(), "ERROR %s: %s\n", errs[i].GetCode(), errs[i].GetMessage())
			continue
		}
		fmt.Fprintln(cmd.OutOrStdout(), values[i])
	}
	if failed > 0 {
		return fmt.Errorf("%d of %d items failed", failed, len(values))
	}
	return nil
}

func batchEncryptCmd(f *clientFlags) *cobra.Command {
	var keyID, in string
	var ctxPairs []string
	c := &cobra.Command{
		Use:   "batch-encrypt --key K [--in FILE]",
		Short: "Encrypt up to 1000 base64 plaintexts (one per line); prints one base64 ciphertext or error per line",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			lines, err := readLines(cmd, in)
			if err != nil {
				return err
			}
			ec, err := parseContext(ctxPairs)
			if err != nil {
				return err
			}
			req := &cabinetpb.BatchEncryptRequest{}
			for i, l := range lines {
				pt, err := base64.StdEncoding.DecodeString(l)
				if err != nil {
					return fmt.Errorf("line %d is not base64", i+1)
				}
				req.Items = append(req.Items, &cabinetpb.EncryptRequest{KeyId: keyID, Plaintext: pt, EncryptionContext: ec})
			}
			return f.withKeys(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) error {
				resp, err := kc.BatchEncrypt(ctx, req)
				if err != nil {
					return rpcError(err)
				}
				vals, errs := make([]string, len(resp.GetResults())), make([]*cabinetpb.ItemError, len(resp.GetResults()))
				for i, r := range resp.GetResults() {
					vals[i], errs[i] = base64.StdEncoding.EncodeToString(r.GetResponse().GetCiphertext()), r.GetError()
				}
				return printBatch(cmd, vals, errs)
			})
		},
	}
	c.Flags().StringVar(&keyID, "key", "", "key id or alias")
	c.Flags().StringVar(&in, "in", "", "file with one base64 plaintext per line (default stdin)")
	c.Flags().StringArrayVar(&ctxPairs, "context", nil, "encryption context for every item, key=value (repeatable)")
	return c
}

func batchDecryptCmd(f *clientFlags) *cobra.Command {
	var in string
	var ctxPairs []string
	c := &cobra.Command{
		Use:   "batch-decrypt [--in FILE]",
		Short: "Decrypt up to 1000 base64 ciphertexts (one per line); prints one base64 plaintext or error per line",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			lines, err := readLines(cmd, in)
			if err != nil {
				return err
			}
			ec, err := parseContext(ctxPairs)
			if err != nil {
				return err
			}
			req := &cabinetpb.BatchDecryptRequest{}
			for i, l := range lines {
				ct, err := base64.StdEncoding.DecodeString(l)
				if err != nil {
					return fmt.Errorf("line %d is not base64", i+1)
				}
				req.Items = append(req.Items, &cabinetpb.DecryptRequest{Ciphertext: ct, EncryptionContext: ec})
			}
			return f.withKeys(cmd, func(ctx context.Context, kc cabinetpb.KeyServiceClient) error {
				resp, err := kc.BatchDecrypt(ctx, req)
				if err != nil {
					return rpcError(err)
				}
				vals, errs := make([]string, len(resp.GetResults())), make([]*cabinetpb.ItemError, len(resp.GetResults()))
				for i, r := range resp.GetResults() {
					vals[i], errs[i] = base64.StdEncoding.EncodeToString(r.GetResponse().GetPlaintext()), r.GetError()
				}
				return printBatch(cmd, vals, errs)
			})
		},
	}
	c.Flags().StringVar(&in, "in", "", "file with one base64 ciphertext per line (default stdin)")
	c.Flags().StringArrayVar(&ctxPairs, "context", nil, "encryption context for every item, key=value (repeatable)")
	return c
}
