package integration

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cabinet-kms/cabinet/internal/testport"
)

// The harness runs real `cabinet` processes, each with its own data dir and
// SoftHSM token, on 127.0.0.1. Everything lives under t.TempDir().

const softhsmLib = "/usr/lib/softhsm/libsofthsm2.so"

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// cabinetBinary builds the binary once per test process, with the test
// hooks that let the leak scan learn every generated key's material.
func cabinetBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "cabinet-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "cabinet")
		cmd := exec.Command("go", "build", "-tags", "cabinet_testhooks", "-o", binPath, "./cmd/cabinet")
		cmd.Dir = ".."
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

func requireSoftHSM(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(softhsmLib); err != nil {
		t.Fatalf("SoftHSM2 is required (%s missing): apt-get install -y softhsm2", softhsmLib)
	}
	if _, err := exec.LookPath("softhsm2-util"); err != nil {
		t.Fatal("softhsm2-util is required: apt-get install -y softhsm2")
	}
}

// waitFor polls cond until it returns nil or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if last = cond(); last == nil {
			return
		}
		time.Sleep(100 * time.Millisecond) // poll interval, bounded by the deadline
	}
	t.Fatalf("timed out after %v waiting for %s: %v", timeout, what, last)
}

// freePort returns a 127.0.0.1 address for a child process to bind
// (internal/testport: below the ephemeral range, never handed out twice).
func freePort(t *testing.T) string { return testport.Addr(t) }

type node struct {
	n        int
	id       string
	dir      string // everything of this node
	dataDir  string
	tokenDir string
	conf     string
	pinFile  string
	apiAddr  string
	raftAddr string
	cmd      *exec.Cmd
	done     chan struct{}
	logPath  string
}

type testCluster struct {
	t        *testing.T
	bin      string
	root     string
	adminDir string
	witness  string // outside every node dir: material observed via test hooks
	nodes    []*node
	// serverArgs are extra flags for every `cabinet server`.
	serverArgs []string
}

func newTestCluster(t *testing.T, n int) *testCluster {
	t.Helper()
	requireSoftHSM(t)
	c := &testCluster{t: t, bin: cabinetBinary(t), root: t.TempDir()}
	c.adminDir = filepath.Join(c.root, "admin")
	c.witness = filepath.Join(c.root, "witness")
	if err := os.MkdirAll(c.witness, 0o700); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= n; i++ {
		nd := &node{n: i, id: fmt.Sprintf("node%d", i), dir: filepath.Join(c.root, fmt.Sprintf("node%d", i))}
		nd.dataDir = filepath.Join(nd.dir, "data")
		nd.tokenDir = filepath.Join(nd.dir, "tokens")
		nd.conf = filepath.Join(nd.dir, "softhsm2.conf")
		nd.pinFile = filepath.Join(nd.dir, "pin")
		nd.logPath = filepath.Join(nd.dir, "server.log")
		nd.apiAddr, nd.raftAddr = freePort(t), freePort(t)
		if err := os.MkdirAll(nd.tokenDir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(nd.conf, []byte("directories.tokendir = "+nd.tokenDir+"\nobjectstore.backend = file\nlog.level = ERROR\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		pin := fmt.Sprintf("pin-%d-%d", i, time.Now().UnixNano())
		if err := os.WriteFile(nd.pinFile, []byte(pin), 0o600); err != nil {
			t.Fatal(err)
		}
		init := exec.Command("softhsm2-util", "--init-token", "--free", "--label", "cabinet-"+nd.id, "--pin", pin, "--so-pin", "so-"+pin)
		init.Env = append(os.Environ(), "SOFTHSM2_CONF="+nd.conf)
		if out, err := init.CombinedOutput(); err != nil {
			t.Fatalf("init token: %v\n%s", err, out)
		}
		c.nodes = append(c.nodes, nd)
	}
	t.Cleanup(c.stopAll)
	return c
}

func (c *testCluster) hsmFlags(nd *node) []string {
	return []string{"--hsm-lib", softhsmLib, "--hsm-token-label", "cabinet-" + nd.id, "--hsm-pin-file", nd.pinFile, "--softhsm-conf", nd.conf}
}

// cli runs a cabinet command with the admin's credentials against addr.
func (c *testCluster) cli(ctx context.Context, stdin []byte, args ...string) (stdout, stderr string, err error) {
	return c.cliAs(ctx, c.adminDir, "admin", stdin, args...)
}

// cliAs runs a cabinet command with the credentials NAME.pem/NAME-key.pem
// and ca.pem found in dir.
func (c *testCluster) cliAs(ctx context.Context, dir, name string, stdin []byte, args ...string) (stdout, stderr string, err error) {
	cmd := exec.CommandContext(ctx, c.bin, args...)
	cmd.Env = append(os.Environ(),
		"CABINET_CACERT="+filepath.Join(dir, "ca.pem"),
		"CABINET_CLIENT_CERT="+filepath.Join(dir, name+".pem"),
		"CABINET_CLIENT_KEY="+filepath.Join(dir, name+"-key.pem"),
		"CABINET_ADDR=",
	)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	err = cmd.Run()
	return so.String(), se.String(), err
}

// mustCLI runs a command that must succeed.
func (c *testCluster) mustCLI(stdin []byte, args ...string) string {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, errOut, err := c.cli(ctx, stdin, args...)
	if err != nil {
		c.t.Fatalf("cabinet %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, out, errOut)
	}
	return out
}

func (c *testCluster) initNode(nd *node) {
	c.t.Helper()
	args := append([]string{"operator", "init", "--data-dir", nd.dataDir, "--node-id", nd.id,
		"--api-addr", nd.apiAddr, "--raft-addr", nd.raftAddr, "--admin-out", c.adminDir}, c.hsmFlags(nd)...)
	c.mustCLI(nil, args...)
}

func (c *testCluster) joinNode(nd *node, via *node) {
	c.t.Helper()
	token := strings.TrimSpace(c.mustCLI(nil, "operator", "join-token", "create", "--quiet", "--addr", via.apiAddr))
	args := append([]string{"operator", "join", "--token", token, "--peer", via.apiAddr, "--data-dir", nd.dataDir,
		"--node-id", nd.id, "--api-addr", nd.apiAddr, "--raft-addr", nd.raftAddr}, c.hsmFlags(nd)...)
	c.mustCLI(nil, args...)
}

func (c *testCluster) start(nd *node) {
	c.t.Helper()
	logf, err := os.OpenFile(nd.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		c.t.Fatal(err)
	}
	cmd := exec.Command(c.bin, append([]string{"server", "--data-dir", nd.dataDir, "--log-level", "info"}, c.serverArgs...)...)
	cmd.Env = append(os.Environ(), "CABINET_TEST_MATERIAL_LOG="+filepath.Join(c.witness, nd.id+".material"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	nd.cmd, nd.done = cmd, make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(nd.done) }()
}

// kill sends SIGKILL (kill -9) and waits for the process to be gone.
func (c *testCluster) kill(nd *node) {
	c.t.Helper()
	if nd.cmd == nil {
		return
	}
	_ = nd.cmd.Process.Signal(syscall.SIGKILL)
	<-nd.done
	nd.cmd = nil
}

// stop sends SIGTERM and waits (bounded) for a clean exit.
func (c *testCluster) stop(nd *node) {
	if nd.cmd == nil {
		return
	}
	_ = nd.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-nd.done:
	case <-time.After(15 * time.Second):
		_ = nd.cmd.Process.Signal(syscall.SIGKILL)
		<-nd.done
	}
	nd.cmd = nil
}

func (c *testCluster) stopAll() {
	for _, nd := range c.nodes {
		c.stop(nd)
	}
	if c.t.Failed() {
		for _, nd := range c.nodes {
			if b, err := os.ReadFile(nd.logPath); err == nil {
				lines := strings.Split(strings.TrimSpace(string(b)), "\n")
				if len(lines) > 40 {
					lines = lines[len(lines)-40:]
				}
				c.t.Logf("---- %s log (tail) ----\n%s", nd.id, strings.Join(lines, "\n"))
			}
		}
	}
}

type nodeStatus struct {
	NodeID       string   `json:"nodeId"`
	RaftState    string   `json:"raftState"`
	LeaderID     string   `json:"leaderId"`
	AppliedIndex string   `json:"appliedIndex"`
	CommitIndex  string   `json:"commitIndex"`
	Healthy      bool     `json:"healthy"`
	KeyCount     string   `json:"keyCount"`
	KekVerified  bool     `json:"kekVerified"`
	HsmStatus    string   `json:"hsmStatus"`
	Unhealthy    []string `json:"unhealthyReasons"`
}

func (c *testCluster) status(nd *node) (nodeStatus, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, errOut, err := c.cli(ctx, nil, "operator", "status", "-o", "json", "--addr", nd.apiAddr, "--timeout", "3s")
	if err != nil {
		return nodeStatus{}, fmt.Errorf("%v: %s", err, strings.TrimSpace(errOut))
	}
	var st nodeStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return nodeStatus{}, fmt.Errorf("parse status: %v", err)
	}
	return st, nil
}

func (c *testCluster) waitHealthy(nd *node, timeout time.Duration) {
	c.t.Helper()
	waitFor(c.t, timeout, nd.id+" healthy", func() error {
		if nd.cmd != nil {
			select {
			case <-nd.done:
				return errors.New("process exited")
			default:
			}
		}
		st, err := c.status(nd)
		if err != nil {
			return err
		}
		if !st.Healthy {
			return fmt.Errorf("unhealthy: %v", st.Unhealthy)
		}
		return nil
	})
}

// leader returns the node the live nodes agree is leader.
func (c *testCluster) leader(live []*node) (*node, error) {
	for _, nd := range live {
		st, err := c.status(nd)
		if err != nil {
			continue
		}
		if st.RaftState == "leader" {
			return nd, nil
		}
	}
	return nil, errors.New("no live node reports itself leader")
}

// witnessed is one key version's material as the test hooks saw it sealed.
type witnessed struct {
	keyID     string
	version   string
	plaintext []byte
	sealed    []byte
}

// witnesses reads every material the nodes sealed (cabinet_testhooks build).
func (c *testCluster) witnesses(t *testing.T) []witnessed {
	t.Helper()
	entries, err := os.ReadDir(c.witness)
	if err != nil {
		t.Fatal(err)
	}
	var out []witnessed
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(c.witness, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			f := strings.Fields(line)
			if len(f) != 4 {
				continue
			}
			pt, err1 := hex.DecodeString(f[2])
			sealed, err2 := hex.DecodeString(f[3])
			if err1 != nil || err2 != nil {
				t.Fatalf("bad witness line in %s", e.Name())
			}
			out = append(out, witnessed{keyID: f[0], version: f[1], plaintext: pt, sealed: sealed})
		}
	}
	return out
}

// dirsOf lists every node's whole directory (data dir, token dir, logs).
func (c *testCluster) dirsOf() []string {
	var dirs []string
	for _, nd := range c.nodes {
		dirs = append(dirs, nd.dir)
	}
	return dirs
}

func readFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	return string(b), err
}
