package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/pflag"
	"gopkg.in/yaml.v3"
)

// Docker cannot run where these tests run, so the packaging files are
// checked statically: they must name only options, flags and files that
// exist, and the systemd unit must keep its hardening.

func readRepoFile(t *testing.T, rel string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", rel))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// checkServerArgs parses args (after "cabinet server") with the real flag set.
func checkServerArgs(t *testing.T, where string, args []string) {
	t.Helper()
	if len(args) == 0 || args[0] != "server" {
		t.Errorf("%s: expected `cabinet server ...`, got %v", where, args)
		return
	}
	if err := newServerCmd().ParseFlags(args[1:]); err != nil {
		t.Errorf("%s: %v", where, err)
	}
}

// checkEnvNames: every CABINET_<X> that names a server option must name a real one.
func checkEnvNames(t *testing.T, where string, names []string, allowed map[string]bool) {
	t.Helper()
	options := map[string]bool{}
	newServerCmd().Flags().VisitAll(func(fl *pflag.Flag) { options[configEnvName(fl.Name)] = true })
	for _, n := range names {
		if strings.HasPrefix(n, "CABINET_") && !options[n] && !allowed[n] {
			t.Errorf("%s: %s is neither a server option nor a documented variable", where, n)
		}
	}
}

// entrypointVars are read by deploy/docker/entrypoint.sh, not by the server.
var entrypointVars = map[string]bool{
	"CABINET_ROLE": true, "CABINET_NODE_ID": true, "CABINET_API_ADDR": true, "CABINET_RAFT_ADDR": true,
	"CABINET_ADMIN_DIR": true, "CABINET_JOIN_PEER": true, "CABINET_HSM_LIB": true, "CABINET_HSM_TOKEN_LABEL": true,
	"CABINET_CONFIG": true, "CABINET_HSM_PIN": true,
}

func TestSystemdUnit(t *testing.T) {
	unit := readRepoFile(t, "deploy/systemd/cabinet.service")
	for _, want := range []string{
		"\nUser=cabinet\n", "\nNoNewPrivileges=yes\n", "\nProtectSystem=strict\n", "\nLimitMEMLOCK=",
		"\nReadWritePaths=/var/lib/cabinet\n", "\nPrivateTmp=yes\n", "\nCapabilityBoundingSet=\n", "\nLimitCORE=0\n",
	} {
		if !strings.Contains(unit, want) {
			t.Errorf("cabinet.service lacks %q", strings.TrimSpace(want))
		}
	}
	for _, m := range regexp.MustCompile(`(?m)^ExecStart(?:Pre)?=/usr/local/bin/cabinet (.*)$`).FindAllStringSubmatch(unit, -1) {
		checkServerArgs(t, "cabinet.service", strings.Fields(m[1]))
	}
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Log("systemd-analyze not installed: unit syntax not verified")
		return
	}
	// verify insists the binary exists: point it at the test binary.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "cabinet.service")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(unit, "/usr/local/bin/cabinet", self)), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("systemd-analyze", "verify", path).CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

func TestComposeFile(t *testing.T) {
	var compose struct {
		Services map[string]struct {
			Image       string            `yaml:"image"`
			Environment map[string]string `yaml:"environment"`
			Networks    map[string]struct {
				IP string `yaml:"ipv4_address"`
			} `yaml:"networks"`
			Volumes []string `yaml:"volumes"`
		} `yaml:"services"`
	}
	if err := yaml.Unmarshal([]byte(readRepoFile(t, "compose.yaml")), &compose); err != nil {
		t.Fatal(err)
	}
	if len(compose.Services) != 3 {
		t.Fatalf("%d services, want 3", len(compose.Services))
	}
	apiAddrs := map[string]bool{}
	roles := map[string]int{}
	for name, svc := range compose.Services {
		env := svc.Environment
		var names []string
		for k := range env {
			names = append(names, k)
		}
		checkEnvNames(t, "compose.yaml "+name, names, entrypointVars)
		ip := svc.Networks["cabinet"].IP
		if env["CABINET_API_ADDR"] != ip+":7400" || env["CABINET_RAFT_ADDR"] != ip+":7401" || env["CABINET_NODE_ID"] != name {
			t.Errorf("%s: addresses %q %q do not match its ip %s or node id", name, env["CABINET_API_ADDR"], env["CABINET_RAFT_ADDR"], ip)
		}
		apiAddrs[env["CABINET_API_ADDR"]] = true
		roles[env["CABINET_ROLE"]]++
		if !strings.Contains(strings.Join(svc.Volumes, " "), "admin:/var/lib/cabinet/admin") {
			t.Errorf("%s does not mount the admin volume", name)
		}
	}
	if roles["init"] != 1 || roles["join"] != 2 {
		t.Errorf("roles %v, want one init and two join", roles)
	}
	for name, svc := range compose.Services {
		if p := svc.Environment["CABINET_JOIN_PEER"]; p != "" && !apiAddrs[p] {
			t.Errorf("%s joins via %s, which no node serves", name, p)
		}
	}
}

func TestDockerfile(t *testing.T) {
	df := readRepoFile(t, "Dockerfile")
	if n := len(regexp.MustCompile(`(?m)^FROM `).FindAllString(df, -1)); n < 2 {
		t.Errorf("%d stages, want a multi-stage build", n)
	}
	if !strings.Contains(df, "softhsm2") {
		t.Error("the runtime stage does not install softhsm2")
	}
	for _, m := range regexp.MustCompile(`(?m)^COPY (?:--chown=\S+ )?(\S+) \S+$`).FindAllStringSubmatch(df, -1) {
		if m[1] == "." || strings.HasPrefix(m[1], "--from") {
			continue
		}
		for _, src := range strings.Fields(m[1]) {
			if _, err := os.Stat(filepath.Join("..", "..", src)); err != nil {
				t.Errorf("COPY %s: %v", src, err)
			}
		}
	}
	var envNames []string
	for _, m := range regexp.MustCompile(`(CABINET_[A-Z_]+)=`).FindAllStringSubmatch(df, -1) {
		envNames = append(envNames, m[1])
	}
	checkEnvNames(t, "Dockerfile", envNames, entrypointVars)
	cmd := regexp.MustCompile(`(?m)^CMD \[(.*)\]$`).FindStringSubmatch(df)
	if cmd == nil {
		t.Fatal("no CMD")
	}
	var args []string
	for _, a := range strings.Split(cmd[1], ",") {
		args = append(args, strings.Trim(strings.TrimSpace(a), `"`))
	}
	checkServerArgs(t, "Dockerfile CMD", args)
	if out, err := exec.Command("sh", "-n", filepath.Join("..", "..", "deploy", "docker", "entrypoint.sh")).CombinedOutput(); err != nil {
		t.Errorf("entrypoint.sh: %v\n%s", err, out)
	}
}
