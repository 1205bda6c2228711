package tlsutil

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestHandshakes(t *testing.T) {
	p := newTestPKI(t, "c1")
	other := newTestPKI(t, "c2")
	longAgo := time.Now().Add(-2 * 365 * 24 * time.Hour)
	old := newTestPKI(t, "c3")
	old.ca, _ = NewCA("c3", longAgo) // a CA still valid, with an expired leaf below

	serverNode := p.node("n1")
	nodeN2 := p.node("n2")
	admin := p.client("alice", RoleAdmin)
	foreignNode := other.node("n2")
	foreignAdmin := other.client("alice", RoleAdmin)
	expiredNode := old.nodeAt("n2", longAgo)

	// serverNonNode is a server-auth certificate of our CA that is not a node.
	key, _, _ := NewNodeKey("web")
	der, err := p.ca.sign(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "web", OrganizationalUnit: []string{RoleClient}},
		IPAddresses: loopback,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, key.Public(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	serverNonNode, _ := KeyPair(key, der)

	// peer is the identity the server must see after a successful
	// handshake; empty means no verified client certificate.
	tests := []struct {
		name   string
		server *tls.Config
		client *tls.Config
		ok     bool
		peer   string
	}{
		{"api: node client", ServerConfig(serverNode, p.pool()), ClientConfig(nodeN2, p.pool()), true, "n2"},
		{"api: admin client", ServerConfig(serverNode, p.pool()), ClientConfig(admin, p.pool()), true, "alice"},
		{"api: no client cert (join)", ServerConfig(serverNode, p.pool()), &tls.Config{RootCAs: p.pool(), MinVersion: tls.VersionTLS13}, true, ""},
		// Go's client withholds a certificate the server's CA list does not name...
		{"api: client of another CA, withheld", ServerConfig(serverNode, p.pool()), ClientConfig(foreignAdmin, p.pool()), true, ""},
		// ...and one sent anyway is refused.
		{"api: client of another CA", ServerConfig(serverNode, p.pool()), sendAlways(ClientConfig(foreignAdmin, p.pool())), false, ""},
		{"api: expired client", ServerConfig(serverNode, old.pool()), ClientConfig(expiredNode, p.pool()), false, ""},
		{"api: server of another CA", ServerConfig(foreignNode, other.pool()), ClientConfig(admin, p.pool()), false, ""},
		{"api: expired server", ServerConfig(expiredNode, p.pool()), ClientConfig(admin, old.pool()), false, ""},
		{"api: TLS 1.2 client", ServerConfig(serverNode, p.pool()), &tls.Config{RootCAs: p.pool(), MaxVersion: tls.VersionTLS12}, false, ""},

		{"node: node client", NodeServerConfig(serverNode, p.pool()), NodeClientConfig(nodeN2, p.pool()), true, "n2"},
		{"node: admin client", NodeServerConfig(serverNode, p.pool()), NodeClientConfig(admin, p.pool()), false, ""},
		{"node: no client cert", NodeServerConfig(serverNode, p.pool()), &tls.Config{RootCAs: p.pool(), MinVersion: tls.VersionTLS13}, false, ""},
		{"node: node of another CA", NodeServerConfig(serverNode, p.pool()), NodeClientConfig(foreignNode, p.pool()), false, ""},
		{"node: node of another CA, sent anyway", NodeServerConfig(serverNode, p.pool()), sendAlways(NodeClientConfig(foreignNode, p.pool())), false, ""},
		{"node: expired node", NodeServerConfig(serverNode, old.pool()), NodeClientConfig(expiredNode, p.pool()), false, ""},
		{"node: server not a node", NodeServerConfig(serverNonNode, p.pool()), NodeClientConfig(nodeN2, p.pool()), false, ""},
		{"node: server of another CA", NodeServerConfig(foreignNode, p.pool()), NodeClientConfig(nodeN2, p.pool()), false, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			state, serr, cerr := handshake(t, tt.server, tt.client)
			if tt.ok && (serr != nil || cerr != nil) {
				t.Fatalf("want success; server: %v; client: %v", serr, cerr)
			}
			if tt.ok {
				var peer string
				if len(state.VerifiedChains) > 0 {
					peer = IdentityFromCert(state.VerifiedChains[0][0]).Name
				}
				if peer != tt.peer {
					t.Fatalf("server sees verified peer %q, want %q", peer, tt.peer)
				}
			}
			if !tt.ok && (serr == nil || cerr == nil) {
				t.Fatalf("want refusal on both ends; server: %v; client: %v", serr, cerr)
			}
			if !tt.ok {
				t.Logf("refused; server: %v; client: %v", serr, cerr)
			}
		})
	}
}

func TestPinnedConfig(t *testing.T) {
	p := newTestPKI(t, "c1")
	other := newTestPKI(t, "c2")
	server := ServerConfig(p.node("n1"), p.pool())

	leaf := p.node("n1")
	leaf.Certificate = leaf.Certificate[:1] // chain without the CA
	serverNoCA := ServerConfig(leaf, p.pool())

	// A server of another CA that also sends our CA certificate in its chain.
	impostor := other.node("n1")
	impostor.Certificate = append(impostor.Certificate, p.ca.CertDER)

	tests := []struct {
		name   string
		server *tls.Config
		pin    string
		ok     bool
	}{
		{"right fingerprint", server, Fingerprint(p.ca.CertDER), true},
		{"wrong fingerprint", server, Fingerprint(other.ca.CertDER), false},
		{"fingerprint of the leaf", server, Fingerprint(p.node("n1").Certificate[0]), false},
		{"malformed fingerprint", server, "sha256:abc", false},
		{"server sends no CA", serverNoCA, Fingerprint(p.ca.CertDER), false},
		{"impostor sends our CA", ServerConfig(impostor, other.pool()), Fingerprint(p.ca.CertDER), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var mu sync.Mutex
			var seen [][]byte
			cfg := PinnedConfig(tt.pin, func(der []byte) {
				mu.Lock()
				defer mu.Unlock()
				seen = append(seen, der)
			})
			_, serr, cerr := handshake(t, tt.server, cfg)
			mu.Lock()
			defer mu.Unlock()
			if !tt.ok {
				if cerr == nil {
					t.Fatal("pinned client accepted the server")
				}
				if len(seen) != 0 {
					t.Errorf("onCA called on a refused connection")
				}
				return
			}
			if serr != nil || cerr != nil {
				t.Fatalf("want success; server: %v; client: %v", serr, cerr)
			}
			if len(seen) != 1 || !bytes.Equal(seen[0], p.ca.CertDER) {
				t.Fatalf("onCA got %d certificates, want the CA once", len(seen))
			}
		})
	}

	_, _, cerr := handshake(t, server, PinnedConfig(Fingerprint(other.ca.CertDER), nil))
	if cerr == nil || !strings.Contains(cerr.Error(), "pinned fingerprint") {
		t.Errorf("wrong pin error = %v, want it to mention the pinned fingerprint", cerr)
	}
}

func TestKeyPairRefusesMismatch(t *testing.T) {
	p := newTestPKI(t, "c1")
	der, _, _ := p.ca.IssueClient("alice", RoleAdmin, time.Now())
	_, otherKey, _ := p.ca.IssueClient("bob", RoleAdmin, time.Now())
	if _, err := KeyPair(otherKey, der); err == nil {
		t.Error("KeyPair accepted a key of another certificate")
	}
	if _, err := KeyPair(otherKey); err == nil {
		t.Error("KeyPair accepted no certificate")
	}
}
