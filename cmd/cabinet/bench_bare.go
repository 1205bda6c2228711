package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// The "echo" operation measures Cabinet's own Echo (ceiling (a) of every
// crypto operation) against a bare gRPC server started inside this bench
// process for the op: the same Echo method, TLS 1.3 with a verified client
// certificate, no interceptors, no audit, no logging. Its ratio is what the
// per-request machinery of a Cabinet node (authorization, audit record,
// request log, metrics) costs a call that does no work, the part that
// ratios against ceiling (a) cannot show.

type bareEchoServer struct {
	cabinetpb.UnimplementedOperatorServiceServer
}

func (bareEchoServer) Echo(_ context.Context, req *cabinetpb.EchoRequest) (*cabinetpb.EchoResponse, error) {
	if n := int(req.GetResponseSize()); n > 0 {
		return &cabinetpb.EchoResponse{Payload: make([]byte, n)}, nil
	}
	return &cabinetpb.EchoResponse{Payload: req.GetPayload()}, nil
}

// startBareServer serves bareEchoServer on 127.0.0.1 with a throwaway
// self-signed certificate, requiring client certificates of the cluster CA
// (the same handshake work as a node). It returns the client TLS config.
func startBareServer(env *benchEnv) (addr string, clientCfg *tls.Config, stop func(), err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "cabinet-bench bare gRPC"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return "", nil, nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return "", nil, nil, err
	}
	serverCfg := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    env.tlsCfg.RootCAs,
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, nil, err
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(serverCfg)), grpc.MaxConcurrentStreams(1024))
	cabinetpb.RegisterOperatorServiceServer(g, bareEchoServer{})
	done := make(chan struct{})
	go func() { _ = g.Serve(ln); close(done) }()
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	clientCfg = env.tlsCfg.Clone()
	clientCfg.RootCAs = pool
	stop = func() {
		stopped := make(chan struct{})
		go func() { g.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
			g.Stop()
		}
		<-done
	}
	return ln.Addr().String(), clientCfg, stop, nil
}

func prepEcho(ctx context.Context, env *benchEnv) (*preparedOp, error) {
	n := env.f.concurrency
	body := benchRandom(env.f.payload)
	mk := func() *cabinetpb.EchoRequest {
		return &cabinetpb.EchoRequest{Payload: body, ResponseSize: int32(env.f.payload)}
	}
	reqs := make([]*cabinetpb.EchoRequest, n)
	for i := range reqs {
		reqs[i] = mk()
	}
	c, cancel := env.setupCtx(ctx)
	resp, err := env.ocs[0].Echo(c, reqs[0])
	cancel()
	if err != nil {
		return nil, fmt.Errorf("first request: %w", rpcError(err))
	}
	p := &preparedOp{items: 1, reqBytes: proto.Size(reqs[0]), respBytes: proto.Size(resp)}
	p.call = func(ctx context.Context, caller int) (int, string, error) {
		_, err := env.ocs[env.callerConn(caller)].Echo(ctx, reqs[caller])
		return 0, "", err
	}

	addr, cfg, stop, err := startBareServer(env)
	if err != nil {
		return nil, fmt.Errorf("start the bare gRPC server: %w", err)
	}
	var clients []cabinetpb.OperatorServiceClient
	var conns []*grpc.ClientConn
	for range env.conns {
		conn, err := benchDial(addr, cfg)
		if err != nil {
			for _, c := range conns {
				c.Close()
			}
			stop()
			return nil, err
		}
		conns = append(conns, conn)
		clients = append(clients, cabinetpb.NewOperatorServiceClient(conn))
	}
	p.cleanup = func() {
		for _, c := range conns {
			c.Close()
		}
		stop()
	}
	bareReqs := make([]*cabinetpb.EchoRequest, n)
	for i := range bareReqs {
		bareReqs[i] = mk()
	}
	p.ceilingOverride = func(ctx context.Context, caller int) (int, string, error) {
		_, err := clients[caller%len(clients)].Echo(ctx, bareReqs[caller])
		return 0, "", err
	}
	p.ceilingInfo = benchCeiling{Kind: ceilingBareGRPC, RequestBytes: p.reqBytes, ResponseBytes: p.respBytes}
	return p, nil
}
