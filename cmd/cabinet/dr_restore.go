package main

import (
	"crypto"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/transport"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

// drRestoreCmd is `cabinet operator recovery restore`: disaster recovery into a
// brand-new first node (new data dir, new HSM token).
func drRestoreCmd() *cobra.Command {
	f := &nodeFlags{}
	var snapPath, bundlePath, keyPath, adminOut string
	cmd := &cobra.Command{
		Use:   "restore --snapshot FILE --bundle BUNDLE --recovery-key KEY --data-dir ... --node-id ... --api-addr ... --raft-addr ... --admin-out DIR HSM-FLAGS",
		Short: "Disaster recovery: build the first node of a new cluster from a snapshot, a recovery bundle and the recovery private key (offline)",
		Long: `restore prepares --data-dir as the first node of a cluster rebuilt from a snapshot, on a new
HSM token. It validates the snapshot and the bundle, generates this node's HSM identity, imports
the recovery private key into the HSM as a session object only long enough to unwrap each KEK
version from the bundle (the KEK is stored as a token object, the recovery key destroyed), and
checks every KEK against the snapshot's check values. The cluster CA key in the snapshot is
sealed under that KEK, so the cluster keeps its CA (clients' certificates stay valid): restore
unseals it to issue this node's certificate and a new admin certificate (--admin-out). This
node replaces the old nodes in the state (they are not members of the new cluster), and Raft
starts from the snapshot with this node as the single voter. Then:

  cabinet server --data-dir DIR                      # this node, leader of the restored cluster
  cabinet operator join-token create                 # with the new admin credentials
  cabinet operator join --token ... --peer ...       # on every further new node, as usual`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if snapPath == "" || bundlePath == "" || keyPath == "" || adminOut == "" {
				return errors.New("--snapshot, --bundle, --recovery-key and --admin-out are required")
			}
			ips, err := f.validate()
			if err != nil {
				return err
			}
			if entries, err := os.ReadDir(f.dataDir); err == nil && len(entries) > 0 {
				return fmt.Errorf("%s is not empty; restore needs a fresh --data-dir", f.dataDir)
			}
			hc, err := f.hsm.config()
			if err != nil {
				return err
			}
			start := time.Now()
			out := cmd.OutOrStdout()

			// 1. Inputs, all checked before the HSM is touched.
			b, err := readBackupFile(snapPath)
			if err != nil {
				return fmt.Errorf("refusing to restore: %w", err)
			}
			st := b.State
			ci := st.GetCluster()
			if ci == nil {
				return errors.New("refusing to restore: the snapshot holds no initialised cluster")
			}
			bundle, err := readRecoveryBundle(bundlePath)
			if err != nil {
				return err
			}
			if bundle.GetClusterId() != ci.GetClusterId() {
				return fmt.Errorf("the bundle is for cluster %s, the snapshot is of cluster %s", bundle.GetClusterId(), ci.GetClusterId())
			}
			if want := strings.ToLower(hc.OAEPHash); bundle.GetOaepHash() != "" && want != "" && bundle.GetOaepHash() != want {
				return fmt.Errorf("the bundle was wrapped with RSA-OAEP-%s; pass --hsm-oaep-hash %s", bundle.GetOaepHash(), bundle.GetOaepHash())
			}
			keyDER, err := readRecoveryPrivateKey(keyPath)
			if err != nil {
				return err
			}
			defer clear(keyDER)
			if fp, err := recoveryKeyFingerprint(keyDER); err != nil {
				return err
			} else if fp != bundle.GetRecoveryKeyFingerprint() {
				return fmt.Errorf("%s is not the recovery key this bundle was made for (fingerprint %s, bundle says %s)", keyPath, fp, bundle.GetRecoveryKeyFingerprint())
			}
			needed, err := neededKEKs(st)
			if err != nil {
				return err
			}
			wrapped := map[uint32]*struct{ blob, cv []byte }{}
			for _, k := range bundle.GetKeks() {
				wrapped[k.GetVersion()] = &struct{ blob, cv []byte }{k.GetWrapped(), k.GetCheckValue()}
			}
			for _, v := range sortedVersions(needed) {
				w, ok := wrapped[v]
				if !ok {
					return fmt.Errorf("the snapshot needs KEK version %d, which the bundle does not hold (export a bundle after the last KEK rotation)", v)
				}
				if subtle.ConstantTimeCompare(w.cv, needed[v]) != 1 {
					return fmt.Errorf("the bundle's KEK version %d has a different check value than the snapshot's: they are not of the same cluster history", v)
				}
			}
			fmt.Fprintf(out, "Snapshot of cluster %s at index %d (%d keys) and recovery bundle verified.\n", ci.GetClusterId(), b.Header.Index, len(st.GetKeys()))

			// 2. The new HSM: identity, KEKs unwrapped with the recovery key.
			ctx := cmd.Context()
			h, err := openNodeHSM(ctx, hc)
			if err != nil {
				return err
			}
			defer h.Close()
			pub, err := h.EnsureIdentity(ctx)
			if err != nil {
				return fmt.Errorf("HSM identity key: %w", err)
			}
			pubDER, err := x509.MarshalPKIXPublicKey(pub)
			if err != nil {
				return err
			}
			for _, v := range sortedVersions(needed) {
				kcv, err := h.UnwrapKEKWithRecoveryKey(ctx, v, keyDER, wrapped[v].blob)
				if err != nil {
					return fmt.Errorf("unwrap KEK version %d with the recovery key in this node's HSM: %w", v, err)
				}
				if subtle.ConstantTimeCompare(kcv, needed[v]) != 1 {
					return fmt.Errorf("KEK version %d unwrapped here does not match the snapshot's check value; refusing", v)
				}
				fmt.Fprintf(out, "KEK version %d unwrapped into HSM token %q (check value %x); the recovery key was not kept.\n", v, hc.TokenLabel, kcv)
			}

			// 3. The cluster CA (sealed under the KEK) issues this node's and an admin's certificates.
			caKey, err := h.Open(ctx, ci.GetCaKey().GetKekVersion(), ci.GetCaKey().GetBlob(), transport.CAKeyAAD(ci.GetClusterId()))
			if err != nil {
				return fmt.Errorf("unseal the cluster CA key with the restored KEK: %w", err)
			}
			ca, err := tlsutil.LoadCA(ci.GetCaCertDer(), caKey)
			clear(caKey)
			if err != nil {
				return fmt.Errorf("load the cluster CA: %w", err)
			}
			now := time.Now()
			oldNodes := strings.Join(cluster.Summarize(st).Nodes, ", ")

			// 4. The state with this node as its only member, as Raft's first snapshot.
			data, err := cluster.ReplaceMembership(st, []*fsmpb.NodeRecord{{
				NodeId: f.nodeID, ApiAddr: f.apiAddr, RaftAddr: f.raftAddr, IdentityPublicKeyDer: pubDER,
				JoinedUnixNano: now.UnixNano(), Region: f.region, Voter: true, FeatureLevel: fsm.FeatureLevel,
			}}, true)
			if err != nil {
				return fmt.Errorf("replace the old nodes in the state: %w", err)
			}
			if err := cluster.SeedFromSnapshot(filepath.Join(f.dataDir, "raft"), f.nodeID, f.raftAddr, data); err != nil {
				return fmt.Errorf("seed Raft from the snapshot: %w", err)
			}
			if err := writeFirstNodeCreds(f.dataDir, f.nodeID, ips, ca, adminOut, now); err != nil {
				return err
			}
			// node.json last: a server waiting on this dir starts once it appears.
			if err := saveNodeConfig(f.dataDir, &nodeConfig{
				NodeID: f.nodeID, ClusterID: ci.GetClusterId(), APIAddr: f.apiAddr, RaftAddr: f.raftAddr, Region: f.region, HSM: hc, Bootstrap: true,
			}); err != nil {
				return err
			}
			fmt.Fprintf(out, "Restored cluster %s on node %s from snapshot index %d: %d keys, old nodes %s replaced by %s (%v).\n",
				ci.GetClusterId(), f.nodeID, b.Header.Index, len(st.GetKeys()), oldNodes, f.nodeID, time.Since(start).Round(time.Millisecond))
			fmt.Fprintf(out, "Admin credentials: %s/{ca.pem,admin.pem,admin-key.pem}\n", adminOut)
			fmt.Fprintf(out, "Next: cabinet server --data-dir %s; then join further nodes with join tokens.\n", f.dataDir)
			return nil
		},
	}
	addNodeFlags(cmd, f)
	cmd.Flags().StringVar(&snapPath, "snapshot", "", "snapshot file (from `operator snapshot save`)")
	cmd.Flags().StringVar(&bundlePath, "bundle", "", "recovery bundle (from `operator recovery export`)")
	cmd.Flags().StringVar(&keyPath, "recovery-key", "", "recovery private key PEM (from `operator recovery keygen`)")
	cmd.Flags().StringVar(&adminOut, "admin-out", "", "directory for the new admin's credentials (ca.pem, admin.pem, admin-key.pem)")
	return cmd
}

// neededKEKs: every KEK version the state lists as active, seals key
// material under, or seals the CA key under, with its check value.
func neededKEKs(st *fsmpb.State) (map[uint32][]byte, error) {
	ci := st.GetCluster()
	all := map[uint32][]byte{}
	needed := map[uint32][]byte{}
	for _, k := range ci.GetKekVersions() {
		all[k.GetVersion()] = k.GetCheckValue()
		if fsm.KEKOpensMaterial(k.GetState()) {
			needed[k.GetVersion()] = k.GetCheckValue()
		}
	}
	use := func(v uint32) error {
		cv, ok := all[v]
		if !ok {
			return fmt.Errorf("the snapshot seals material under KEK version %d, which it does not list", v)
		}
		needed[v] = cv
		return nil
	}
	if err := use(ci.GetCaKey().GetKekVersion()); err != nil {
		return nil, err
	}
	for _, k := range st.GetKeys() {
		for _, v := range k.GetVersions() {
			if m := v.GetMaterial(); m != nil {
				if err := use(m.GetKekVersion()); err != nil {
					return nil, err
				}
			}
		}
	}
	return needed, nil
}

func sortedVersions(m map[uint32][]byte) []uint32 {
	out := make([]uint32, 0, len(m))
	for v := range m {
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}

// readRecoveryPrivateKey reads the PKCS#8 PEM written by `recovery keygen`,
// refusing a file others can read.
func readRecoveryPrivateKey(path string) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("recovery key %s is readable by group or others (mode %v): chmod 600 it", path, fi.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	defer clear(b)
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("%s holds no PEM PRIVATE KEY (PKCS#8) block", path)
	}
	return blk.Bytes, nil
}

func recoveryKeyFingerprint(pkcs8 []byte) (string, error) {
	k, err := x509.ParsePKCS8PrivateKey(pkcs8)
	if err != nil {
		return "", fmt.Errorf("recovery key: %w", err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return "", errors.New("recovery key has no public half")
	}
	der, err := x509.MarshalPKIXPublicKey(signer.Public())
	if err != nil {
		return "", fmt.Errorf("recovery key: %w", err)
	}
	fp := sha256.Sum256(der)
	return hex.EncodeToString(fp[:]), nil
}
