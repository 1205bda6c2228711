package tlsutil

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

const (
	// DefaultHandshakeTimeout bounds a server-side handshake and a Dial
	// given no timeout.
	DefaultHandshakeTimeout = 10 * time.Second
	// maxPendingHandshakes bounds the goroutines spent on handshakes that
	// have not finished; beyond it, accepting waits for one to end (each
	// ends within the handshake timeout).
	maxPendingHandshakes = 64
)

// StreamOption configures a StreamLayer.
type StreamOption func(*StreamLayer)

// WithHandshakeTimeout sets how long an inbound handshake may take.
func WithHandshakeTimeout(d time.Duration) StreamOption {
	return func(s *StreamLayer) {
		if d > 0 {
			s.handshakeTimeout = d
		}
	}
}

// WithHandshakeErrorHandler receives every failed inbound handshake (a
// refused certificate, a timeout), for logging. Accept never returns these
// errors: raft's accept loop backs off on errors, and one bad peer must not
// slow the others. fn is called from handshake goroutines, concurrently.
func WithHandshakeErrorHandler(fn func(remote net.Addr, err error)) StreamOption {
	return func(s *StreamLayer) { s.onHandshakeError = fn }
}

// StreamLayer implements raft.StreamLayer over TLS. Use NodeServerConfig and
// NodeClientConfig so both ends must hold node certificates.
//
// A background goroutine accepts TCP connections and hands each to its own
// goroutine that runs the TLS handshake under a deadline; Accept returns only
// connections whose handshake succeeded. So a peer that connects and stays
// silent costs one goroutine for at most the handshake timeout and never
// blocks Accept. Close stops all of them and waits for them.
type StreamLayer struct {
	ln        net.Listener
	advertise net.Addr
	serverCfg *tls.Config
	clientCfg *tls.Config

	handshakeTimeout time.Duration
	onHandshakeError func(net.Addr, error)

	conns    chan net.Conn
	pending  chan struct{} // semaphore of running handshakes
	ctx      context.Context
	cancel   context.CancelFunc
	loopDone chan struct{}
	loopErr  error // set before loopDone is closed
	wg       sync.WaitGroup

	closeOnce sync.Once
	closeErr  error
}

var _ raft.StreamLayer = (*StreamLayer)(nil)

// NewStreamLayer wraps ln (a plain TCP listener) and starts accepting.
// advertise is the address other nodes dial; nil means ln.Addr(). The
// caller owns the layer and must Close it (raft's NetworkTransport.Close
// does).
func NewStreamLayer(ln net.Listener, advertise net.Addr, serverCfg, clientCfg *tls.Config, opts ...StreamOption) *StreamLayer {
	if advertise == nil {
		advertise = ln.Addr()
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &StreamLayer{
		ln:               ln,
		advertise:        advertise,
		serverCfg:        serverCfg,
		clientCfg:        clientCfg,
		handshakeTimeout: DefaultHandshakeTimeout,
		conns:            make(chan net.Conn),
		pending:          make(chan struct{}, maxPendingHandshakes),
		ctx:              ctx,
		cancel:           cancel,
		loopDone:         make(chan struct{}),
	}
	for _, o := range opts {
		o(s)
	}
	s.wg.Add(1)
	go s.acceptLoop()
	return s
}

// Accept returns the next inbound connection whose TLS handshake succeeded.
func (s *StreamLayer) Accept() (net.Conn, error) {
	select {
	case c := <-s.conns:
		return c, nil
	case <-s.ctx.Done():
		return nil, net.ErrClosed
	case <-s.loopDone:
		// The listener failed; still prefer a connection already handshaken.
		select {
		case c := <-s.conns:
			return c, nil
		default:
			return nil, s.loopErr
		}
	}
}

// Close stops accepting, aborts running handshakes, closes connections not
// yet returned by Accept, and waits for every goroutine of the layer.
// Connections already returned stay open; their owner closes them.
func (s *StreamLayer) Close() error {
	s.closeOnce.Do(func() {
		s.cancel()
		s.closeErr = s.ln.Close()
		if errors.Is(s.closeErr, net.ErrClosed) {
			s.closeErr = nil
		}
		s.wg.Wait()
	})
	return s.closeErr
}

// Addr returns the advertised address.
func (s *StreamLayer) Addr() net.Addr { return s.advertise }

// Dial opens a TLS connection to address and completes the handshake within
// timeout (DefaultHandshakeTimeout if timeout is zero). In TLS 1.3 a server
// that refuses our certificate is only seen at the first read.
func (s *StreamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	if timeout <= 0 {
		timeout = DefaultHandshakeTimeout
	}
	ctx, cancel := context.WithTimeout(s.ctx, timeout)
	defer cancel()
	d := &tls.Dialer{Config: s.clientCfg}
	c, err := d.DialContext(ctx, "tcp", string(address))
	if err != nil {
		return nil, fmt.Errorf("raft tls dial %s: %w", address, err)
	}
	return c, nil
}

func (s *StreamLayer) acceptLoop() {
	defer s.wg.Done()
	defer close(s.loopDone)
	var delay time.Duration
	for {
		select {
		case s.pending <- struct{}{}:
		case <-s.ctx.Done():
			s.loopErr = net.ErrClosed
			return
		}
		raw, err := s.ln.Accept()
		if err != nil {
			<-s.pending
			if s.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				s.loopErr = net.ErrClosed
				return
			}
			// Transient (e.g. out of file descriptors): back off like net/http.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			select {
			case <-time.After(delay):
				continue
			case <-s.ctx.Done():
				s.loopErr = net.ErrClosed
				return
			}
		}
		delay = 0
		s.wg.Add(1)
		go s.handshake(raw)
	}
}

func (s *StreamLayer) handshake(raw net.Conn) {
	defer s.wg.Done()
	tc := tls.Server(raw, s.serverCfg)
	ctx, cancel := context.WithTimeout(s.ctx, s.handshakeTimeout)
	err := tc.HandshakeContext(ctx)
	cancel()
	<-s.pending
	if err != nil {
		_ = tc.Close()
		if s.onHandshakeError != nil && s.ctx.Err() == nil {
			s.onHandshakeError(raw.RemoteAddr(), err)
		}
		return
	}
	select {
	case s.conns <- tc:
	case <-s.ctx.Done():
		_ = tc.Close()
	}
}
