package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// `cabinet bench --local`: a throwaway three-node cluster on SoftHSM tokens,
// built the way scripts/cluster.sh builds one (operator init, three
// servers, join-token create + operator join), with this same binary.
// Everything lives in one temp dir; every process is stopped afterwards,
// also on Ctrl-C, and dies with bench if bench is killed (PR_SET_PDEATHSIG).

const (
	localSoftHSMLib  = "/usr/lib/softhsm/libsofthsm2.so"
	localNodes       = 3
	localCmdTimeout  = 3 * time.Minute // init/join: RSA-3072 key generation in SoftHSM takes ~1 s
	localHealthyWait = 90 * time.Second
	localStopWait    = 15 * time.Second
)

type localNode struct {
	id       string
	dir      string
	dataDir  string
	conf     string
	pinFile  string
	label    string
	apiAddr  string
	raftAddr string
	logPath  string
	cmd      *exec.Cmd
	done     chan struct{}
}

type localCluster struct {
	exe      string
	dir      string
	adminDir string
	keep     bool
	// profileDir: each server profiles its CPU into profileDir/<node>.pprof
	// (CABINET_CPUPROFILE) until stop sends it SIGUSR1.
	profileDir string
	nodes      []*localNode
	spawn      *spawner
	stopOnce   sync.Once
}

func (lc *localCluster) apiAddrs() []string {
	var out []string
	for _, n := range lc.nodes {
		out = append(out, n.apiAddr)
	}
	return out
}

func (lc *localCluster) pids() []int {
	var out []int
	for _, n := range lc.nodes {
		if n.cmd != nil && n.cmd.Process != nil {
			out = append(out, n.cmd.Process.Pid)
		}
	}
	return out
}

func (lc *localCluster) adminFiles() (ca, cert, key string) {
	return filepath.Join(lc.adminDir, "ca.pem"), filepath.Join(lc.adminDir, "admin.pem"), filepath.Join(lc.adminDir, "admin-key.pem")
}

// spawner starts child processes from one goroutine locked to its OS thread
// for the cluster's whole life: Linux delivers PR_SET_PDEATHSIG when the
// *thread* that forked the child exits, so the thread must outlive the
// children (it exits only after stop has reaped them).
type spawner struct {
	reqs chan spawnReq
	quit chan struct{}
}

type spawnReq struct {
	cmd  *exec.Cmd
	errc chan error
}

func newSpawner() *spawner {
	s := &spawner{reqs: make(chan spawnReq), quit: make(chan struct{})}
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with this goroutine
		for {
			select {
			case r := <-s.reqs:
				r.errc <- r.cmd.Start()
			case <-s.quit:
				return
			}
		}
	}()
	return s
}

func (s *spawner) start(cmd *exec.Cmd) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true // a terminal's Ctrl-C reaches bench, which stops the nodes in order
	setPdeathsig(cmd.SysProcAttr)
	errc := make(chan error, 1)
	select {
	case s.reqs <- spawnReq{cmd, errc}:
		return <-errc
	case <-s.quit:
		return errors.New("bench is stopping")
	}
}

func (s *spawner) close() { close(s.quit) }

func localFreeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func startLocalCluster(ctx context.Context, f *benchFlags, prog *benchProgress) (*localCluster, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find this binary: %w", err)
	}
	if _, err := os.Stat(localSoftHSMLib); err != nil {
		return nil, fmt.Errorf("SoftHSM2 is required (%s is missing): apt-get install -y softhsm2", localSoftHSMLib)
	}
	util, err := exec.LookPath("softhsm2-util")
	if err != nil {
		return nil, errors.New("softhsm2-util is required: apt-get install -y softhsm2")
	}
	dir, err := os.MkdirTemp("", "cabinet-bench-")
	if err != nil {
		return nil, err
	}
	lc := &localCluster{exe: exe, dir: dir, adminDir: filepath.Join(dir, "admin"), keep: f.localKeep, profileDir: f.serverProfile, spawn: newSpawner()}
	prog.logf("--local: starting a 3-node cluster on SoftHSM in %s", dir)
	if f.serverProfile != "" {
		if err := os.MkdirAll(f.serverProfile, 0o700); err != nil {
			return lc, err
		}
	}
	for i := 1; i <= localNodes; i++ {
		n := &localNode{id: fmt.Sprintf("node%d", i), dir: filepath.Join(dir, fmt.Sprintf("node%d", i))}
		n.dataDir, n.conf, n.pinFile, n.logPath = filepath.Join(n.dir, "data"), filepath.Join(n.dir, "softhsm2.conf"), filepath.Join(n.dir, "pin"), filepath.Join(n.dir, "server.log")
		n.label = "cabinet-bench-" + n.id
		tokens := filepath.Join(n.dir, "tokens")
		if err := os.MkdirAll(tokens, 0o700); err != nil {
			return lc, err
		}
		if err := os.WriteFile(n.conf, []byte("directories.tokendir = "+tokens+"\nobjectstore.backend = file\nlog.level = ERROR\n"), 0o600); err != nil {
			return lc, err
		}
		pin, so := hex.EncodeToString(benchRandom(16)), hex.EncodeToString(benchRandom(16))
		if err := os.WriteFile(n.pinFile, []byte(pin), 0o600); err != nil {
			return lc, err
		}
		if out, err := lc.run(ctx, []string{"SOFTHSM2_CONF=" + n.conf}, util, "--init-token", "--free", "--label", n.label, "--pin", pin, "--so-pin", so); err != nil {
			return lc, fmt.Errorf("softhsm2-util --init-token for %s: %v\n%s", n.id, err, out)
		}
		if n.apiAddr, err = localFreeAddr(); err != nil {
			return lc, err
		}
		if n.raftAddr, err = localFreeAddr(); err != nil {
			return lc, err
		}
		lc.nodes = append(lc.nodes, n)
	}
	first := lc.nodes[0]
	if out, err := lc.run(ctx, nil, exe, append([]string{"operator", "init", "--data-dir", first.dataDir, "--node-id", first.id,
		"--api-addr", first.apiAddr, "--raft-addr", first.raftAddr, "--admin-out", lc.adminDir}, lc.hsmFlags(first)...)...); err != nil {
		return lc, fmt.Errorf("operator init: %v\n%s", err, out)
	}
	for _, n := range lc.nodes {
		if err := lc.startServer(n, f); err != nil {
			return lc, err
		}
	}
	cf := &clientFlags{}
	cf.caCert, cf.clientCert, cf.clientKey = lc.adminFiles()
	cfg, err := cf.tlsConfig()
	if err != nil {
		return lc, err
	}
	if err := lc.waitHealthy(ctx, first, cfg); err != nil {
		return lc, err
	}
	for _, n := range lc.nodes[1:] {
		token, err := lc.joinToken(ctx, first, cfg)
		if err != nil {
			return lc, err
		}
		if out, err := lc.run(ctx, nil, exe, append([]string{"operator", "join", "--token", token, "--peer", first.apiAddr, "--data-dir", n.dataDir,
			"--node-id", n.id, "--api-addr", n.apiAddr, "--raft-addr", n.raftAddr}, lc.hsmFlags(n)...)...); err != nil {
			return lc, fmt.Errorf("operator join %s: %v\n%s", n.id, err, out)
		}
	}
	for _, n := range lc.nodes {
		if err := lc.waitHealthy(ctx, n, cfg); err != nil {
			return lc, err
		}
	}
	if err := lc.waitVoters(ctx, first, cfg); err != nil {
		return lc, err
	}
	prog.logf("--local: cluster up: %s", strings.Join(lc.apiAddrs(), ", "))
	return lc, nil
}

func (lc *localCluster) hsmFlags(n *localNode) []string {
	return []string{"--hsm-lib", localSoftHSMLib, "--hsm-token-label", n.label, "--hsm-pin-file", n.pinFile, "--softhsm-conf", n.conf}
}

// run runs a short-lived command to completion (bounded).
func (lc *localCluster) run(ctx context.Context, env []string, name string, args ...string) (string, error) {
	c, cancel := context.WithTimeout(ctx, localCmdTimeout)
	defer cancel()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Env = append(cmd.Env, "CABINET_ADDR=", "CABINET_CPUPROFILE=")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := lc.spawn.start(cmd); err != nil {
		return "", err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return out.String(), err
	case <-c.Done():
		_ = cmd.Process.Kill()
		<-done
		return out.String(), fmt.Errorf("%s %s: %w", filepath.Base(name), args[0], c.Err())
	}
}

func (lc *localCluster) startServer(n *localNode, f *benchFlags) error {
	logf, err := os.OpenFile(n.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	args := append([]string{"server", "--data-dir", n.dataDir}, f.localServerArgs...)
	cmd := exec.Command(lc.exe, args...)
	cmd.Env = append(os.Environ(), "CABINET_ADDR=", "CABINET_CPUPROFILE=")
	if f.serverProfile != "" {
		cmd.Env = append(cmd.Env, "CABINET_CPUPROFILE="+filepath.Join(f.serverProfile, n.id+".pprof"))
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := lc.spawn.start(cmd); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", n.id, err)
	}
	n.cmd, n.done = cmd, make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(n.done) }()
	return nil
}

func (n *localNode) exited() bool {
	select {
	case <-n.done:
		return true
	default:
		return false
	}
}

func (n *localNode) logTail() string {
	b, err := os.ReadFile(n.logPath)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	// A crash dump's goroutine stacks bury its cause: show from the cause.
	for i, l := range lines {
		if strings.HasPrefix(l, "panic:") || strings.HasPrefix(l, "fatal error:") {
			lines = lines[max(0, i-5):]
			break
		}
	}
	if len(lines) > 20 {
		lines = lines[:20]
	}
	return strings.Join(lines, "\n")
}

// poll calls cond every 200ms until it returns nil, ctx ends or the
// deadline passes.
func benchPoll(ctx context.Context, timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func (lc *localCluster) waitHealthy(ctx context.Context, n *localNode, cfg *tls.Config) error {
	conn, err := benchDial(n.apiAddr, cfg)
	if err != nil {
		return err
	}
	defer conn.Close()
	oc := cabinetpb.NewOperatorServiceClient(conn)
	err = benchPoll(ctx, localHealthyWait, func() error {
		if n.exited() {
			return errors.New("the process exited")
		}
		c, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		st, err := oc.Status(c, &cabinetpb.StatusRequest{})
		if err != nil {
			return rpcError(err)
		}
		if !st.GetHealthy() {
			return fmt.Errorf("unhealthy: %s", strings.Join(st.GetUnhealthyReasons(), "; "))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("%s did not become healthy: %w\n--- %s (tail) ---\n%s", n.id, err, n.logPath, n.logTail())
	}
	return nil
}

func (lc *localCluster) joinToken(ctx context.Context, via *localNode, cfg *tls.Config) (string, error) {
	conn, err := benchDial(via.apiAddr, cfg)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	c, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := cabinetpb.NewOperatorServiceClient(conn).CreateJoinToken(c, &cabinetpb.CreateJoinTokenRequest{RequestId: "bench-join-" + benchRunID()})
	if err != nil {
		return "", fmt.Errorf("join-token create: %w", rpcError(err))
	}
	return resp.GetToken(), nil
}

// waitVoters waits until every node is a healthy voter in the leader's view.
func (lc *localCluster) waitVoters(ctx context.Context, via *localNode, cfg *tls.Config) error {
	conn, err := benchDial(via.apiAddr, cfg)
	if err != nil {
		return err
	}
	defer conn.Close()
	oc := cabinetpb.NewOperatorServiceClient(conn)
	return benchPoll(ctx, localHealthyWait, func() error {
		c, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		lp, err := oc.ListPeers(c, &cabinetpb.ListPeersRequest{})
		if err != nil {
			return fmt.Errorf("list peers: %w", rpcError(err))
		}
		voters := 0
		for _, p := range lp.GetPeers() {
			if p.GetVoter() && p.GetHealthy() {
				voters++
			}
		}
		if voters < localNodes {
			return fmt.Errorf("%d of %d nodes are healthy voters", voters, localNodes)
		}
		return nil
	})
}

// flushProfiles asks every server to write its CPU profile (SIGUSR1) and
// waits, bounded, until the files are there.
func (lc *localCluster) flushProfiles(prog *benchProgress) {
	var files []string
	for _, n := range lc.nodes {
		if n.cmd == nil || n.exited() {
			continue
		}
		_ = n.cmd.Process.Signal(syscall.SIGUSR1)
		files = append(files, filepath.Join(lc.profileDir, n.id+".pprof"))
	}
	err := benchPoll(context.Background(), 20*time.Second, func() error {
		for _, f := range files {
			if _, err := os.Stat(f); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		prog.logf("--server-cpuprofile: %v", err)
		return
	}
	prog.logf("--server-cpuprofile: wrote %s", strings.Join(files, ", "))
}

// stop stops every server (SIGTERM, then SIGKILL after localStopWait), waits
// for them, and removes the temp dir unless --local-keep. Safe to call twice.
func (lc *localCluster) stop(prog *benchProgress) {
	lc.stopOnce.Do(func() {
		if lc.profileDir != "" {
			lc.flushProfiles(prog)
		}
		var wg sync.WaitGroup
		for _, n := range lc.nodes {
			if n.cmd == nil {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				_ = n.cmd.Process.Signal(syscall.SIGTERM)
				select {
				case <-n.done:
				case <-time.After(localStopWait):
					_ = n.cmd.Process.Kill()
					<-n.done
				}
			}()
		}
		wg.Wait()
		lc.spawn.close()
		if lc.keep {
			prog.logf("--local: cluster stopped; kept %s (logs: node*/server.log)", lc.dir)
			return
		}
		if err := os.RemoveAll(lc.dir); err != nil {
			prog.logf("--local: remove %s: %v", lc.dir, err)
		}
	})
}
