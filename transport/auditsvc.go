package transport

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

func (s *Server) AuditTail(ctx context.Context, req *cabinetpb.AuditTailRequest) (*cabinetpb.AuditTailResponse, error) {
	if s.cfg.Audit == nil {
		return nil, status.Error(codes.FailedPrecondition, "this node has no audit log")
	}
	n := int(req.GetCount())
	if n <= 0 {
		n = 20
	}
	if n > 1000 {
		return nil, status.Error(codes.InvalidArgument, "count must be at most 1000")
	}
	recs, err := s.cfg.Audit.Tail(n)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "read the audit log: %v", err)
	}
	out := &cabinetpb.AuditTailResponse{}
	for _, r := range recs {
		out.Records = append(out.Records, &cabinetpb.AuditRecord{
			Seq: r.Seq, Time: timestamppb.New(r.Time), Node: r.Node, Principal: r.Principal, Role: r.Role, Operation: r.Operation,
			KeyId: r.KeyID, KeyVersion: r.KeyVersion, Outcome: r.Outcome, RequestId: r.RequestID, ClientAddr: r.ClientAddr,
			PrevHash: r.PrevHash, Hash: r.Hash,
		})
	}
	return out, nil
}

func (s *Server) AuditVerify(ctx context.Context, _ *cabinetpb.AuditVerifyRequest) (*cabinetpb.AuditVerifyResponse, error) {
	if s.cfg.Audit == nil {
		return nil, status.Error(codes.FailedPrecondition, "this node has no audit log")
	}
	// The live log verifies up to its last complete record (reading the
	// file by path could catch a record mid-write).
	rep, err := s.cfg.Audit.Verify()
	if err != nil {
		return nil, status.Errorf(codes.Internal, "read the audit log: %v", err)
	}
	return &cabinetpb.AuditVerifyResponse{Ok: rep.OK, Records: rep.Records, FirstBadSeq: rep.FirstBadSeq, Problem: rep.Problem, File: s.cfg.AuditPath}, nil
}
