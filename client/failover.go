package client

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// failoverConn is a grpc.ClientConnInterface over one connection per
// endpoint: a unary call goes to the current endpoint and, on a retryable
// failure, to the next ones in turn with backoff, until it succeeds, gets
// a definite answer, runs out of attempts or reaches its deadline. Every
// generated stub built on it (KeyService, OperatorService) gets the same
// behaviour.
type failoverConn struct {
	endpoints []string
	conns     []*grpc.ClientConn
	// current is the index of the endpoint calls start with: the last one
	// that answered, moved past one that failed.
	current atomic.Int32

	callTimeout    time.Duration
	attemptTimeout time.Duration
	maxAttempts    int
	initialBackoff time.Duration
	maxBackoff     time.Duration
}

var _ grpc.ClientConnInterface = (*failoverConn)(nil)

func (f *failoverConn) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	if _, ok := ctx.Deadline(); !ok && f.callTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, f.callTimeout)
		defer cancel()
	}
	// Set once, before the first attempt, so every retry of a write carries
	// the same id and the cluster applies it at most once.
	args = withRequestID(args)
	n := len(f.conns)
	start := int(f.current.Load())
	attempts := 0
	var last error
	for {
		i := (start + attempts) % n
		err := f.attempt(ctx, i, method, args, reply, opts)
		attempts++
		if err == nil {
			f.current.Store(int32(i))
			return nil
		}
		last = err
		if !retryable(ctx, err) {
			break
		}
		// Let concurrent calls skip this endpoint too.
		f.current.CompareAndSwap(int32(i), int32((i+1)%n))
		if f.maxAttempts > 0 && attempts >= f.maxAttempts {
			break
		}
		if !sleepCtx(ctx, f.backoff(attempts)) {
			break
		}
	}
	return annotate(last, attempts, n)
}

func (f *failoverConn) attempt(ctx context.Context, i int, method string, args, reply any, opts []grpc.CallOption) error {
	if f.attemptTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, f.attemptTimeout)
		defer cancel()
	}
	return f.conns[i].Invoke(ctx, method, args, reply, opts...)
}

// NewStream opens a stream on the current endpoint, without failover: no
// Cabinet client method streams today.
func (f *failoverConn) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	return f.conns[f.current.Load()].NewStream(ctx, desc, method, opts...)
}

func (f *failoverConn) close() error {
	var errs []error
	for _, c := range f.conns {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// backoff is the pause before attempt number attempts+1: initialBackoff
// doubled per attempt, capped at maxBackoff, jittered to [d/2, d] so
// clients that failed together do not retry together.
func (f *failoverConn) backoff(attempts int) time.Duration {
	d := f.maxBackoff
	if shift := attempts - 1; shift < 30 {
		if b := f.initialBackoff << shift; b > 0 && b < d {
			d = b
		}
	}
	return d/2 + rand.N(d/2+1)
}

// retryable reports whether another endpoint may give a different answer:
// Unavailable (node down, stale, without leader or HSM; connection
// errors), Aborted, and an attempt that hit WithAttemptTimeout while the
// call still has time. Writes are safe to retry because of request ids.
// Definite answers (InvalidArgument, NotFound, PermissionDenied,
// FailedPrecondition, AlreadyExists, ...) never are.
func retryable(ctx context.Context, err error) bool {
	if ctx.Err() != nil {
		return false
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.Aborted, codes.DeadlineExceeded:
		return true
	}
	return false
}

// annotate adds the number of attempts to the last error's message,
// keeping its code and details.
func annotate(err error, attempts, endpoints int) error {
	if attempts <= 1 {
		return err
	}
	st, ok := status.FromError(err)
	if !ok {
		return fmt.Errorf("%w (after %d attempts over %d endpoints)", err, attempts, endpoints)
	}
	p := st.Proto()
	p.Message = fmt.Sprintf("%s (after %d attempts over %d endpoints)", p.GetMessage(), attempts, endpoints)
	return status.FromProto(p).Err()
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// withRequestID returns args, or a clone of it with a fresh request id
// when it is a message with an empty string field named request_id.
func withRequestID(args any) any {
	m, ok := args.(proto.Message)
	if !ok {
		return args
	}
	r := m.ProtoReflect()
	fd := r.Descriptor().Fields().ByName("request_id")
	if fd == nil || fd.Kind() != protoreflect.StringKind || fd.Cardinality() == protoreflect.Repeated || r.Get(fd).String() != "" {
		return args
	}
	c := proto.Clone(m)
	c.ProtoReflect().Set(fd, protoreflect.ValueOfString(NewRequestID()))
	return c
}
