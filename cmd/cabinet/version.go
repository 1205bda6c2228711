package main

import (
	"encoding/json"
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// versionInfo describes the running binary: the release version (set with
// -ldflags "-X main.Version=..."), and what the Go toolchain recorded.
type versionInfo struct {
	Version   string `json:"version"`
	Revision  string `json:"revision"`
	BuildTime string `json:"buildTime,omitempty"`
	Modified  bool   `json:"modified,omitempty"`
	GoVersion string `json:"goVersion"`
	Platform  string `json:"platform"`
}

func buildInfo() versionInfo {
	v := versionInfo{Version: Version, Revision: "unknown", GoVersion: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				v.Revision = s.Value
			case "vcs.time":
				v.BuildTime = s.Value
			case "vcs.modified":
				v.Modified = s.Value == "true"
			}
		}
	}
	return v
}

func newVersionCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the version and build information",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			v := buildInfo()
			switch output {
			case "json":
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(v)
			case "short":
				fmt.Fprintln(cmd.OutOrStdout(), v.Version)
				return nil
			case "text":
				mod := ""
				if v.Modified {
					mod = " (modified)"
				}
				fmt.Fprintf(cmd.OutOrStdout(), "cabinet %s\nrevision: %s%s\ngo: %s\nplatform: %s\n", v.Version, v.Revision, mod, v.GoVersion, v.Platform)
				if v.BuildTime != "" {
					fmt.Fprintf(cmd.OutOrStdout(), "commit time: %s\n", v.BuildTime)
				}
				return nil
			}
			return fmt.Errorf("-o must be text, short or json")
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "text", "text, short (version only) or json")
	return cmd
}
