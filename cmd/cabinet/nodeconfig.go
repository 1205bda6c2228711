package main

import (
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/cabinet-kms/cabinet/hsm"
)

// nodeConfig is what `operator init` / `operator join` write into a node's
// data dir (node.json) and what `cabinet server --data-dir` reads. It holds
// no secret: the HSM PIN stays in its own file (or the environment).
type nodeConfig struct {
	NodeID    string    `json:"node_id"`
	ClusterID string    `json:"cluster_id"`
	APIAddr   string    `json:"api_addr"`
	RaftAddr  string    `json:"raft_addr"`
	Region    string    `json:"region,omitempty"`
	HSM       hsmConfig `json:"hsm"`
	// Bootstrap is true on the node that ran `operator init`.
	Bootstrap bool `json:"bootstrap,omitempty"`
	// JoinAddrs are API addresses of existing members, asked to add this
	// node to the Raft configuration when it first starts.
	JoinAddrs []string `json:"join_addrs,omitempty"`
}

type hsmConfig struct {
	Library     string `json:"library"`
	TokenLabel  string `json:"token_label"`
	PINFile     string `json:"pin_file,omitempty"`
	SoftHSMConf string `json:"softhsm_conf,omitempty"`
	OAEPHash    string `json:"oaep_hash,omitempty"`
}

const (
	nodeConfigFile = "node.json"
	initFile       = "init.pb"
)

func tlsDir(dataDir string) string { return filepath.Join(dataDir, "tls") }

func loadNodeConfig(dataDir string) (*nodeConfig, error) {
	b, err := os.ReadFile(filepath.Join(dataDir, nodeConfigFile))
	if err != nil {
		return nil, err
	}
	var nc nodeConfig
	if err := json.Unmarshal(b, &nc); err != nil {
		return nil, fmt.Errorf("parse %s: %w", filepath.Join(dataDir, nodeConfigFile), err)
	}
	return &nc, nil
}

// writeFileAtomic writes via a temp file and rename so a reader never sees
// half a file.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func saveNodeConfig(dataDir string, nc *nodeConfig) error {
	b, err := json.MarshalIndent(nc, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dataDir, nodeConfigFile), append(b, '\n'), 0o600)
}

// hsmFlags are the HSM flags of init, join and server. The PIN is never a
// flag value (it would show in ps): it comes from a file or CABINET_HSM_PIN.
type hsmFlags struct {
	library, tokenLabel, pinFile, softhsmConf, oaepHash string
}

func addHSMFlags(cmd *cobra.Command, f *hsmFlags) {
	cmd.Flags().StringVar(&f.library, "hsm-lib", "/usr/lib/softhsm/libsofthsm2.so", "PKCS#11 library")
	cmd.Flags().StringVar(&f.tokenLabel, "hsm-token-label", "", "label of this node's HSM token")
	cmd.Flags().StringVar(&f.pinFile, "hsm-pin-file", "", "file holding the token user PIN (or set CABINET_HSM_PIN)")
	cmd.Flags().StringVar(&f.softhsmConf, "softhsm-conf", "", "SoftHSM2 config for this node's token (sets SOFTHSM2_CONF)")
	cmd.Flags().StringVar(&f.oaepHash, "hsm-oaep-hash", "sha1", "RSA-OAEP hash for KEK transfer: sha1 (SoftHSM 2.6) or sha256")
}

func (f *hsmFlags) config() (hsmConfig, error) {
	if f.tokenLabel == "" {
		return hsmConfig{}, errors.New("--hsm-token-label is required")
	}
	if f.pinFile == "" && os.Getenv("CABINET_HSM_PIN") == "" {
		return hsmConfig{}, errors.New("the HSM PIN is required: --hsm-pin-file FILE or the CABINET_HSM_PIN environment variable")
	}
	abs := func(p string) string {
		if p == "" {
			return ""
		}
		a, err := filepath.Abs(p)
		if err != nil {
			return p
		}
		return a
	}
	return hsmConfig{Library: f.library, TokenLabel: f.tokenLabel, PINFile: abs(f.pinFile), SoftHSMConf: abs(f.softhsmConf), OAEPHash: f.oaepHash}, nil
}

// readPIN reads the PIN from the environment or the PIN file; the file must
// not be readable by group or others.
func readPIN(c hsmConfig) (string, error) {
	if v := os.Getenv("CABINET_HSM_PIN"); v != "" {
		return v, nil
	}
	if c.PINFile == "" {
		return "", errors.New("no HSM PIN: set CABINET_HSM_PIN or configure a PIN file")
	}
	st, err := os.Stat(c.PINFile)
	if err != nil {
		return "", fmt.Errorf("HSM PIN file: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("HSM PIN file %s is readable by group or others (mode %v): chmod 600 it", c.PINFile, st.Mode().Perm())
	}
	b, err := os.ReadFile(c.PINFile)
	if err != nil {
		return "", fmt.Errorf("HSM PIN file: %w", err)
	}
	pin := strings.TrimSpace(string(b))
	if pin == "" {
		return "", fmt.Errorf("HSM PIN file %s is empty", c.PINFile)
	}
	return pin, nil
}

func pkcs11Config(c hsmConfig) (hsm.PKCS11Config, error) {
	pin, err := readPIN(c)
	if err != nil {
		return hsm.PKCS11Config{}, err
	}
	h := crypto.SHA1
	switch strings.ToLower(c.OAEPHash) {
	case "", "sha1":
	case "sha256":
		h = crypto.SHA256
	default:
		return hsm.PKCS11Config{}, fmt.Errorf("unknown OAEP hash %q: sha1 or sha256", c.OAEPHash)
	}
	return hsm.PKCS11Config{
		Library:    c.Library,
		TokenLabel: c.TokenLabel,
		PIN:        pin,
		OAEPHash:   h,
		ConfigPath: c.SoftHSMConf,
	}, nil
}
