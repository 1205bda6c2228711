package tlsutil

import (
	"bytes"
	"crypto/x509"
	"crypto/x509/pkix"
	"net"
	"strings"
	"testing"
	"time"
)

func TestNewCA(t *testing.T) {
	now := time.Now()
	ca, err := NewCA("c1", now)
	if err != nil {
		t.Fatal(err)
	}
	c := ca.Cert
	if got, want := c.Subject.CommonName, "Cabinet cluster CA c1"; got != want {
		t.Errorf("CN = %q, want %q", got, want)
	}
	if !c.IsCA || !c.MaxPathLenZero || c.MaxPathLen != 0 {
		t.Errorf("IsCA=%v MaxPathLen=%d zero=%v, want CA with path length 0", c.IsCA, c.MaxPathLen, c.MaxPathLenZero)
	}
	if len(c.PermittedDNSDomains)+len(c.ExcludedDNSDomains)+len(c.PermittedIPRanges)+len(c.PermittedURIDomains) != 0 {
		t.Error("CA has name constraints, want none")
	}
	if d := c.NotAfter.Sub(now); d < 10*365*24*time.Hour-time.Minute {
		t.Errorf("CA valid for %v, want 10 years", d)
	}
	if !bytes.Equal(c.Raw, ca.CertDER) {
		t.Error("Cert and CertDER differ")
	}
	if _, err := NewCA("bad id/", now); err == nil {
		t.Error("NewCA accepted a cluster id with '/'")
	}
}

func TestLoadCA(t *testing.T) {
	p := newTestPKI(t, "c1")
	keyDER, err := p.ca.KeyPKCS8()
	if err != nil {
		t.Fatal(err)
	}
	ca2, err := LoadCA(p.ca.CertDER, keyDER)
	if err != nil {
		t.Fatalf("LoadCA: %v", err)
	}
	// The loaded CA issues certificates that verify under the original.
	der, _, err := ca2.IssueClient("alice", RoleAdmin, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	verifyLeaf(t, der, p.ca, x509.ExtKeyUsageClientAuth, "")

	other := newTestPKI(t, "c2")
	otherKey, _ := other.ca.KeyPKCS8()
	leaf, _, _ := p.ca.IssueClient("bob", RoleClient, time.Now())
	tests := []struct {
		name      string
		cert, key []byte
		want      string
	}{
		{"key of another CA", p.ca.CertDER, otherKey, "does not match"},
		{"leaf instead of CA", leaf, keyDER, "not a CA"},
		{"garbage cert", []byte("nope"), keyDER, "parse certificate"},
		{"garbage key", p.ca.CertDER, []byte("nope"), "parse private key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := LoadCA(tt.cert, tt.key)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("LoadCA error = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

// verifyLeaf checks der chains to ca for usage (and dnsName if set).
func verifyLeaf(t *testing.T, der []byte, ca *CA, usage x509.ExtKeyUsage, dnsName string) *x509.Certificate {
	t.Helper()
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Verify(x509.VerifyOptions{
		Roots: ca.Pool(), DNSName: dnsName, KeyUsages: []x509.ExtKeyUsage{usage},
	}); err != nil {
		t.Fatalf("verify %q for %v: %v", c.Subject.CommonName, usage, err)
	}
	return c
}

func TestIssueNode(t *testing.T) {
	p := newTestPKI(t, "c1")
	now := time.Now()
	_, csr, err := NewNodeKey("n1")
	if err != nil {
		t.Fatal(err)
	}
	ips := []net.IP{net.ParseIP("10.0.0.7"), net.ParseIP("127.0.0.1"), net.ParseIP("10.0.0.7")}
	der, err := p.ca.IssueNode(csr, "n1", ips, now)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"n1", "localhost", "10.0.0.7", "127.0.0.1"} {
		verifyLeaf(t, der, p.ca, x509.ExtKeyUsageServerAuth, name)
	}
	c := verifyLeaf(t, der, p.ca, x509.ExtKeyUsageClientAuth, "")
	if len(c.IPAddresses) != 2 {
		t.Errorf("IP SANs = %v, want 2 (deduplicated)", c.IPAddresses)
	}
	if len(c.URIs) != 1 || c.URIs[0].String() != "cabinet://node/n1" {
		t.Errorf("URI SANs = %v, want cabinet://node/n1", c.URIs)
	}
	if d := c.NotAfter.Sub(now); d < 364*24*time.Hour || d > 366*24*time.Hour {
		t.Errorf("node certificate valid for %v, want one year", d)
	}
	want := Identity{Name: "n1", Role: RoleNode, IsNode: true, NodeID: "n1"}
	if got := IdentityFromCert(c); got != want {
		t.Errorf("identity = %+v, want %+v", got, want)
	}
}

func TestIssueNodeRefuses(t *testing.T) {
	p := newTestPKI(t, "c1")
	_, csr, err := NewNodeKey("n1")
	if err != nil {
		t.Fatal(err)
	}
	badSig := bytes.Clone(csr)
	badSig[len(badSig)-5] ^= 0xff // inside the signature BIT STRING

	tests := []struct {
		name   string
		csr    []byte
		nodeID string
		ips    []net.IP
		want   string
	}{
		{"bad csr signature", badSig, "n1", loopback, "signature"},
		{"csr for another node", csr, "n2", loopback, "not node"},
		{"garbage csr", []byte{0x30, 0x03, 0x01, 0x01, 0x00}, "n1", loopback, "parse csr"},
		{"node id not a host name", csr, "n1/../x", loopback, "host name"},
		{"unspecified ip", csr, "n1", []net.IP{net.IPv4zero}, "advertised"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := p.ca.IssueNode(tt.csr, tt.nodeID, tt.ips, time.Now())
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("IssueNode error = %v, want one containing %q", err, tt.want)
			}
		})
	}
}

func TestIssueClient(t *testing.T) {
	p := newTestPKI(t, "c1")
	der, key, err := p.ca.IssueClient("alice@example", RoleAdmin, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	c := verifyLeaf(t, der, p.ca, x509.ExtKeyUsageClientAuth, "")
	if _, err := KeyPair(key, der); err != nil {
		t.Errorf("key does not match certificate: %v", err)
	}
	if _, err := c.Verify(x509.VerifyOptions{
		Roots: p.pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}); err == nil {
		t.Error("client certificate verifies for server auth")
	}
	want := Identity{Name: "alice@example", Role: RoleAdmin}
	if got := IdentityFromCert(c); got != want {
		t.Errorf("identity = %+v, want %+v", got, want)
	}

	for _, tt := range []struct{ name, role, want string }{
		{"n1", RoleNode, "reserved"},
		{"", RoleAdmin, "name"},
		{"a b", RoleAdmin, "name"},
		{"alice", "", "role"},
		{"alice", "Admin", "role"},
	} {
		if _, _, err := p.ca.IssueClient(tt.name, tt.role, time.Now()); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("IssueClient(%q, %q) error = %v, want one containing %q", tt.name, tt.role, err, tt.want)
		}
	}
}

// A certificate that says OU=node but lacks the node URI (which only
// IssueNode writes) is not a node.
func TestIdentityNeedsNodeURI(t *testing.T) {
	p := newTestPKI(t, "c1")
	key, _, _ := NewNodeKey("n1")
	der, err := p.ca.sign(&x509.Certificate{
		Subject:     pkix.Name{CommonName: "n1", OrganizationalUnit: []string{RoleNode}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, key.Public(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	if id := IdentityFromCert(c); id.IsNode || id.NodeID != "" {
		t.Errorf("identity = %+v, want not a node", id)
	}
	if id := IdentityFromCert(nil); id != (Identity{}) {
		t.Errorf("IdentityFromCert(nil) = %+v", id)
	}
}

func TestCANeverIssuesBeyondItsExpiry(t *testing.T) {
	p := newTestPKI(t, "c1")
	_, csr, _ := NewNodeKey("n1")
	late := p.ca.Cert.NotAfter.Add(-24 * time.Hour)
	der, err := p.ca.IssueNode(csr, "n1", loopback, late)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	if c.NotAfter.After(p.ca.Cert.NotAfter) {
		t.Errorf("leaf NotAfter %v after CA NotAfter %v", c.NotAfter, p.ca.Cert.NotAfter)
	}
	if _, err := p.ca.IssueNode(csr, "n1", loopback, p.ca.Cert.NotAfter.Add(time.Hour)); err == nil {
		t.Error("expired CA issued a certificate")
	}
}

func TestFingerprint(t *testing.T) {
	p := newTestPKI(t, "c1")
	fp := Fingerprint(p.ca.CertDER)
	if !strings.HasPrefix(fp, "sha256:") || len(fp) != len("sha256:")+64 {
		t.Fatalf("Fingerprint = %q", fp)
	}
	if err := ValidateFingerprint(fp); err != nil {
		t.Errorf("ValidateFingerprint(%q): %v", fp, err)
	}
	if err := ValidateFingerprint(strings.ToUpper(fp[7:])); err == nil {
		t.Error("fingerprint without prefix accepted")
	}
	for _, bad := range []string{"", "sha256:", "sha256:zz", fp[:len(fp)-2], "md5:" + fp[7:]} {
		if err := ValidateFingerprint(bad); err == nil {
			t.Errorf("ValidateFingerprint(%q) accepted", bad)
		}
	}
}
