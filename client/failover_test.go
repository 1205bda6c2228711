package client_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/client"
	"github.com/cabinet-kms/cabinet/internal/testcluster"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

func clusterClient(t *testing.T, tc *testcluster.Cluster, endpoints []string, opts ...client.Option) *client.Client {
	t.Helper()
	c, err := client.New(endpoints, append([]client.Option{
		client.WithTLSFiles(tc.CAFile(), tc.AdminCertFile(), tc.AdminKeyFile()),
	}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func keyCount(t *testing.T, c *client.Client) int {
	t.Helper()
	keys, err := c.ListAllKeys(context.Background())
	if err != nil {
		t.Fatalf("ListAllKeys: %v", err)
	}
	return len(keys)
}

// hookReader calls hook once, when at bytes have been read.
type hookReader struct {
	r    io.Reader
	read int
	at   int
	hook func()
	done bool
}

func (h *hookReader) Read(p []byte) (int, error) {
	if !h.done && h.read >= h.at {
		h.done = true
		h.hook()
	}
	n, err := h.r.Read(p[:min(len(p), max(1, h.at-h.read))])
	h.read += n
	return n, err
}

// TestFailoverWhenLeaderStops stops the node the client talks to, which
// is also the leader, in the middle of an envelope stream and while other
// goroutines encrypt, decrypt and create keys: every call succeeds through
// the other nodes, and every CreateKey that succeeded made exactly one key.
func TestFailoverWhenLeaderStops(t *testing.T) {
	tc := testcluster.Start(t, testcluster.Config{Logger: debugLogger()})
	leader := tc.Leader()
	if leader < 0 {
		t.Fatal("no leader")
	}
	all := tc.Endpoints()
	endpoints := append(append([]string{}, all[leader:]...), all[:leader]...) // leader first
	// A generous call timeout: the test is about failover, and elections
	// take longer when -race tests share a busy machine.
	c := clusterClient(t, tc, endpoints, client.WithCallTimeout(30*time.Second))
	ctx := context.Background()
	keyID := newAESKey(t, c)
	if c.Endpoint() != all[leader] {
		t.Fatalf("client uses %s, want the leader %s", c.Endpoint(), all[leader])
	}
	// Let every node apply the key before the leader goes: a follower that
	// misses a key while there is no leader answers NotFound, not
	// Unavailable (transport's lookupKey ignores the failed catch-up), and
	// NotFound is rightly not retried.
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := tc.WaitHealthy(wctx); err != nil {
		t.Fatal(err)
	}
	before := keyCount(t, c)

	// Workers run until the stream below is done.
	var (
		stop    = make(chan struct{})
		wg      sync.WaitGroup
		ops     atomic.Int64
		created atomic.Int64
		errMu   sync.Mutex
		errs    []error
	)
	fail := func(err error) {
		errMu.Lock()
		defer errMu.Unlock()
		errs = append(errs, err)
	}
	for w := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				msg := []byte(fmt.Sprintf("worker %d message %d", w, i))
				ct, err := c.Encrypt(ctx, keyID, msg, nil)
				if err != nil {
					fail(fmt.Errorf("Encrypt: %w", err))
					return
				}
				pt, err := c.Decrypt(ctx, ct, nil)
				if err != nil || !bytes.Equal(pt, msg) {
					fail(fmt.Errorf("Decrypt: %q, %w", pt, err))
					return
				}
				ops.Add(2)
			}
		})
	}
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := c.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256}); err != nil {
				fail(fmt.Errorf("CreateKey: %w", err))
				return
			}
			created.Add(1)
		}
	})

	env := client.NewEnvelope(c)
	data := randomBytes(t, 3<<20)
	encCtx := map[string]string{"stream": "failover"}
	var stoppedAt int64
	in := &hookReader{r: bytes.NewReader(data), at: len(data) / 2, hook: func() {
		stoppedAt = ops.Load()
		tc.Stop(leader)
	}}
	var sealed bytes.Buffer
	if err := env.EncryptStream(ctx, &sealed, in, keyID, encCtx); err != nil {
		t.Fatalf("EncryptStream across the stop: %v", err)
	}
	var out bytes.Buffer
	if err := env.DecryptStream(ctx, &out, &sealed, encCtx); err != nil {
		t.Fatalf("DecryptStream after the stop: %v", err)
	}
	if !bytes.Equal(out.Bytes(), data) {
		t.Fatal("envelope round trip across the stop differs")
	}
	// Keep the workers going until they made progress after the stop.
	deadline := time.Now().Add(15 * time.Second)
	for ops.Load() < stoppedAt+50 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond) // bounded by deadline
	}
	close(stop)
	wg.Wait()
	for _, err := range errs {
		t.Error(err)
	}
	if ops.Load() < stoppedAt+50 {
		t.Errorf("only %d operations after the stop", ops.Load()-stoppedAt)
	}
	if c.Endpoint() == all[leader] {
		t.Errorf("client still prefers the stopped node %s", all[leader])
	}
	// ListKeys is served from the node's replica: let every node apply
	// everything first.
	wctx2, cancel2 := context.WithTimeout(ctx, 20*time.Second)
	defer cancel2()
	if err := tc.WaitHealthy(wctx2); err != nil {
		t.Fatal(err)
	}
	if got, want := keyCount(t, c), before+int(created.Load()); got != want {
		t.Errorf("%d keys after %d successful CreateKey calls, want %d: a retry created a duplicate or lost a key", got, created.Load(), want)
	}
	t.Logf("%d crypto operations (%d after the stop), %d keys created", ops.Load(), ops.Load()-stoppedAt, created.Load())
}

// dropFirst returns an interceptor that performs the first call of method
// and then reports it as failed with Unavailable, as if the answer was
// lost on the way back; it records the answer the client never saw.
func dropFirst(method string, lost *atomic.Value) grpc.UnaryClientInterceptor {
	var dropped atomic.Bool
	return func(ctx context.Context, m string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		err := invoker(ctx, m, req, reply, cc, opts...)
		if m == method && err == nil && dropped.CompareAndSwap(false, true) {
			lost.Store(proto.Clone(reply.(proto.Message)))
			return status.Error(codes.Unavailable, "connection reset (test)")
		}
		return err
	}
}

// TestCreateKeyRetryAfterLostAnswer: the cluster created the key but the
// answer was lost; the client retries (on another endpoint) with the same
// request id and gets the same key: one key, not two.
func TestCreateKeyRetryAfterLostAnswer(t *testing.T) {
	for _, viaRaw := range []bool{false, true} {
		t.Run(fmt.Sprintf("raw=%v", viaRaw), func(t *testing.T) {
			var lost atomic.Value
			c := sharedClient(t, client.WithDialOptions(grpc.WithChainUnaryInterceptor(dropFirst("/cabinet.v1.KeyService/CreateKey", &lost))))
			before := keyCount(t, c)
			req := &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, Description: "once"}
			var key *cabinetpb.Key
			var err error
			if viaRaw {
				var resp *cabinetpb.CreateKeyResponse
				resp, err = c.Raw().CreateKey(context.Background(), req)
				key = resp.GetKey()
			} else {
				key, err = c.CreateKey(context.Background(), req)
			}
			if err != nil {
				t.Fatalf("CreateKey: %v", err)
			}
			if req.GetRequestId() != "" {
				t.Error("the caller's request was modified")
			}
			first, _ := lost.Load().(*cabinetpb.CreateKeyResponse)
			if first == nil {
				t.Fatal("the first answer was not dropped")
			}
			if key.GetKeyId() != first.GetKey().GetKeyId() {
				t.Errorf("retry returned key %s, the lost answer was %s", key.GetKeyId(), first.GetKey().GetKeyId())
			}
			if got := keyCount(t, c); got != before+1 {
				t.Errorf("%d keys, want %d", got, before+1)
			}
		})
	}
}

// attemptLog records the status code of every attempt, per method name.
type attemptLog struct {
	mu    sync.Mutex
	codes map[string][]codes.Code
}

func (a *attemptLog) interceptor(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	name := method[strings.LastIndex(method, "/")+1:]
	a.mu.Lock()
	defer a.mu.Unlock()
	a.codes[name] = append(a.codes[name], status.Code(err))
	return err
}

// take returns the codes of name's attempts since the last take.
func (a *attemptLog) take(name string) []codes.Code {
	a.mu.Lock()
	defer a.mu.Unlock()
	c := a.codes[name]
	delete(a.codes, name)
	return c
}

// answeredOnce fails unless the last of one call's attempts returned want
// and every earlier one a transient error the client rightly retried (a
// leader change in the shared cluster can cost an Unavailable): the
// definite answer itself is never retried.
func answeredOnce(t *testing.T, method string, attempts []codes.Code, want codes.Code) {
	t.Helper()
	if len(attempts) == 0 || attempts[len(attempts)-1] != want {
		t.Errorf("%s: attempts %v, want the last to return %v", method, attempts, want)
		return
	}
	for _, c := range attempts[:len(attempts)-1] {
		if c != codes.Unavailable && c != codes.Aborted && c != codes.DeadlineExceeded {
			t.Errorf("%s: attempts %v: retried after a definite %v", method, attempts, c)
		}
	}
	if len(attempts) > 1 {
		t.Logf("%s: attempts %v (transient failures retried)", method, attempts)
	}
}

// TestNoRetryOfDefiniteAnswers: NotFound, InvalidArgument and
// FailedPrecondition come back after one attempt.
func TestNoRetryOfDefiniteAnswers(t *testing.T) {
	log := &attemptLog{codes: map[string][]codes.Code{}}
	c := sharedClient(t, client.WithDialOptions(grpc.WithChainUnaryInterceptor(log.interceptor)))
	ctx := context.Background()
	if _, err := c.DescribeKey(ctx, "no-such-key"); status.Code(err) != codes.NotFound {
		t.Errorf("DescribeKey: %v, want NotFound", err)
	}
	answeredOnce(t, "DescribeKey", log.take("DescribeKey"), codes.NotFound)
	if _, err := c.Decrypt(ctx, []byte("garbage"), nil); status.Code(err) != codes.InvalidArgument {
		t.Errorf("Decrypt: %v, want InvalidArgument", err)
	}
	answeredOnce(t, "Decrypt", log.take("Decrypt"), codes.InvalidArgument)
	if _, err := c.CreateKey(ctx, &cabinetpb.CreateKeyRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("CreateKey without spec: %v, want InvalidArgument", err)
	}
	answeredOnce(t, "CreateKey", log.take("CreateKey"), codes.InvalidArgument)
	mac, err := c.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_HMAC_SHA256})
	if err != nil {
		t.Fatal(err)
	}
	answeredOnce(t, "CreateKey", log.take("CreateKey"), codes.OK)
	_, err = c.Encrypt(ctx, mac.GetKeyId(), []byte("x"), nil)
	if code := status.Code(err); code == codes.OK || code == codes.Unavailable {
		t.Errorf("Encrypt with a MAC key: %v, want a definite error", err)
	} else {
		answeredOnce(t, "Encrypt", log.take("Encrypt"), code)
	}
}

// deadEndpoint returns an address where nothing listens.
func deadEndpoint(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// TestDeadEndpointsSkipped: dead endpoints before a live one cost one
// failed attempt each, then the client sticks to the live one.
func TestDeadEndpointsSkipped(t *testing.T) {
	live := shared.Endpoint(0)
	c, err := client.New([]string{deadEndpoint(t) + "," + deadEndpoint(t), live},
		client.WithTLSFiles(shared.CAFile(), shared.AdminCertFile(), shared.AdminKeyFile()))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n := len(c.Endpoints()); n != 3 {
		t.Fatalf("%d endpoints, want 3 (comma-separated lists are split)", n)
	}
	if _, err := c.ListAllKeys(context.Background()); err != nil {
		t.Fatalf("ListAllKeys with two dead endpoints first: %v", err)
	}
	if c.Endpoint() != live {
		t.Errorf("client prefers %s, want the live %s", c.Endpoint(), live)
	}
}

// TestAllEndpointsDown: the call gives up at its deadline with the last
// Unavailable error, annotated with the attempts made.
func TestAllEndpointsDown(t *testing.T) {
	c, err := client.New([]string{deadEndpoint(t), deadEndpoint(t)},
		client.WithTLSFiles(shared.CAFile(), shared.AdminCertFile(), shared.AdminKeyFile()),
		client.WithCallTimeout(700*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	_, err = c.DescribeKey(context.Background(), "k")
	elapsed := time.Since(start)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("error %v, want Unavailable", err)
	}
	if !strings.Contains(err.Error(), "attempts over 2 endpoints") {
		t.Errorf("error %q does not say how often it tried", err)
	}
	if elapsed < 500*time.Millisecond || elapsed > 5*time.Second {
		t.Errorf("gave up after %v, want about the 700ms call timeout", elapsed)
	}

	// WithMaxAttempts bounds the attempts instead.
	c2, err := client.New([]string{deadEndpoint(t)},
		client.WithTLSFiles(shared.CAFile(), shared.AdminCertFile(), shared.AdminKeyFile()), client.WithMaxAttempts(3))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if _, err := c2.DescribeKey(context.Background(), "k"); status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "after 3 attempts") {
		t.Errorf("with 3 attempts: %v", err)
	}
}

// TestDefaultDeadline: a call without a deadline gets the call timeout; one
// with a deadline keeps it.
func TestDefaultDeadline(t *testing.T) {
	var got atomic.Value
	probe := func(ctx context.Context, m string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		d, ok := ctx.Deadline()
		if !ok {
			got.Store(time.Duration(-1))
		} else {
			got.Store(time.Until(d))
		}
		return invoker(ctx, m, req, reply, cc, opts...)
	}
	c := sharedClient(t, client.WithCallTimeout(3*time.Second), client.WithDialOptions(grpc.WithChainUnaryInterceptor(probe)))
	if _, err := c.ListAllKeys(context.Background()); err != nil {
		t.Fatal(err)
	}
	if d := got.Load().(time.Duration); d <= 2*time.Second || d > 3*time.Second {
		t.Errorf("call without deadline ran with %v left, want about 3s", d)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.ListAllKeys(ctx); err != nil {
		t.Fatal(err)
	}
	if d := got.Load().(time.Duration); d < 20*time.Second {
		t.Errorf("the caller's 30s deadline became %v", d)
	}
}

func TestFromEnvAndOptions(t *testing.T) {
	// TestMain exported the shared cluster's environment.
	c, err := client.New(nil, client.FromEnv())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got, want := strings.Join(c.Endpoints(), ","), strings.Join(shared.Endpoints(), ","); got != want {
		t.Errorf("endpoints %s, want %s", got, want)
	}
	// Explicit endpoints win over CABINET_ADDR.
	c2, err := client.New([]string{shared.Endpoint(2)}, client.FromEnv())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if eps := c2.Endpoints(); len(eps) != 1 || eps[0] != shared.Endpoint(2) {
		t.Errorf("endpoints %v, want only %s", eps, shared.Endpoint(2))
	}

	for name, opts := range map[string][]client.Option{
		"no TLS":        nil,
		"missing files": {client.WithTLSFiles("/nonexistent/ca.pem", "/nonexistent/c.pem", "/nonexistent/k.pem")},
		"bad backoff":   {client.WithTLSFiles(shared.CAFile(), shared.AdminCertFile(), shared.AdminKeyFile()), client.WithBackoff(time.Second, time.Millisecond)},
	} {
		if _, err := client.New([]string{"127.0.0.1:1"}, opts...); err == nil {
			t.Errorf("%s: New succeeded", name)
		}
	}
	t.Setenv("CABINET_CLIENT_KEY", "")
	if _, err := client.New(nil, client.FromEnv()); err == nil {
		t.Error("FromEnv without CABINET_CLIENT_KEY succeeded")
	}
}

// TestTypedMethods exercises every typed method once.
func TestTypedMethods(t *testing.T) {
	c := sharedClient(t)
	ctx := context.Background()
	aes := newAESKey(t, c)

	k, err := c.DescribeKey(ctx, aes)
	if err != nil || k.GetKeyId() != aes {
		t.Fatalf("DescribeKey: %v, %v", k, err)
	}
	dk, err := c.GenerateDataKey(ctx, aes, 0, map[string]string{"a": "b"})
	if err != nil || len(dk.GetPlaintext()) != 32 {
		t.Fatalf("GenerateDataKey: %v", err)
	}
	pt, err := c.Decrypt(ctx, dk.GetCiphertext(), map[string]string{"a": "b"})
	if err != nil || !bytes.Equal(pt, dk.GetPlaintext()) {
		t.Fatalf("Decrypt data key: %v", err)
	}
	ct, err := c.Encrypt(ctx, aes, []byte("v1"), nil)
	if err != nil {
		t.Fatal(err)
	}
	rot, err := c.RotateKey(ctx, aes)
	if err != nil || rot.GetPrimaryVersion() != 2 {
		t.Fatalf("RotateKey: version %d, %v", rot.GetPrimaryVersion(), err)
	}
	re, err := c.ReEncrypt(ctx, ct, nil, "", map[string]string{"moved": "yes"})
	if err != nil {
		t.Fatalf("ReEncrypt: %v", err)
	}
	if pt, err := c.Decrypt(ctx, re, map[string]string{"moved": "yes"}); err != nil || string(pt) != "v1" {
		t.Fatalf("Decrypt re-encrypted: %q, %v", pt, err)
	}

	sk, err := c.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_EC_P256})
	if err != nil {
		t.Fatal(err)
	}
	sig, err := c.Sign(ctx, sk.GetKeyId(), "ECDSA_SHA_256", []byte("contract"))
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	for msg, want := range map[string]bool{"contract": true, "forged": false} {
		if ok, err := c.Verify(ctx, sk.GetKeyId(), "ECDSA_SHA_256", []byte(msg), sig); err != nil || ok != want {
			t.Errorf("Verify(%q) = %v, %v; want %v", msg, ok, err, want)
		}
	}

	mk, err := c.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_HMAC_SHA256})
	if err != nil {
		t.Fatal(err)
	}
	mac, err := c.GenerateMac(ctx, mk.GetKeyId(), []byte("msg"))
	if err != nil {
		t.Fatalf("GenerateMac: %v", err)
	}
	for msg, want := range map[string]bool{"msg": true, "other": false} {
		if ok, err := c.VerifyMac(ctx, mk.GetKeyId(), []byte(msg), mac); err != nil || ok != want {
			t.Errorf("VerifyMac(%q) = %v, %v; want %v", msg, ok, err, want)
		}
	}

	// Operator() reaches the OperatorService with the same failover.
	st, err := c.Operator().Status(ctx, &cabinetpb.StatusRequest{})
	if err != nil || !st.GetHealthy() {
		t.Fatalf("Status: %v, %v", st, err)
	}

	// ListKeys pages: more keys than a page still come back in id order.
	strong := sharedClient(t, client.WithConsistency(cabinetpb.Consistency_STRONG))
	for range 3 {
		newAESKey(t, strong)
	}
	keys, err := strong.ListAllKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i < len(keys); i++ {
		if keys[i-1].GetKeyId() >= keys[i].GetKeyId() {
			t.Fatalf("keys out of order at %d", i)
		}
	}
	// Stopping the iteration early is fine.
	n := 0
	for _, err := range strong.ListKeys(ctx) {
		if err != nil {
			t.Fatal(err)
		}
		if n++; n == 2 {
			break
		}
	}
}

// debugLogger shows the test cluster's logs (Raft elections etc.) when
// TC_DEBUG is set.
func debugLogger() *slog.Logger {
	if os.Getenv("TC_DEBUG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
}
