package tlsutil

import "crypto/x509"

// Identity is who a verified peer certificate names.
type Identity struct {
	// Name is the principal: the certificate's CN.
	Name string
	// Role is OrganizationalUnit[0], empty if the certificate has none.
	Role string
	// IsNode is true only for certificates IssueNode wrote: role node and
	// the URI SAN cabinet://node/<Name>.
	IsNode bool
	// NodeID is Name when IsNode, else empty.
	NodeID string
}

// IdentityFromCert reads the identity of c. It does not verify c: call it
// only on a certificate from a verified chain (tls.ConnectionState
// .VerifiedChains[0][0], or PeerCertificates[0] after a handshake that
// required verification).
func IdentityFromCert(c *x509.Certificate) Identity {
	if c == nil {
		return Identity{}
	}
	id := Identity{Name: c.Subject.CommonName}
	if ou := c.Subject.OrganizationalUnit; len(ou) > 0 {
		id.Role = ou[0]
	}
	if id.Role == RoleNode && id.Name != "" && hasNodeURI(c, id.Name) {
		id.IsNode = true
		id.NodeID = id.Name
	}
	return id
}

func hasNodeURI(c *x509.Certificate, nodeID string) bool {
	want := nodeURI(nodeID).String()
	for _, u := range c.URIs {
		if u.String() == want {
			return true
		}
	}
	return false
}
