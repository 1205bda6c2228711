package transport

import (
	"context"
	"crypto/tls"
	"fmt"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// PeerClients holds one gRPC connection per peer API address, authenticated
// with this node's certificate. It implements cluster.Forwarder.
type PeerClients struct {
	tls   *tls.Config
	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
}

// NewPeerClients uses tlsCfg (tlsutil.ClientConfig with the node
// certificate) for every peer connection.
func NewPeerClients(tlsCfg *tls.Config) *PeerClients {
	return &PeerClients{tls: tlsCfg, conns: map[string]*grpc.ClientConn{}}
}

func (p *PeerClients) conn(addr string) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.conns[addr]; ok {
		return c, nil
	}
	c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(p.tls)))
	if err != nil {
		return nil, fmt.Errorf("connect to peer %s: %w", addr, err)
	}
	p.conns[addr] = c
	return c, nil
}

// Close closes every peer connection.
func (p *PeerClients) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for a, c := range p.conns {
		c.Close()
		delete(p.conns, a)
	}
}

// fromPeer maps a peer's status back to cluster errors where the caller
// decides on them (retry at a new leader, move on).
func fromPeer(err error) error {
	switch status.Code(err) {
	case codes.Aborted:
		return fmt.Errorf("%w: %s", cluster.ErrNotLeader, status.Convert(err).Message())
	case codes.Unavailable:
		return fmt.Errorf("%w: %s", cluster.ErrNoLeader, status.Convert(err).Message())
	}
	return err
}

// ForwardApply implements cluster.Forwarder.
func (p *PeerClients) ForwardApply(ctx context.Context, addr string, cmd []byte) ([]byte, uint64, error) {
	c, err := p.conn(addr)
	if err != nil {
		return nil, 0, err
	}
	resp, err := cabinetpb.NewNodeServiceClient(c).Apply(ctx, &cabinetpb.ApplyRequest{Command: cmd})
	if err != nil {
		return nil, 0, fromPeer(err)
	}
	return resp.GetResult(), resp.GetIndex(), nil
}

// ReadIndex implements cluster.Forwarder.
func (p *PeerClients) ReadIndex(ctx context.Context, addr string) (uint64, error) {
	c, err := p.conn(addr)
	if err != nil {
		return 0, err
	}
	resp, err := cabinetpb.NewNodeServiceClient(c).ReadIndex(ctx, &cabinetpb.ReadIndexRequest{})
	if err != nil {
		return 0, fromPeer(err)
	}
	return resp.GetIndex(), nil
}

// Status asks a peer for its own status.
func (p *PeerClients) Status(ctx context.Context, addr string) (*cabinetpb.StatusResponse, error) {
	c, err := p.conn(addr)
	if err != nil {
		return nil, err
	}
	return cabinetpb.NewOperatorServiceClient(c).Status(ctx, &cabinetpb.StatusRequest{})
}

// AddPeer asks the node at addr to add this node to the Raft configuration.
func (p *PeerClients) AddPeer(ctx context.Context, addr string) (*cabinetpb.AddPeerResponse, error) {
	c, err := p.conn(addr)
	if err != nil {
		return nil, err
	}
	return cabinetpb.NewNodeServiceClient(c).AddPeer(ctx, &cabinetpb.AddPeerRequest{Voter: true})
}
