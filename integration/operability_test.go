package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// grpcurlVersion is the grpcurl the test installs with `go install`.
const grpcurlVersion = "v1.9.3"

// startThreeObserved is startThree with a metrics listener per node and JSON
// logs; it returns each node's metrics address.
func (c *testCluster) startThreeObserved(t *testing.T) map[*node]string {
	t.Helper()
	metrics := map[*node]string{}
	base := c.serverArgs
	n1 := c.nodes[0]
	c.initNode(n1)
	for _, nd := range c.nodes {
		metrics[nd] = freePort(t)
		c.serverArgs = append(append([]string{}, base...), "--metrics-addr", metrics[nd], "--log-format", "json")
		c.start(nd)
	}
	c.serverArgs = base
	c.waitHealthy(n1, 60*time.Second)
	for _, nd := range c.nodes[1:] {
		c.joinNode(nd, n1)
	}
	for _, nd := range c.nodes {
		c.waitHealthy(nd, 60*time.Second)
	}
	return metrics
}

// scrape fetches and parses a node's metrics with the Prometheus text parser.
func scrape(addr string) (map[string]*dto.MetricFamily, error) {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	return p.TextToMetricFamilies(resp.Body)
}

// metricValue returns the value of the family's sample whose labels include
// want (counter, gauge or histogram sample count).
func metricValue(fams map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	f, ok := fams[name]
	if !ok {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, lp := range m.GetLabel() {
			have[lp.GetName()] = lp.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

// healthStatus asks a node's gRPC health service (no client certificate
// needed, TLS verified against the cluster CA).
func (c *testCluster) healthStatus(nd *node, service string) (healthpb.HealthCheckResponse_ServingStatus, error) {
	caPEM, err := os.ReadFile(filepath.Join(c.adminDir, "ca.pem"))
	if err != nil {
		return 0, err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	conn, err := grpc.NewClient(nd.apiAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})))
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		return 0, err
	}
	return resp.GetStatus(), nil
}

func (c *testCluster) waitHealth(nd *node, want healthpb.HealthCheckResponse_ServingStatus, timeout time.Duration) {
	c.t.Helper()
	waitFor(c.t, timeout, fmt.Sprintf("%s health %s", nd.id, want), func() error {
		for _, svc := range []string{"", "cabinet.v1.KeyService"} {
			st, err := c.healthStatus(nd, svc)
			if err != nil {
				return err
			}
			if st != want {
				return fmt.Errorf("service %q is %s", svc, st)
			}
		}
		return nil
	})
}

// TestOperabilityOnRealCluster: on three real processes, the Prometheus
// endpoint serves request, Raft, HSM and cache metrics the text parser
// accepts; every request log line carries a request id; gRPC health turns
// NOT_SERVING while a node's HSM token is gone and SERVING when it returns.
func TestOperabilityOnRealCluster(t *testing.T) {
	c := newTestCluster(t, 3)
	metrics := c.startThreeObserved(t)
	n1, n2 := c.nodes[0], c.nodes[1]

	var k createdKey
	if err := json.Unmarshal([]byte(c.mustCLI(nil, "key", "create", "-o", "json", "--addr", n2.apiAddr)), &k); err != nil {
		t.Fatal(err)
	}
	const encrypts = 5
	for range encrypts {
		ct := strings.TrimSpace(c.mustCLI([]byte("metered"), "key", "encrypt", "--key", k.KeyID, "--addr", n2.apiAddr))
		if pt := c.mustCLI([]byte(ct), "key", "decrypt", "--addr", n2.apiAddr); pt != "metered" {
			t.Fatalf("decrypt: %q", pt)
		}
	}
	_, _, _ = c.cli(context.Background(), nil, "key", "describe", "no-such-key", "--addr", n2.apiAddr)

	t.Run("metrics", func(t *testing.T) {
		fams, err := scrape(metrics[n2])
		if err != nil {
			t.Fatal(err)
		}
		check := func(name string, labels map[string]string, ok func(float64) bool, what string) {
			t.Helper()
			v, found := metricValue(fams, name, labels)
			if !found {
				t.Errorf("%s%v missing", name, labels)
			} else if !ok(v) {
				t.Errorf("%s%v = %v, want %s", name, labels, v, what)
			}
		}
		atLeast := func(n float64) func(float64) bool { return func(v float64) bool { return v >= n } }
		check("cabinet_grpc_requests_total", map[string]string{"service": "cabinet.v1.KeyService", "method": "Encrypt", "code": "OK"}, atLeast(encrypts), ">= 5")
		check("cabinet_grpc_requests_total", map[string]string{"method": "DescribeKey", "code": "NotFound"}, atLeast(1), ">= 1")
		check("cabinet_grpc_request_duration_seconds", map[string]string{"method": "Decrypt"}, atLeast(encrypts), ">= 5 observations")
		check("cabinet_raft_term", nil, atLeast(1), ">= 1")
		check("cabinet_raft_commit_index", nil, atLeast(3), ">= 3")
		check("cabinet_raft_applied_index", nil, atLeast(3), ">= 3")
		check("cabinet_raft_voter", nil, atLeast(1), "1")
		check("cabinet_raft_log_bytes", nil, atLeast(1), "> 0")
		check("cabinet_raft_snapshot_bytes", nil, atLeast(0), "present")
		check("cabinet_raft_last_contact_seconds", nil, func(v float64) bool { return v >= 0 && v < 5 }, "recent")
		check("cabinet_hsm_operations_total", map[string]string{"op": "open"}, atLeast(1), ">= 1")
		check("cabinet_hsm_operation_duration_seconds", map[string]string{"op": "health"}, atLeast(1), ">= 1")
		check("cabinet_unwrap_cache_hits_total", nil, atLeast(encrypts), ">= 5")
		check("cabinet_unwrap_cache_misses_total", nil, atLeast(1), ">= 1")
		check("cabinet_unwrap_cache_size", nil, atLeast(1), ">= 1")
		check("cabinet_keys", nil, atLeast(1), ">= 1")
		check("cabinet_gossip_members", map[string]string{"state": "alive"}, atLeast(0), "present")
		check("cabinet_build_info", nil, atLeast(1), "1")
		check("go_goroutines", nil, atLeast(1), "> 0")
		leaders := 0.0
		for _, nd := range c.nodes {
			f, err := scrape(metrics[nd])
			if err != nil {
				t.Fatal(err)
			}
			v, _ := metricValue(f, "cabinet_raft_state", map[string]string{"state": "leader"})
			leaders += v
		}
		if leaders != 1 {
			t.Errorf("cabinet_raft_state{state=leader} sums to %v over the cluster, want 1", leaders)
		}
	})

	t.Run("request ids in logs", func(t *testing.T) {
		b, err := os.ReadFile(n2.logPath)
		if err != nil {
			t.Fatal(err)
		}
		ids := map[string]bool{}
		encryptLines := 0
		sc := bufio.NewScanner(bytes.NewReader(b))
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			var rec map[string]any
			if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
				t.Fatalf("log line is not JSON: %q", sc.Text())
			}
			if rec["msg"] != "request" {
				continue
			}
			id, _ := rec["request_id"].(string)
			if id == "" || ids[id] {
				t.Fatalf("request line without a unique request_id: %s", sc.Text())
			}
			ids[id] = true
			if rec["method"] == "/cabinet.v1.KeyService/Encrypt" {
				encryptLines++
				if rec["code"] != "OK" || !strings.HasPrefix(fmt.Sprint(rec["principal"]), "admin:") {
					t.Errorf("encrypt line: %s", sc.Text())
				}
			}
		}
		if encryptLines < encrypts {
			t.Fatalf("%d Encrypt request lines in %s, want >= %d", encryptLines, n2.logPath, encrypts)
		}
	})

	t.Run("health follows the HSM", func(t *testing.T) {
		c.waitHealth(n1, healthpb.HealthCheckResponse_SERVING, 10*time.Second)
		away := n1.tokenDir + ".away"
		if err := os.Rename(n1.tokenDir, away); err != nil {
			t.Fatal(err)
		}
		restored := false
		defer func() {
			if !restored {
				_ = os.Rename(away, n1.tokenDir)
			}
		}()
		c.waitHealth(n1, healthpb.HealthCheckResponse_NOT_SERVING, 30*time.Second)
		if out, err := exec.Command(c.bin, "healthcheck", "--data-dir", n1.dataDir).CombinedOutput(); err == nil || !strings.Contains(string(out), "NOT_SERVING") {
			t.Errorf("cabinet healthcheck with the HSM away: %v\n%s", err, out)
		}
		if st, err := c.healthStatus(n2, ""); err != nil || st != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("%s (HSM intact) reports %v, %v", n2.id, st, err)
		}
		if err := os.Rename(away, n1.tokenDir); err != nil {
			t.Fatal(err)
		}
		restored = true
		c.waitHealth(n1, healthpb.HealthCheckResponse_SERVING, 60*time.Second)
		if out, err := exec.Command(c.bin, "healthcheck", "--data-dir", n1.dataDir).CombinedOutput(); err != nil {
			t.Errorf("cabinet healthcheck after recovery: %v\n%s", err, out)
		}
		fams, err := scrape(metrics[n1])
		if err != nil {
			t.Fatal(err)
		}
		if v, _ := metricValue(fams, "cabinet_hsm_errors_total", map[string]string{"op": "health"}); v < 1 {
			t.Errorf("cabinet_hsm_errors_total{op=health} = %v after the token was away", v)
		}
		// The node serves crypto again.
		ct := strings.TrimSpace(c.mustCLI([]byte("back"), "key", "encrypt", "--key", k.KeyID, "--addr", n1.apiAddr))
		if pt := c.mustCLI([]byte(ct), "key", "decrypt", "--addr", n1.apiAddr); pt != "back" {
			t.Fatalf("decrypt after recovery: %q", pt)
		}
	})
}

// installGrpcurl installs grpcurl at grpcurlVersion into a temporary GOBIN.
func installGrpcurl(t *testing.T) string {
	t.Helper()
	gobin := t.TempDir()
	cmd := exec.Command("go", "install", "github.com/fullstorydev/grpcurl/cmd/grpcurl@"+grpcurlVersion)
	cmd.Env = append(os.Environ(), "GOBIN="+gobin, "GOFLAGS=-mod=mod", "GOWORK=off")
	cmd.Dir = gobin // outside the module: `go install pkg@version` ignores it anyway
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go install grpcurl@%s (needs the Go module proxy): %v\n%s", grpcurlVersion, err, out)
	}
	return filepath.Join(gobin, "grpcurl")
}

// TestGrpcurl: grpcurl, pinned and installed with `go install`, lists the
// services through reflection over mTLS, checks health and round-trips
// Encrypt and Decrypt.
func TestGrpcurl(t *testing.T) {
	grpcurl := installGrpcurl(t)
	c := newTestCluster(t, 1)
	n1 := c.nodes[0]
	c.initNode(n1)
	c.start(n1)
	c.waitHealthy(n1, 60*time.Second)
	var k createdKey
	if err := json.Unmarshal([]byte(c.mustCLI(nil, "key", "create", "-o", "json", "--addr", n1.apiAddr)), &k); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) string {
		t.Helper()
		full := append([]string{
			"-cacert", filepath.Join(c.adminDir, "ca.pem"),
			"-cert", filepath.Join(c.adminDir, "admin.pem"),
			"-key", filepath.Join(c.adminDir, "admin-key.pem"),
		}, args...)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, grpcurl, full...).CombinedOutput()
		if err != nil {
			t.Fatalf("grpcurl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	services := run(n1.apiAddr, "list")
	for _, want := range []string{"cabinet.v1.KeyService", "cabinet.v1.OperatorService", "grpc.health.v1.Health"} {
		if !strings.Contains(services, want) {
			t.Errorf("grpcurl list lacks %s:\n%s", want, services)
		}
	}
	if out := run(n1.apiAddr, "describe", "cabinet.v1.KeyService.Encrypt"); !strings.Contains(out, "EncryptRequest") {
		t.Errorf("describe Encrypt:\n%s", out)
	}
	if out := run("-d", `{"service":"cabinet.v1.KeyService"}`, n1.apiAddr, "grpc.health.v1.Health/Check"); !strings.Contains(out, "SERVING") {
		t.Errorf("health check:\n%s", out)
	}
	plaintext := []byte("called from grpcurl")
	req, _ := json.Marshal(map[string]any{"keyId": k.KeyID, "plaintext": base64.StdEncoding.EncodeToString(plaintext), "encryptionContext": map[string]string{"app": "grpcurl"}})
	var enc struct {
		Ciphertext string `json:"ciphertext"`
		KeyID      string `json:"keyId"`
	}
	if err := json.Unmarshal([]byte(run("-d", string(req), n1.apiAddr, "cabinet.v1.KeyService/Encrypt")), &enc); err != nil {
		t.Fatal(err)
	}
	if enc.KeyID != k.KeyID || enc.Ciphertext == "" {
		t.Fatalf("Encrypt answered %+v", enc)
	}
	req, _ = json.Marshal(map[string]any{"ciphertext": enc.Ciphertext, "encryptionContext": map[string]string{"app": "grpcurl"}})
	var dec struct {
		Plaintext string `json:"plaintext"`
	}
	if err := json.Unmarshal([]byte(run("-d", string(req), n1.apiAddr, "cabinet.v1.KeyService/Decrypt")), &dec); err != nil {
		t.Fatal(err)
	}
	if got, _ := base64.StdEncoding.DecodeString(dec.Plaintext); !bytes.Equal(got, plaintext) {
		t.Fatalf("Decrypt returned %q", got)
	}
}
