package main

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"sort"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"gopkg.in/yaml.v3"
)

// Server configuration: every `cabinet server` flag may also come from a
// YAML file (--config; keys are the flag names) or from an environment
// variable CABINET_<FLAG NAME IN UPPER SNAKE CASE>. Precedence, highest
// first: command line, environment, file, built-in default.
//
// YAML was chosen over HCL because the rest of the ecosystem Cabinet is
// deployed with (Kubernetes, compose, Prometheus, Ansible) speaks it, and a
// flat map of flag names needs nothing HCL adds.

// configOnlyFlags are flags that select how configuration is read; they are
// not themselves options of the file.
var configOnlyFlags = map[string]bool{"config": true, "validate-config": true, "help": true}

// configEnvName is the environment variable that sets a server option.
func configEnvName(flag string) string {
	return "CABINET_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// configSource says where an option's effective value came from.
type configSource string

const (
	sourceDefault configSource = "default"
	sourceFile    configSource = "file"
	sourceEnv     configSource = "env"
	sourceFlag    configSource = "flag"
)

// loadServerConfig applies the config file at path (if any) and then the
// environment to every option of fs not given on the command line, and
// returns where each option's value came from.
func loadServerConfig(fs *pflag.FlagSet, path string, lookupEnv func(string) (string, bool)) (map[string]configSource, error) {
	sources := map[string]configSource{}
	fromCLI := map[string]bool{}
	fs.VisitAll(func(fl *pflag.Flag) {
		if configOnlyFlags[fl.Name] {
			return
		}
		sources[fl.Name] = sourceDefault
		if fl.Changed {
			fromCLI[fl.Name] = true
			sources[fl.Name] = sourceFlag
		}
	})
	if path != "" {
		values, err := readConfigFile(path)
		if err != nil {
			return nil, err
		}
		names := make([]string, 0, len(values))
		for k := range values {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, name := range names {
			fl := fs.Lookup(name)
			if fl == nil || configOnlyFlags[name] {
				return nil, fmt.Errorf("%s: unknown option %q (docs/CONFIG.md lists every option)", path, name)
			}
			if fromCLI[name] {
				continue
			}
			if err := fl.Value.Set(values[name]); err != nil {
				return nil, fmt.Errorf("%s: option %q: %w", path, name, err)
			}
			sources[name] = sourceFile
		}
	}
	var err error
	fs.VisitAll(func(fl *pflag.Flag) {
		if err != nil || configOnlyFlags[fl.Name] || fromCLI[fl.Name] {
			return
		}
		env := configEnvName(fl.Name)
		v, ok := lookupEnv(env)
		if !ok || v == "" {
			return
		}
		if serr := fl.Value.Set(v); serr != nil {
			err = fmt.Errorf("%s: %w", env, serr)
			return
		}
		sources[fl.Name] = sourceEnv
	})
	return sources, err
}

// readConfigFile reads a flat YAML map of option name to scalar value.
func readConfigFile(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config file: %w", err)
	}
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		if err.Error() == "EOF" {
			return map[string]string{}, nil
		}
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(doc.Content) == 0 {
		return map[string]string{}, nil
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("%s: the file must be a map of option names to values", path)
	}
	out := map[string]string{}
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		if _, dup := out[k.Value]; dup {
			return nil, fmt.Errorf("%s:%d: option %q given twice", path, k.Line, k.Value)
		}
		if v.Kind != yaml.ScalarNode {
			return nil, fmt.Errorf("%s:%d: option %q must be a single value", path, v.Line, k.Value)
		}
		if v.Tag == "!!null" {
			continue
		}
		out[k.Value] = v.Value
	}
	return out, nil
}

// validateServerFlags checks what runServer would otherwise find out late.
func validateServerFlags(f *serverFlags) error {
	var problems []string
	add := func(format string, a ...any) { problems = append(problems, fmt.Sprintf(format, a...)) }
	if f.dataDir == "" {
		add("data-dir is required (flag --data-dir, env CABINET_DATA_DIR or data-dir in the config file)")
	}
	if _, err := newLogger(f.logLevel, f.logFormat); err != nil {
		add("%v", err)
	}
	if _, err := parseMemoryLimit(f.memoryLimit, os.ReadFile); err != nil {
		add("%v", err)
	}
	for name, d := range map[string]int64{
		"max-staleness": int64(f.maxStaleness), "raft-heartbeat-timeout": int64(f.heartbeat),
		"raft-election-timeout": int64(f.election), "audit-sync-interval": int64(f.auditSync),
		"min-rotation-period": int64(f.minRotation), "min-pending-window": int64(f.minPending),
	} {
		if d <= 0 {
			add("%s must be positive", name)
		}
	}
	if f.cacheSize <= 0 {
		add("cache-size must be positive")
	}
	if f.rateLimit < 0 || f.rateBurst < 0 || f.maxConns < 0 {
		add("rate-limit, rate-burst and max-connections must not be negative")
	}
	for name, addr := range map[string]string{"raft-listen": f.raftListen, "api-listen": f.apiListen, "metrics-addr": f.metricsAddr} {
		if addr == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			add("%s %q: %v", name, addr, err)
		}
	}
	if len(problems) > 0 {
		sort.Strings(problems)
		return fmt.Errorf("invalid configuration:\n  %s", strings.Join(problems, "\n  "))
	}
	return nil
}

// effectiveConfig renders the options' effective values as a config file,
// each annotated with where it came from.
func effectiveConfig(fs *pflag.FlagSet, sources map[string]configSource) string {
	var b strings.Builder
	fs.VisitAll(func(fl *pflag.Flag) {
		if configOnlyFlags[fl.Name] {
			return
		}
		fmt.Fprintf(&b, "%s: %s # %s\n", fl.Name, yamlScalar(fl.Value.String()), sources[fl.Name])
	})
	return b.String()
}

func yamlScalar(s string) string {
	out, err := yaml.Marshal(s)
	if err != nil {
		return fmt.Sprintf("%q", s)
	}
	return strings.TrimSpace(string(out))
}

// runServerCommand resolves the configuration (file, environment, flags),
// validates it, and either reports it (--validate-config) or runs the node.
func runServerCommand(cmd *cobra.Command, f *serverFlags) error {
	fs := cmd.Flags()
	if !fs.Changed("config") {
		if v, ok := os.LookupEnv("CABINET_CONFIG"); ok && v != "" {
			f.configPath = v
		}
	}
	sources, err := loadServerConfig(fs, f.configPath, os.LookupEnv)
	if err != nil {
		return err
	}
	if f.dev { // no data dir, HSM or certificates to configure
		return runDevServer(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), f)
	}
	if err := validateServerFlags(f); err != nil {
		return err
	}
	if f.validateConfig {
		fmt.Fprintf(cmd.OutOrStdout(), "# configuration is valid\n%s", effectiveConfig(fs, sources))
		return nil
	}
	return runServer(cmd.Context(), f)
}
