package transport

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// MembershipCluster is what the membership handlers need from the Raft node
// (cluster.Node) beyond Cluster.
type MembershipCluster interface {
	AddNonvoter(ctx context.Context, id, raftAddr string) error
	RemoveServer(ctx context.Context, id string) error
	TransferLeadershipTo(ctx context.Context, id string) error
}

// GossipView is what list-peers needs from gossip (cluster.Gossip).
type GossipView interface {
	// Health is alive, suspect, dead, left or unknown.
	Health(nodeID string) string
}

// membershipState holds what is wired after the server is built (gossip
// starts once the gossip key is in the replicated state).
type membershipState struct {
	mu     sync.Mutex
	gossip GossipView
	// The gossip key generation this node encrypts with, and how many keys
	// it decrypts with (StatusResponse).
	keyInUse, keysHeld uint32
}

// setGossipKeys records this node's gossip key progress for Status.
func (s *Server) setGossipKeys(inUse uint32, held int) {
	s.membership.mu.Lock()
	defer s.membership.mu.Unlock()
	s.membership.keyInUse, s.membership.keysHeld = inUse, uint32(held)
}

// SetGossip makes list-peers report gossip's view; nil turns it off.
func (s *Server) SetGossip(g GossipView) {
	s.membership.mu.Lock()
	defer s.membership.mu.Unlock()
	s.membership.gossip = g
}

func (s *Server) gossipHealth(id string) string {
	s.membership.mu.Lock()
	g := s.membership.gossip
	s.membership.mu.Unlock()
	if g == nil {
		return cluster.GossipUnknown
	}
	return g.Health(id)
}

func (s *Server) membershipCluster() (MembershipCluster, error) {
	mc, ok := s.cfg.Cluster.(MembershipCluster)
	if !ok {
		return nil, status.Error(codes.Unimplemented, "this node cannot change the cluster membership")
	}
	return mc, nil
}

// leaderOperator returns an OperatorService client on the leader for
// relaying a membership call from a follower. A call that was already
// relayed (node role) is refused rather than relayed again.
func (s *Server) leaderOperator(ctx context.Context) (cabinetpb.OperatorServiceClient, error) {
	if id, _ := IdentityFrom(ctx); id.Role == roleNode {
		return nil, status.Errorf(codes.Unavailable, "node %s is not the leader any more; retry", s.cfg.NodeID)
	}
	lid, addr := s.cfg.Cluster.Leader()
	if lid == "" || addr == "" {
		return nil, status.Error(codes.Unavailable, cluster.ErrNoLeader.Error())
	}
	if s.cfg.Peers == nil {
		return nil, status.Error(codes.Unavailable, "this node cannot reach the leader; call the leader directly")
	}
	conn, err := s.cfg.Peers.conn(addr)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "reach the leader %s: %v", lid, err)
	}
	return cabinetpb.NewOperatorServiceClient(conn), nil
}

// RemovePeer removes a node from the Raft configuration and its record from
// the replicated state. Any node accepts it; a follower relays it to the
// leader. The node can come back only through a new join (`cabinet operator
// rejoin`).
func (s *Server) RemovePeer(ctx context.Context, req *cabinetpb.RemovePeerRequest) (*cabinetpb.RemovePeerResponse, error) {
	if req.GetNodeId() == "" {
		return nil, status.Error(codes.InvalidArgument, "node_id is required")
	}
	if !s.cfg.Cluster.IsLeader() {
		peer, err := s.leaderOperator(ctx)
		if err != nil {
			return nil, err
		}
		return peer.RemovePeer(ctx, req)
	}
	if err := s.RemoveNode(ctx, req.GetNodeId(), requestID(ctx, req.GetRequestId()), principal(ctx), 1); err != nil {
		return nil, err
	}
	return &cabinetpb.RemovePeerResponse{}, nil
}

// RemoveNode (leader only) removes nodeID from Raft and the state. It
// refuses to remove the leader itself (transfer leadership first) and to
// leave fewer than minVoters voters. Removing a node that is only in one of
// the two (a half-finished earlier removal) completes the removal.
func (s *Server) RemoveNode(ctx context.Context, nodeID, reqID, who string, minVoters int) error {
	mc, err := s.membershipCluster()
	if err != nil {
		return err
	}
	if !s.cfg.Cluster.IsLeader() {
		return toStatus(cluster.ErrNotLeader)
	}
	if nodeID == s.cfg.NodeID {
		return status.Errorf(codes.FailedPrecondition,
			"%s is the leader: move leadership first (`cabinet operator transfer-leadership`), then remove it", nodeID)
	}
	servers, err := s.cfg.Cluster.Servers()
	if err != nil {
		return toStatus(err)
	}
	inRaft := false
	for _, srv := range servers {
		inRaft = inRaft || srv.ID == nodeID
	}
	_, inState := s.cfg.State.Node(nodeID)
	if !inRaft && !inState {
		return status.Errorf(codes.NotFound, "node %q is not a member of the cluster (see `cabinet operator list-peers`)", nodeID)
	}
	if inRaft {
		if err := cluster.SafeToRemoveVoter(servers, nodeID, nil, minVoters); err != nil {
			return status.Errorf(codes.FailedPrecondition, "refusing to remove %s: %v", nodeID, err)
		}
		if err := mc.RemoveServer(ctx, nodeID); err != nil {
			return toStatus(err)
		}
	}
	if inState {
		_, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_REMOVE_NODE, &fsmpb.RemoveNode{NodeId: nodeID}, reqID, who)
		if err != nil && status.Code(err) != codes.NotFound {
			return err
		}
	}
	s.log.Info("removed node", "node_id", nodeID, "by", who)
	return nil
}

// TransferLeadership moves leadership to the named voter, or to the most
// up-to-date one when none is named, and returns the new leader's id.
func (s *Server) TransferLeadership(ctx context.Context, req *cabinetpb.TransferLeadershipRequest) (*cabinetpb.TransferLeadershipResponse, error) {
	mc, err := s.membershipCluster()
	if err != nil {
		return nil, err
	}
	if !s.cfg.Cluster.IsLeader() {
		peer, err := s.leaderOperator(ctx)
		if err != nil {
			return nil, err
		}
		return peer.TransferLeadership(ctx, req)
	}
	to := req.GetToNodeId()
	if to == s.cfg.NodeID {
		return &cabinetpb.TransferLeadershipResponse{LeaderId: to}, nil
	}
	if err := mc.TransferLeadershipTo(ctx, to); err != nil {
		if errors.Is(err, cluster.ErrNotMember) {
			return nil, status.Errorf(codes.NotFound, "%v (see `cabinet operator list-peers`)", err)
		}
		if errors.Is(err, cluster.ErrNotLeader) {
			return nil, toStatus(err)
		}
		return nil, status.Errorf(codes.FailedPrecondition, "%v", err)
	}
	// Report who leads now (the transfer returns once we stepped down).
	deadline := time.Now().Add(5 * time.Second)
	for {
		lid, _ := s.cfg.Cluster.Leader()
		if lid != "" && lid != s.cfg.NodeID && (to == "" || lid == to) {
			s.log.Info("leadership transferred", "to", lid, "by", principal(ctx))
			return &cabinetpb.TransferLeadershipResponse{LeaderId: lid}, nil
		}
		if time.Now().After(deadline) {
			return nil, status.Error(codes.Unavailable, fmt.Sprintf("leadership left %s but no new leader is known yet; check `cabinet operator status`", s.cfg.NodeID))
		}
		select {
		case <-ctx.Done():
			return nil, toStatus(ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// GossipKeyAAD binds the sealed gossip key to its cluster.
func GossipKeyAAD(clusterID string) []byte { return []byte("cabinet/gossip-key/v1\x00" + clusterID) }

// GossipMembers counts the Raft configuration's members by gossip health
// (alive, suspect, dead, unknown), for metrics.
func (s *Server) GossipMembers() map[string]int {
	out := map[string]int{}
	servers, err := s.cfg.Cluster.Servers()
	if err != nil {
		return out
	}
	for _, srv := range servers {
		out[s.gossipHealth(srv.ID)]++
	}
	return out
}
