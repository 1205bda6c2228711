package tlsutil

import (
	"crypto"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
)

// KeyPair builds a tls.Certificate from a key and a DER chain, leaf first.
// A node's chain should end with the CA certificate: a joiner using
// PinnedConfig can only pin a CA the server presents.
func KeyPair(key crypto.Signer, chainDER ...[]byte) (tls.Certificate, error) {
	if len(chainDER) == 0 {
		return tls.Certificate{}, errors.New("key pair: no certificate")
	}
	leaf, err := x509.ParseCertificate(chainDER[0])
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("key pair: parse certificate: %w", err)
	}
	if err := checkKeyMatches(leaf, key); err != nil {
		return tls.Certificate{}, fmt.Errorf("key pair: %w", err)
	}
	return tls.Certificate{Certificate: chainDER, PrivateKey: key, Leaf: leaf}, nil
}

// NewCertPool returns a pool holding certs.
func NewCertPool(certs ...*x509.Certificate) *x509.CertPool {
	p := x509.NewCertPool()
	for _, c := range certs {
		p.AddCert(c)
	}
	return p
}

// ServerConfig is for the client API listener: TLS 1.3, our certificate, and
// client certificates verified against caPool when given. A certificate is
// optional at the TLS layer because Join is authenticated by a join token;
// the gRPC layer requires a verified certificate on every other method.
func ServerConfig(cert tls.Certificate, caPool *x509.CertPool) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientCAs:    caPool,
		ClientAuth:   tls.VerifyClientCertIfGiven,
	}
}

// ClientConfig is for a client or node dialing the client API: TLS 1.3, our
// client certificate, server verified against caPool including its name
// (node certificates carry the node ID, "localhost" and IP SANs).
func ClientConfig(cert tls.Certificate, caPool *x509.CertPool) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      caPool,
	}
}

// NodeServerConfig is for node-to-node listeners (the Raft stream layer):
// the peer must present a certificate from caPool that IssueNode wrote.
func NodeServerConfig(cert tls.Certificate, caPool *x509.CertPool) *tls.Config {
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		Certificates:     []tls.Certificate{cert},
		ClientCAs:        caPool,
		ClientAuth:       tls.RequireAndVerifyClientCert,
		VerifyConnection: requireNodePeer,
	}
}

// NodeClientConfig is for dialing another node: the server is verified
// against caPool (name included) and must hold a node certificate.
func NodeClientConfig(cert tls.Certificate, caPool *x509.CertPool) *tls.Config {
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		Certificates:     []tls.Certificate{cert},
		RootCAs:          caPool,
		VerifyConnection: requireNodePeer,
	}
}

// requireNodePeer runs after the standard chain verification (both sides
// set it only where verification is mandatory), so VerifiedChains is set.
func requireNodePeer(cs tls.ConnectionState) error {
	if len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return errors.New("tlsutil: peer certificate not verified")
	}
	id := IdentityFromCert(cs.VerifiedChains[0][0])
	if !id.IsNode {
		return fmt.Errorf("tlsutil: peer %q (role %q) is not a node; node-to-node connections need a node certificate", id.Name, id.Role)
	}
	return nil
}

// PinnedConfig is for a joiner that has no CA certificate yet. It presents
// no client certificate. It accepts the server only if the chain the server
// sends contains a CA certificate whose Fingerprint equals caFingerprint,
// and the server's node certificate verifies under that CA for the dialed
// name. onCA, if not nil, receives the pinned CA's DER once the connection
// is verified, so the joiner can store it.
//
// Nodes must therefore send the CA certificate in their chain (KeyPair with
// the CA last).
func PinnedConfig(caFingerprint string, onCA func(caDER []byte)) *tls.Config {
	pin, pinErr := parseFingerprint(caFingerprint)
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// Standard verification needs roots we do not have yet;
		// VerifyConnection does the whole verification instead.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if pinErr != nil {
				return fmt.Errorf("tlsutil: %w", pinErr)
			}
			ca, err := verifyPinned(cs, pin)
			if err != nil {
				return err
			}
			if onCA != nil {
				onCA(append([]byte(nil), ca.Raw...))
			}
			return nil
		},
	}
}

func verifyPinned(cs tls.ConnectionState, pin []byte) (*x509.Certificate, error) {
	certs := cs.PeerCertificates
	if len(certs) == 0 {
		return nil, errors.New("tlsutil: server sent no certificate")
	}
	// Compare against every presented certificate without stopping early.
	var ca *x509.Certificate
	for _, c := range certs {
		fp, _ := parseFingerprint(Fingerprint(c.Raw))
		if subtle.ConstantTimeCompare(fp, pin) == 1 {
			ca = c
		}
	}
	if ca == nil {
		return nil, errors.New("tlsutil: server chain has no CA certificate with the pinned fingerprint; check the fingerprint given to join")
	}
	if !ca.BasicConstraintsValid || !ca.IsCA {
		return nil, errors.New("tlsutil: pinned certificate is not a CA certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		if c != ca {
			inter.AddCert(c)
		}
	}
	chains, err := certs[0].Verify(x509.VerifyOptions{
		DNSName:       cs.ServerName,
		Roots:         NewCertPool(ca),
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return nil, fmt.Errorf("tlsutil: server certificate does not verify under the pinned CA: %w", err)
	}
	if id := IdentityFromCert(chains[0][0]); !id.IsNode {
		return nil, fmt.Errorf("tlsutil: server %q is not a node", id.Name)
	}
	return ca, nil
}
