package transport

import (
	"context"
	"fmt"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// Rolling upgrades (fsm/features.go): a feature every node must understand
// is used only once every member's feature level allows it.

// featureReady reports whether every member's level is at least level.
func (s *Server) featureReady(level uint32) bool {
	low, at := s.cfg.State.MinFeatureLevel()
	return at == nil || low >= level
}

// requireFeature refuses an operation that needs feature level `level` on
// every member, naming the members that are behind.
func (s *Server) requireFeature(level uint32, what string) error {
	low, at := s.cfg.State.MinFeatureLevel()
	if at == nil || low >= level {
		return nil
	}
	return status.Errorf(codes.FailedPrecondition,
		"%s needs every node on a release with feature level %d or later; %s at level %d (upgrade them first; `cabinet operator list-peers` shows each node's version and level)",
		what, level, strings.Join(at, ", "), low)
}

// reportFeatureLevel records this binary's feature level in this node's
// record when it differs (the node was upgraded or downgraded). The command
// is ignorable: nodes of older releases skip it.
func (s *Server) reportFeatureLevel(ctx context.Context) error {
	rec, ok := s.cfg.State.Node(s.cfg.NodeID)
	if !ok || rec.GetFeatureLevel() == fsm.FeatureLevel {
		return nil
	}
	if _, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_SET_NODE_FEATURE_LEVEL,
		&fsmpb.SetNodeFeatureLevel{NodeId: s.cfg.NodeID, Level: fsm.FeatureLevel}, requestID(ctx, ""), "node:"+s.cfg.NodeID); err != nil {
		return fmt.Errorf("record this node's feature level %d (was %d): %w", fsm.FeatureLevel, rec.GetFeatureLevel(), err)
	}
	s.log.Info("feature level recorded", "level", fsm.FeatureLevel, "was", rec.GetFeatureLevel())
	return nil
}
