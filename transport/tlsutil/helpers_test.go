package tlsutil

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"testing"
	"time"
)

var loopback = []net.IP{net.IPv4(127, 0, 0, 1)}

// testPKI is a cluster CA with helpers that issue usable tls.Certificates.
type testPKI struct {
	t  *testing.T
	ca *CA
}

func newTestPKI(t *testing.T, clusterID string) *testPKI {
	t.Helper()
	ca, err := NewCA(clusterID, time.Now())
	if err != nil {
		t.Fatalf("NewCA: %v", err)
	}
	return &testPKI{t: t, ca: ca}
}

func (p *testPKI) pool() *x509.CertPool { return p.ca.Pool() }

// node issues a node certificate for 127.0.0.1 at time now, chain ending
// with the CA as nodes serve it.
func (p *testPKI) nodeAt(nodeID string, now time.Time) tls.Certificate {
	p.t.Helper()
	key, csr, err := NewNodeKey(nodeID)
	if err != nil {
		p.t.Fatalf("NewNodeKey: %v", err)
	}
	der, err := p.ca.IssueNode(csr, nodeID, loopback, now)
	if err != nil {
		p.t.Fatalf("IssueNode: %v", err)
	}
	kp, err := KeyPair(key, der, p.ca.CertDER)
	if err != nil {
		p.t.Fatalf("KeyPair: %v", err)
	}
	return kp
}

func (p *testPKI) node(nodeID string) tls.Certificate {
	p.t.Helper()
	return p.nodeAt(nodeID, time.Now())
}

func (p *testPKI) client(name, role string) tls.Certificate {
	p.t.Helper()
	der, key, err := p.ca.IssueClient(name, role, time.Now())
	if err != nil {
		p.t.Fatalf("IssueClient: %v", err)
	}
	kp, err := KeyPair(key, der)
	if err != nil {
		p.t.Fatalf("KeyPair: %v", err)
	}
	return kp
}

// handshake runs a real TLS connection over a 127.0.0.1 listener. The server
// writes one byte after its handshake; the client reads it, so a server that
// refuses the client certificate (seen by a TLS 1.3 client only at its first
// read) shows up in clientErr.
// state is the server's view of the connection.
func handshake(t *testing.T, serverCfg, clientCfg *tls.Config) (state tls.ConnectionState, serverErr, clientErr error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	srvDone := make(chan error, 1)
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			srvDone <- err
			return
		}
		tc := tls.Server(raw, serverCfg)
		defer tc.Close()
		if err := tc.HandshakeContext(ctx); err != nil {
			srvDone <- err
			return
		}
		state = tc.ConnectionState()
		_, err = tc.Write([]byte{'x'})
		srvDone <- err
	}()

	d := &tls.Dialer{Config: clientCfg}
	c, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	if err == nil {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 1)
		_, err = c.Read(buf)
		_ = c.Close()
	}
	serverErr = <-srvDone
	return state, serverErr, err
}

// sendAlways makes a client config present cert even when the server's
// certificate request names another CA (Go's client would otherwise send
// no certificate at all).
func sendAlways(cfg *tls.Config) *tls.Config {
	cert := cfg.Certificates[0]
	cfg.Certificates = nil
	cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
	return cfg
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
