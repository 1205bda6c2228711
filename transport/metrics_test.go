package transport

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) lines() []map[string]any {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(l.b.String()), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// TestRequestMetricsAndLogs: the outer interceptor counts every request by
// method and code (including ones the authorization interceptor refuses),
// times it, and logs one line per request with its request id, which the
// caller may choose and always gets back in the response header.
func TestRequestMetricsAndLogs(t *testing.T) {
	state := fsm.New(fsm.Config{})
	logs := &lockedBuffer{}
	srv := NewServer(Config{NodeID: "node1", Cluster: &fakeCluster{fsm: state}, State: state, HSM: hsm.NewMemory(), Version: "test",
		Logger: slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	ca, err := tlsutil.NewCA("c-test", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	nodeKey, csr, err := tlsutil.NewNodeKey("node1")
	if err != nil {
		t.Fatal(err)
	}
	nodeDER, err := ca.IssueNode(csr, "node1", []net.IP{net.ParseIP("127.0.0.1")}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	nodeCert, err := tlsutil.KeyPair(nodeKey, nodeDER, ca.CertDER)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	m := NewRPCMetrics(reg)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := srv.NewGRPCServer(tlsutil.ServerConfig(nodeCert, ca.Pool()), WithRPCMetrics(m))
	go g.Serve(ln)
	t.Cleanup(g.Stop)
	admin := dialTLS(t, ln.Addr().String(), tlsutil.ClientConfig(issueClient(t, ca, "alice", tlsutil.RoleAdmin), ca.Pool()))
	client := dialTLS(t, ln.Addr().String(), tlsutil.ClientConfig(issueClient(t, ca, "bob", tlsutil.RoleClient), ca.Pool()))

	ctx := metadata.AppendToOutgoingContext(context.Background(), RequestIDHeader, "trace-123")
	var hdr metadata.MD
	_, err = cabinetpb.NewKeyServiceClient(admin).DescribeKey(ctx, &cabinetpb.DescribeKeyRequest{KeyId: "k-missing"}, grpc.Header(&hdr))
	if code(err) != codes.NotFound {
		t.Fatalf("DescribeKey: %v", err)
	}
	if got := hdr.Get(RequestIDHeader); len(got) != 1 || got[0] != "trace-123" {
		t.Fatalf("response header %s = %v, want the caller's id", RequestIDHeader, got)
	}
	hdr = nil
	_, err = cabinetpb.NewKeyServiceClient(client).CreateKey(context.Background(), &cabinetpb.CreateKeyRequest{}, grpc.Header(&hdr))
	if code(err) != codes.PermissionDenied {
		t.Fatalf("CreateKey as client: %v", err)
	}
	generated := hdr.Get(RequestIDHeader)
	if len(generated) != 1 || len(generated[0]) != 16 {
		t.Fatalf("generated request id %v", generated)
	}

	if v := testutil.ToFloat64(m.requests.WithLabelValues("cabinet.v1.KeyService", "DescribeKey", "NotFound")); v != 1 {
		t.Errorf("DescribeKey NotFound counted %v times", v)
	}
	if v := testutil.ToFloat64(m.requests.WithLabelValues("cabinet.v1.KeyService", "CreateKey", "PermissionDenied")); v != 1 {
		t.Errorf("refused CreateKey counted %v times", v)
	}
	if n := testutil.CollectAndCount(m.latency); n != 2 {
		t.Errorf("%d latency series, want 2", n)
	}
	if v := testutil.ToFloat64(m.inFlight); v != 0 {
		t.Errorf("in flight %v after the calls returned", v)
	}

	byID := map[string]map[string]any{}
	for _, l := range logs.lines() {
		if l["msg"] == "request" {
			byID[l["request_id"].(string)] = l
		}
	}
	if l := byID["trace-123"]; l == nil || l["method"] != "/cabinet.v1.KeyService/DescribeKey" || l["code"] != "NotFound" || l["principal"] != "admin:alice" {
		t.Errorf("DescribeKey log line: %v", l)
	}
	if l := byID[generated[0]]; l == nil || l["code"] != "PermissionDenied" || l["principal"] != "client:bob" || l["level"] != "WARN" {
		t.Errorf("CreateKey log line: %v", l)
	}
}

func TestIncomingRequestIDIsSanitised(t *testing.T) {
	for in, keep := range map[string]bool{"abc-123": true, "": false, "has space": false, strings.Repeat("x", 129): false, "naïve": false} {
		ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs(RequestIDHeader, in))
		if got := incomingRequestID(ctx); (got == in) != keep || got == "" {
			t.Errorf("incoming %q gave %q", in, got)
		}
	}
}
