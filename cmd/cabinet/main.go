// Command cabinet is Cabinet's single binary: the server, operator commands
// and key commands.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

// Version is set at build time with -ldflags "-X main.Version=...".
var Version = "0.1.0-dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := newRootCmd()
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "cabinet",
		Short:         "Cabinet: a Raft-replicated, HSM-backed key management service",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newServerCmd(), newOperatorCmd(), newKeyCmd(), newBenchCmd())
	root.AddCommand(envelopeCmds()...)
	root.AddCommand(newVersionCmd(), newCompletionCmd(), newHealthcheckCmd(), newDocsCmd())
	return root
}
