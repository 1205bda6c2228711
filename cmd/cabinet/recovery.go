package main

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/cabinet-kms/cabinet/transport"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// `cabinet operator recovery keygen|export|restore`: the offline recovery
// key pair, the KEK bundle wrapped under it, and disaster-recovery restore
// into brand-new nodes (dr_restore.go). See docs/DR.md.

const (
	recoveryKeyFile = "recovery-key.pem"
	recoveryPubFile = "recovery-pub.pem"
)

func recoveryCmd(f *clientFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "recovery",
		Short: "Disaster recovery: offline recovery keys, KEK bundles, restore into new nodes",
		Long: `A snapshot holds key material only sealed under the cluster KEK, which lives only in HSMs.
To survive losing every HSM, export the KEK wrapped under an offline RSA-4096 recovery key:

  cabinet operator recovery keygen --out DIR          # on an offline machine; keep the private key there
  cabinet operator recovery export --recovery-pubkey DIR/recovery-pub.pem --out kek.bundle
  cabinet operator snapshot save state.snap
  cabinet operator recovery restore --snapshot state.snap --bundle kek.bundle --recovery-key DIR/recovery-key.pem ...

See docs/DR.md for the runbook.`,
	}
	cmd.AddCommand(recoveryKeygenCmd(), recoveryExportCmd(f), drRestoreCmd())
	return cmd
}

func recoveryKeygenCmd() *cobra.Command {
	var out string
	var bits int
	cmd := &cobra.Command{
		Use:   "keygen --out DIR",
		Short: "Make an RSA-4096 recovery key pair (run it offline; the private key belongs offline)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return errors.New("--out DIR is required")
			}
			if bits < transport.MinRecoveryKeyBits {
				return fmt.Errorf("--bits must be at least %d", transport.MinRecoveryKeyBits)
			}
			privPath, pubPath := filepath.Join(out, recoveryKeyFile), filepath.Join(out, recoveryPubFile)
			for _, p := range []string{privPath, pubPath} {
				if _, err := os.Stat(p); err == nil {
					return fmt.Errorf("%s exists; refusing to overwrite a recovery key", p)
				}
			}
			if err := os.MkdirAll(out, 0o700); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "Generating an RSA-%d recovery key pair...\n", bits)
			k, err := rsa.GenerateKey(rand.Reader, bits)
			if err != nil {
				return err
			}
			privDER, err := x509.MarshalPKCS8PrivateKey(k)
			if err != nil {
				return err
			}
			pubDER, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
			if err != nil {
				return err
			}
			privPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: privDER})
			clear(privDER)
			if err := writeNewFile(privPath, privPEM, 0o600); err != nil {
				return err
			}
			clear(privPEM)
			if err := writeNewFile(pubPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o644); err != nil {
				return err
			}
			fp := sha256.Sum256(pubDER)
			fmt.Fprintf(cmd.OutOrStdout(), `Recovery key pair written:
  private key  %s (mode 0600, PKCS#8)
  public key   %s
  fingerprint  %s

The private key BELONGS OFFLINE: whoever holds it and a recovery bundle holds the cluster KEK,
i.e. every key in the cluster. Move it to offline storage (e.g. a safe, split among custodians)
and delete it from this machine. Only the public key is needed for 'recovery export'.
`, privPath, pubPath, hex.EncodeToString(fp[:]))
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "directory for recovery-key.pem and recovery-pub.pem (created, mode 0700)")
	cmd.Flags().IntVar(&bits, "bits", 4096, "RSA key size (at least 4096)")
	return cmd
}

func writeNewFile(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// readRecoveryPublicKey reads a PEM "PUBLIC KEY" (PKIX) RSA key.
func readRecoveryPublicKey(path string) ([]byte, *rsa.PublicKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PUBLIC KEY" {
		return nil, nil, fmt.Errorf("%s holds no PEM PUBLIC KEY block", path)
	}
	k, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	pub, ok := k.(*rsa.PublicKey)
	if !ok {
		return nil, nil, fmt.Errorf("%s is not an RSA public key", path)
	}
	return blk.Bytes, pub, nil
}

func recoveryExportCmd(f *clientFlags) *cobra.Command {
	var pubPath, out string
	var force bool
	cmd := &cobra.Command{
		Use:   "export --recovery-pubkey FILE --out BUNDLE",
		Short: "Write the cluster KEK(s) wrapped under an offline recovery public key (admin)",
		Long: `export asks the node at --addr to wrap every active KEK version under the recovery public
key inside its HSM (C_WrapKey, RSA-OAEP with the node's configured hash) and writes the bundle
(JSON) to BUNDLE. The bundle alone reveals nothing; with the recovery private key it yields
the KEK. Re-export after every KEK rotation.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if pubPath == "" || out == "" {
				return errors.New("--recovery-pubkey and --out are required")
			}
			if !force {
				if _, err := os.Stat(out); err == nil {
					return fmt.Errorf("%s exists; choose another name or pass --force", out)
				}
			}
			der, pub, err := readRecoveryPublicKey(pubPath)
			if err != nil {
				return err
			}
			if pub.N.BitLen() < transport.MinRecoveryKeyBits {
				return fmt.Errorf("%s is RSA-%d; a recovery key must have at least %d bits", pubPath, pub.N.BitLen(), transport.MinRecoveryKeyBits)
			}
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			bundle, err := cabinetpb.NewOperatorServiceClient(conn).RecoveryExport(ctx, &cabinetpb.RecoveryExportRequest{RecoveryPublicKeyDer: der})
			if err != nil {
				return rpcError(err)
			}
			fp := sha256.Sum256(der)
			if subtle.ConstantTimeCompare([]byte(bundle.GetRecoveryKeyFingerprint()), []byte(hex.EncodeToString(fp[:]))) != 1 {
				return errors.New("the bundle names a different recovery key than the one sent; refusing to write it")
			}
			if len(bundle.GetKeks()) == 0 {
				return errors.New("the bundle holds no KEK version; refusing to write it")
			}
			b, err := protojson.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(bundle)
			if err != nil {
				return err
			}
			if err := writeFileAtomic(out, append(b, '\n'), 0o600); err != nil {
				return err
			}
			var versions []string
			for _, k := range bundle.GetKeks() {
				versions = append(versions, fmt.Sprintf("v%d", k.GetVersion()))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Recovery bundle for cluster %s written to %s: KEK %s wrapped under recovery key %s (RSA-OAEP-%s).\n",
				bundle.GetClusterId(), out, strings.Join(versions, ", "), bundle.GetRecoveryKeyFingerprint()[:16], strings.ToUpper(bundle.GetOaepHash()))
			return nil
		},
	}
	cmd.Flags().StringVar(&pubPath, "recovery-pubkey", "", "recovery public key PEM (from `recovery keygen`)")
	cmd.Flags().StringVar(&out, "out", "", "where to write the bundle")
	cmd.Flags().BoolVar(&force, "force", false, "overwrite --out if it exists")
	return cmd
}

// readRecoveryBundle reads a bundle written by `recovery export`.
func readRecoveryBundle(path string) (*cabinetpb.RecoveryBundle, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var bundle cabinetpb.RecoveryBundle
	if err := protojson.Unmarshal(b, &bundle); err != nil {
		return nil, fmt.Errorf("%s is not a recovery bundle: %w", path, err)
	}
	if bundle.GetFormat() != transport.RecoveryBundleFormat {
		return nil, fmt.Errorf("%s: bundle format %d; this binary reads format %d", path, bundle.GetFormat(), transport.RecoveryBundleFormat)
	}
	if len(bundle.GetKeks()) == 0 {
		return nil, fmt.Errorf("%s holds no KEK", path)
	}
	return &bundle, nil
}
