package transport

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

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

const (
	// featureProbeEvery bounds repairFeatureLevels' Status calls.
	featureProbeEvery = 30 * time.Second
	// featureProbeTimeout bounds one of them.
	featureProbeTimeout = 5 * time.Second
)

// featureState is the Server's rolling-upgrade bookkeeping.
type featureState struct {
	probe  atomic.Int64 // when repairFeatureLevels last asked peers (unix ns)
	warned sync.Map     // problems logged once, by category
}

func (s *Server) featureWarnOnce(key, msg string, args ...any) {
	if _, seen := s.features.warned.LoadOrStore(key, true); !seen {
		s.log.Warn(msg, args...)
	}
}

// FeatureStep does this node's rolling-upgrade duties once: record this
// binary's level in its node record, and repair members' levels this node's
// state shows too low. RunKEKNodeDuties calls it every tick.
func (s *Server) FeatureStep(ctx context.Context) {
	if _, member := s.cfg.State.Node(s.cfg.NodeID); !member {
		return
	}
	if err := s.reportFeatureLevel(ctx); err != nil {
		s.featureWarnOnce("report", "could not record this node's feature level; retrying", "err", err)
	}
	s.repairFeatureLevels(ctx)
}

// repairFeatureLevels: a node of an older release skips
// SET_NODE_FEATURE_LEVEL, and a snapshot it took then (or installed from a
// leader of an older release) keeps the members' old levels after it is
// upgraded; nothing would propose them again. So while this node sees
// members below its own level, it asks them (Status over node mTLS, at most
// every featureProbeEvery) and records a higher level one reports. In a
// cluster at one level it does nothing.
func (s *Server) repairFeatureLevels(ctx context.Context) {
	low, at := s.cfg.State.MinFeatureLevel()
	if at == nil || low >= fsm.FeatureLevel || s.cfg.Peers == nil {
		return
	}
	now := time.Now()
	if last := s.features.probe.Load(); last != 0 && now.Sub(time.Unix(0, last)) < featureProbeEvery {
		return
	}
	s.features.probe.Store(now.UnixNano())
	for _, id := range at {
		rec, ok := s.cfg.State.Node(id)
		if id == s.cfg.NodeID || !ok || rec.GetApiAddr() == "" {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, featureProbeTimeout)
		st, err := s.cfg.Peers.Status(cctx, rec.GetApiAddr())
		cancel()
		switch {
		case err != nil:
			s.featureWarnOnce("probe:"+id, "could not ask a member for its feature level (this node's state shows it below this release's); retrying every 30 s",
				"peer", id, "addr", rec.GetApiAddr(), "err", err)
			continue
		case st.GetNodeId() != id:
			s.featureWarnOnce("probe-id:"+id, "the member's API address answers as another node; its feature level stays as recorded",
				"peer", id, "addr", rec.GetApiAddr(), "answered_as", st.GetNodeId())
			continue
		case st.GetFeatureLevel() <= rec.GetFeatureLevel():
			continue // it does run an older release
		}
		if _, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_SET_NODE_FEATURE_LEVEL,
			&fsmpb.SetNodeFeatureLevel{NodeId: id, Level: st.GetFeatureLevel()}, requestID(ctx, ""), "node:"+s.cfg.NodeID); err != nil {
			s.log.Warn("record a peer's feature level", "peer", id, "level", st.GetFeatureLevel(), "err", err)
			continue
		}
		s.log.Info("feature level of a peer recorded (this node's state had an older one)", "peer", id, "level", st.GetFeatureLevel(), "was", rec.GetFeatureLevel())
	}
}
