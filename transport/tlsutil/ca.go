// Package tlsutil owns Cabinet's certificates and TLS: the cluster CA, node
// and client certificates, the TLS configurations of every listener and
// dialer (mTLS, TLS 1.3 only), a TLS stream layer for hashicorp/raft, and CA
// pinning for a node that joins before it has the CA certificate.
//
// See DESIGN.md in this directory for the invariants.
package tlsutil

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"regexp"
	"time"
)

// Roles carried in certificates as Subject OrganizationalUnit[0].
const (
	RoleNode     = "node"
	RoleAdmin    = "admin"
	RoleOperator = "operator"
	RoleClient   = "client"
)

const (
	caValidity   = 10 * 365 * 24 * time.Hour
	leafValidity = 365 * 24 * time.Hour
	// clockSkew backdates NotBefore so a peer whose clock is a little behind
	// the issuer's accepts a certificate issued just now.
	clockSkew = 5 * time.Minute

	// nodeURIScheme and nodeURIHost form the URI SAN "cabinet://node/<id>"
	// that only IssueNode writes; IdentityFromCert requires it for IsNode.
	nodeURIScheme = "cabinet"
	nodeURIHost   = "node"

	fingerprintPrefix = "sha256:"
)

var (
	// nodeIDPattern: a node ID becomes a DNS SAN, so it must be a host name.
	nodeIDPattern = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9.-]{0,62})$`)
	// principalPattern: a client name becomes a CN and an audit principal.
	principalPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$`)
	rolePattern      = regexp.MustCompile(`^[a-z][a-z0-9-]{0,31}$`)
	clusterIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$`)
)

// CA is the cluster certificate authority. Key may be any crypto.Signer;
// KeyPKCS8 works only for software keys.
type CA struct {
	Cert    *x509.Certificate
	CertDER []byte
	Key     crypto.Signer
}

// NewCA creates a self-signed ECDSA P-256 CA named
// "Cabinet cluster CA <clusterID>", valid for 10 years from now, that can sign
// leaf certificates only (path length 0) and carries no name constraints.
func NewCA(clusterID string, now time.Time) (*CA, error) {
	if !clusterIDPattern.MatchString(clusterID) {
		return nil, fmt.Errorf("new ca: cluster id %q must be 1-40 letters, digits, '.', '_' or '-'", clusterID)
	}
	if now.IsZero() {
		return nil, errors.New("new ca: time is zero")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("new ca: generate key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, fmt.Errorf("new ca: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			CommonName:   "Cabinet cluster CA " + clusterID,
			Organization: []string{"Cabinet"},
		},
		NotBefore:             now.Add(-clockSkew),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLen:            0,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("new ca: create certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("new ca: parse certificate: %w", err)
	}
	return &CA{Cert: cert, CertDER: der, Key: key}, nil
}

// LoadCA builds a CA from its DER certificate and PKCS#8 DER private key and
// checks that the key belongs to the certificate.
func LoadCA(certDER, keyPKCS8 []byte) (*CA, error) {
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		return nil, fmt.Errorf("load ca: parse certificate: %w", err)
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, errors.New("load ca: certificate is not a CA certificate")
	}
	k, err := x509.ParsePKCS8PrivateKey(keyPKCS8)
	if err != nil {
		return nil, fmt.Errorf("load ca: parse private key: %w", err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("load ca: private key type %T cannot sign", k)
	}
	if err := checkKeyMatches(cert, signer); err != nil {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	return &CA{Cert: cert, CertDER: cert.Raw, Key: signer}, nil
}

// KeyPKCS8 returns the CA private key as PKCS#8 DER, for wrapping by the HSM.
// The caller must not write the result anywhere unwrapped.
func (ca *CA) KeyPKCS8() ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(ca.Key)
	if err != nil {
		return nil, fmt.Errorf("ca key to pkcs8: %w", err)
	}
	return der, nil
}

// Pool returns a new pool holding only the CA certificate.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// IssueNode signs csrDER for node nodeID and returns the certificate DER.
// Only the CSR's public key is used: subject and SANs come from the
// arguments (CN=nodeID, OU=node, DNS nodeID and "localhost", every IP in ips,
// URI cabinet://node/<nodeID>), so a requester cannot ask for more than it is
// given. The CSR signature must verify and its CN must equal nodeID. The
// certificate allows server and client auth and is valid for one year (never
// beyond the CA).
func (ca *CA) IssueNode(csrDER []byte, nodeID string, ips []net.IP, now time.Time) ([]byte, error) {
	if !nodeIDPattern.MatchString(nodeID) {
		return nil, fmt.Errorf("issue node certificate: node id %q must be a host name: 1-63 letters, digits, '.' or '-'", nodeID)
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, fmt.Errorf("issue node certificate: parse csr: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("issue node certificate: csr signature: %w", err)
	}
	if csr.Subject.CommonName != nodeID {
		return nil, fmt.Errorf("issue node certificate: csr is for %q, not node %q", csr.Subject.CommonName, nodeID)
	}
	if err := checkLeafKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("issue node certificate: %w", err)
	}
	var sanIPs []net.IP
	for _, ip := range ips {
		if ip == nil || ip.IsUnspecified() {
			return nil, fmt.Errorf("issue node certificate: ip %v is not an address peers can dial; give the advertised address", ip)
		}
		if !containsIP(sanIPs, ip) {
			sanIPs = append(sanIPs, ip)
		}
	}
	dns := []string{nodeID}
	if nodeID != "localhost" {
		dns = append(dns, "localhost")
	}
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: nodeID, OrganizationalUnit: []string{RoleNode}},
		DNSNames:    dns,
		IPAddresses: sanIPs,
		URIs:        []*url.URL{nodeURI(nodeID)},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := ca.sign(tmpl, csr.PublicKey, now)
	if err != nil {
		return nil, fmt.Errorf("issue node certificate: %w", err)
	}
	return der, nil
}

// IssueClient creates an ECDSA P-256 key and a certificate for the client
// principal name with role: CN=name, OU=role, client auth only, one year.
// Role "node" is refused: node certificates come only from IssueNode.
func (ca *CA) IssueClient(name, role string, now time.Time) ([]byte, crypto.Signer, error) {
	if err := checkClientName(name, role); err != nil {
		return nil, nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("issue client certificate: generate key: %w", err)
	}
	der, err := ca.signClient(name, role, key.Public(), now)
	if err != nil {
		return nil, nil, err
	}
	return der, key, nil
}

// IssueClientCSR certifies the public key of a PKCS#10 request (its
// signature is checked; its subject is ignored) for principal `name` with
// `role`, so the private key never leaves the requester.
func (ca *CA) IssueClientCSR(csrDER []byte, name, role string, now time.Time) ([]byte, error) {
	if err := checkClientName(name, role); err != nil {
		return nil, err
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, fmt.Errorf("issue client certificate: parse CSR: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("issue client certificate: CSR signature: %w", err)
	}
	if err := checkLeafKey(csr.PublicKey); err != nil {
		return nil, fmt.Errorf("issue client certificate: %w", err)
	}
	return ca.signClient(name, role, csr.PublicKey, now)
}

func checkClientName(name, role string) error {
	if !principalPattern.MatchString(name) {
		return fmt.Errorf("issue client certificate: name %q must be 1-64 letters, digits or '._@+-', starting with a letter or digit", name)
	}
	if role == RoleNode {
		return errors.New("issue client certificate: role node is reserved for node certificates; use a node CSR")
	}
	if !rolePattern.MatchString(role) {
		return fmt.Errorf("issue client certificate: role %q must be 1-32 lowercase letters, digits or '-'", role)
	}
	return nil
}

func (ca *CA) signClient(name, role string, pub crypto.PublicKey, now time.Time) ([]byte, error) {
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: name, OrganizationalUnit: []string{role}},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := ca.sign(tmpl, pub, now)
	if err != nil {
		return nil, fmt.Errorf("issue client certificate: %w", err)
	}
	return der, nil
}

// NewClientKey makes an ECDSA P-256 key and a CSR (for IssueClientCSR).
func NewClientKey(name string) (crypto.Signer, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: name}}, key)
	if err != nil {
		return nil, nil, err
	}
	return key, csr, nil
}

// sign fills serial and validity in tmpl and signs it with the CA key.
func (ca *CA) sign(tmpl *x509.Certificate, pub crypto.PublicKey, now time.Time) ([]byte, error) {
	if now.IsZero() {
		return nil, errors.New("time is zero")
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = now.Add(-clockSkew)
	tmpl.NotAfter = now.Add(leafValidity)
	if tmpl.NotAfter.After(ca.Cert.NotAfter) {
		tmpl.NotAfter = ca.Cert.NotAfter
	}
	if !tmpl.NotAfter.After(now) {
		return nil, fmt.Errorf("ca expired at %s", ca.Cert.NotAfter.UTC().Format(time.RFC3339))
	}
	tmpl.BasicConstraintsValid = true
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("create certificate: %w", err)
	}
	return der, nil
}

// NewNodeKey makes an ECDSA P-256 key and a CSR (CN=nodeID) for it.
func NewNodeKey(nodeID string) (crypto.Signer, []byte, error) {
	if !nodeIDPattern.MatchString(nodeID) {
		return nil, nil, fmt.Errorf("new node key: node id %q must be a host name: 1-63 letters, digits, '.' or '-'", nodeID)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("new node key: generate key: %w", err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: nodeID, OrganizationalUnit: []string{RoleNode}},
	}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("new node key: create csr: %w", err)
	}
	return key, csr, nil
}

// Fingerprint returns "sha256:" followed by the lowercase hex SHA-256 of a
// certificate's DER.
func Fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return fingerprintPrefix + hex.EncodeToString(sum[:])
}

// ValidateFingerprint reports whether s has the form Fingerprint produces
// (hex in either case), so a CLI can reject a mistyped pin up front.
func ValidateFingerprint(s string) error {
	_, err := parseFingerprint(s)
	return err
}

func parseFingerprint(s string) ([]byte, error) {
	if len(s) < len(fingerprintPrefix) || s[:len(fingerprintPrefix)] != fingerprintPrefix {
		return nil, fmt.Errorf("ca fingerprint %q must start with %q", s, fingerprintPrefix)
	}
	b, err := hex.DecodeString(s[len(fingerprintPrefix):])
	if err != nil || len(b) != sha256.Size {
		return nil, fmt.Errorf("ca fingerprint %q must be %q followed by 64 hex digits", s, fingerprintPrefix)
	}
	return b, nil
}

func nodeURI(nodeID string) *url.URL {
	return &url.URL{Scheme: nodeURIScheme, Host: nodeURIHost, Path: "/" + nodeID}
}

func newSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil // never zero
}

func checkLeafKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return fmt.Errorf("ecdsa curve %s not allowed; use P-256 or P-384", k.Curve.Params().Name)
		}
		return nil
	case ed25519.PublicKey:
		return nil
	default:
		return fmt.Errorf("public key type %T not allowed; use ECDSA P-256/P-384 or Ed25519", pub)
	}
}

type equaler interface{ Equal(crypto.PublicKey) bool }

func checkKeyMatches(cert *x509.Certificate, key crypto.Signer) error {
	pub, ok := key.Public().(equaler)
	if !ok || !pub.Equal(cert.PublicKey) {
		return errors.New("private key does not match the certificate")
	}
	return nil
}

func containsIP(ips []net.IP, ip net.IP) bool {
	for _, x := range ips {
		if x.Equal(ip) {
			return true
		}
	}
	return false
}
