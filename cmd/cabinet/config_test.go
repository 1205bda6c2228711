package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "cabinet.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestServerConfigPrecedence: flag > environment > file > default, for
// every kind of value the options use.
func TestServerConfigPrecedence(t *testing.T) {
	path := writeConfig(t, "data-dir: /from/file\nlog-level: warn\nmax-staleness: 5s\ncache-size: 7\nrate-limit: 2.5\nmetrics-addr: 127.0.0.1:9464\n")
	cmd := newServerCmd()
	if err := cmd.ParseFlags([]string{"--cache-size", "9"}); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"CABINET_LOG_LEVEL": "debug", "CABINET_CACHE_SIZE": "8", "CABINET_RATE_BURST": "3"}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	sources, err := loadServerConfig(cmd.Flags(), path, lookup)
	if err != nil {
		t.Fatal(err)
	}
	get := func(name string) string { return cmd.Flags().Lookup(name).Value.String() }
	for _, c := range []struct {
		name, want string
		src        configSource
	}{
		{"data-dir", "/from/file", sourceFile},
		{"log-level", "debug", sourceEnv},
		{"max-staleness", (5 * time.Second).String(), sourceFile},
		{"cache-size", "9", sourceFlag},
		{"rate-limit", "2.5", sourceFile},
		{"rate-burst", "3", sourceEnv},
		{"log-format", "text", sourceDefault},
		{"metrics-addr", "127.0.0.1:9464", sourceFile},
	} {
		if got := get(c.name); got != c.want || sources[c.name] != c.src {
			t.Errorf("%s = %q from %s, want %q from %s", c.name, got, sources[c.name], c.want, c.src)
		}
	}
}

func TestServerConfigRejects(t *testing.T) {
	for name, body := range map[string]string{
		"unknown key":     "data-dir: /x\nno-such-option: 1\n",
		"config-only key": "config: /other.yaml\n",
		"bad duration":    "max-staleness: soon\n",
		"not a scalar":    "log-level: [info, debug]\n",
		"not a map":       "- data-dir\n",
		"duplicate key":   "data-dir: /a\ndata-dir: /b\n",
		"bad integer":     "cache-size: many\n",
		"malformed yaml":  "data-dir: [\n",
	} {
		t.Run(name, func(t *testing.T) {
			cmd := newServerCmd()
			if _, err := loadServerConfig(cmd.Flags(), writeConfig(t, body), func(string) (string, bool) { return "", false }); err == nil {
				t.Fatalf("accepted %q", body)
			}
		})
	}
	cmd := newServerCmd()
	_, err := loadServerConfig(cmd.Flags(), "", func(k string) (string, bool) { return "often", k == "CABINET_AUDIT_SYNC_INTERVAL" })
	if err == nil || !strings.Contains(err.Error(), "CABINET_AUDIT_SYNC_INTERVAL") {
		t.Fatalf("bad env value: %v", err)
	}
}

// runCLI runs the cabinet command tree in-process.
func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func TestValidateConfigCommand(t *testing.T) {
	t.Setenv("CABINET_CONFIG", "")
	t.Setenv("CABINET_DATA_DIR", "")
	t.Setenv("CABINET_LOG_FORMAT", "json")
	out, err := runCLI(t, "server", "--config", "../../deploy/cabinet.yaml", "--validate-config", "--log-level", "warn")
	if err != nil {
		t.Fatalf("the example config does not validate: %v\n%s", err, out)
	}
	for _, want := range []string{"data-dir: /var/lib/cabinet # file", "log-format: json # env", "log-level: warn # flag", "cache-size: \"10000\" # file"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	// The example mentions every option (set or commented out).
	example, err := os.ReadFile("../../deploy/cabinet.yaml")
	if err != nil {
		t.Fatal(err)
	}
	newServerCmd().Flags().VisitAll(func(fl *pflag.Flag) {
		if !configOnlyFlags[fl.Name] && !strings.Contains(string(example), fl.Name+":") {
			t.Errorf("deploy/cabinet.yaml does not mention %s", fl.Name)
		}
	})

	t.Setenv("CABINET_LOG_FORMAT", "")

	bad := writeConfig(t, "data-dir: /x\nlog-format: xml\nmax-staleness: -1s\nmetrics-addr: nowhere\n")
	out, err = runCLI(t, "server", "--config", bad, "--validate-config")
	if err == nil {
		t.Fatalf("invalid config accepted:\n%s", out)
	}
	for _, want := range []string{"log-format", "max-staleness must be positive", "metrics-addr"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q: %v", want, err)
		}
	}
	if _, err := runCLI(t, "server", "--validate-config"); err == nil || !strings.Contains(err.Error(), "data-dir is required") {
		t.Fatalf("missing data-dir: %v", err)
	}
	t.Setenv("CABINET_CONFIG", bad)
	if _, err := runCLI(t, "server", "--validate-config"); err == nil {
		t.Fatal("CABINET_CONFIG was not read")
	}
}

func TestVersionAndCompletion(t *testing.T) {
	out, err := runCLI(t, "version", "-o", "json")
	if err != nil || !strings.Contains(out, `"version": "`+Version+`"`) || !strings.Contains(out, `"goVersion": "go`) {
		t.Fatalf("version -o json: %v\n%s", err, out)
	}
	for shell, want := range map[string]string{"bash": "complete -o default -F __start_cabinet cabinet", "zsh": "#compdef cabinet", "fish": "complete -c cabinet"} {
		out, err := runCLI(t, "completion", shell)
		if err != nil || !strings.Contains(out, want) {
			t.Errorf("completion %s: %v (no %q in %d bytes)", shell, err, want, len(out))
		}
	}
	if _, err := runCLI(t, "completion", "powershell"); err == nil {
		t.Error("completion accepted an unsupported shell")
	}
}
