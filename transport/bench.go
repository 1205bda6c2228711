package transport

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// Ceilings for `cabinet bench`: the same server, TLS, interceptors and
// message sizes as a real operation, minus the work.

// MaxEchoBytes bounds Echo's response.
const MaxEchoBytes = 4 << 20

func (s *Server) Echo(ctx context.Context, req *cabinetpb.EchoRequest) (*cabinetpb.EchoResponse, error) {
	n := int(req.GetResponseSize())
	if n < 0 || n > MaxEchoBytes {
		return nil, status.Errorf(codes.InvalidArgument, "response_size must be 0..%d", MaxEchoBytes)
	}
	if n == 0 {
		return &cabinetpb.EchoResponse{Payload: req.GetPayload()}, nil
	}
	return &cabinetpb.EchoResponse{Payload: make([]byte, n)}, nil
}

func (s *Server) ApplyNoop(ctx context.Context, req *cabinetpb.ApplyNoopRequest) (*cabinetpb.ApplyNoopResponse, error) {
	n := int(req.GetSize())
	if n < 0 || n > 1<<20 {
		return nil, status.Error(codes.InvalidArgument, "size must be 0..1048576")
	}
	if _, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_NOOP, &fsmpb.Noop{Padding: make([]byte, n)}, "", principal(ctx)); err != nil {
		return nil, err
	}
	return &cabinetpb.ApplyNoopResponse{}, nil
}
