package tlsutil

import (
	"bytes"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

const (
	pemCertificate  = "CERTIFICATE"
	pemPrivateKey   = "PRIVATE KEY"    // PKCS#8
	pemECPrivateKey = "EC PRIVATE KEY" // SEC 1, as openssl writes it

	certFileMode = 0o644
	keyFileMode  = 0o600
)

// WriteCertPEM atomically writes one or more DER certificates as PEM with
// mode 0644.
func WriteCertPEM(path string, ders ...[]byte) error {
	if len(ders) == 0 {
		return fmt.Errorf("write certificate %s: no certificate", path)
	}
	var buf bytes.Buffer
	for _, der := range ders {
		if err := pem.Encode(&buf, &pem.Block{Type: pemCertificate, Bytes: der}); err != nil {
			return fmt.Errorf("write certificate %s: %w", path, err)
		}
	}
	return writeFileAtomic(path, buf.Bytes(), certFileMode)
}

// WriteKeyPEM atomically writes key as a PKCS#8 PEM file with mode 0600,
// replacing any file at path.
func WriteKeyPEM(path string, key crypto.Signer) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("write key %s: %w", path, err)
	}
	return writeFileAtomic(path, pem.EncodeToMemory(&pem.Block{Type: pemPrivateKey, Bytes: der}), keyFileMode)
}

// ReadCertPEM reads every certificate of a PEM file, in file order. Blocks
// of any other type are refused rather than skipped.
func ReadCertPEM(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read certificate: %w", err)
	}
	var certs []*x509.Certificate
	rest := data
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != pemCertificate {
			return nil, fmt.Errorf("read certificate %s: unexpected PEM block %q", path, block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("read certificate %s: %w", path, err)
		}
		certs = append(certs, c)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("read certificate %s: trailing data after the last PEM block", path)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("read certificate %s: no CERTIFICATE block", path)
	}
	return certs, nil
}

// ReadKeyPEM reads a private key (PKCS#8 "PRIVATE KEY" or SEC 1 "EC PRIVATE
// KEY") after CheckKeyFilePerms has accepted the file's mode.
func ReadKeyPEM(path string) (crypto.Signer, error) {
	if err := CheckKeyFilePerms(path); err != nil {
		return nil, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read key: %w", err)
	}
	block, rest := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("read key %s: no PEM block", path)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("read key %s: more than one PEM block", path)
	}
	var k any
	switch block.Type {
	case pemPrivateKey:
		k, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case pemECPrivateKey:
		k, err = x509.ParseECPrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("read key %s: unsupported PEM block %q (want %q)", path, block.Type, pemPrivateKey)
	}
	if err != nil {
		return nil, fmt.Errorf("read key %s: %w", path, err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("read key %s: key type %T cannot sign", path, k)
	}
	return signer, nil
}

// LoadKeyPair reads a certificate chain file and its key file into a
// tls.Certificate (see KeyPair).
func LoadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	certs, err := ReadCertPEM(certFile)
	if err != nil {
		return tls.Certificate{}, err
	}
	key, err := ReadKeyPEM(keyFile)
	if err != nil {
		return tls.Certificate{}, err
	}
	ders := make([][]byte, len(certs))
	for i, c := range certs {
		ders[i] = c.Raw
	}
	kp, err := KeyPair(key, ders...)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("%s and %s: %w", certFile, keyFile, err)
	}
	return kp, nil
}

// CheckKeyFilePerms refuses a private key file that is not a regular file or
// that its group or others can access.
func CheckKeyFilePerms(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("key file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("key file %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("key file %s has mode %04o and is accessible by group or others; run: chmod 600 %s", path, perm, path)
	}
	return nil
}

// writeFileAtomic writes data to a temporary file beside path, syncs it and
// renames it over path, so a reader sees the old or the new file, never a
// part of one. The temporary file has mode perm from its creation on.
func writeFileAtomic(path string, data []byte, perm fs.FileMode) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(tmp)
		}
	}()
	// CreateTemp makes the file 0600; Chmod sets the exact mode despite umask.
	if err = f.Chmod(perm); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if d, derr := os.Open(dir); derr == nil {
		syncErr := d.Sync()
		_ = d.Close()
		if syncErr != nil && !errors.Is(syncErr, os.ErrInvalid) {
			return fmt.Errorf("write %s: sync directory: %w", path, syncErr)
		}
	}
	return nil
}
