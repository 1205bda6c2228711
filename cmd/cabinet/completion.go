package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func newCompletionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "completion bash|zsh|fish",
		Short: "Print a shell completion script",
		Long: `Print a completion script for bash, zsh or fish.

  bash:  source <(cabinet completion bash)
         # or, for every session: cabinet completion bash > /etc/bash_completion.d/cabinet
  zsh:   cabinet completion zsh > "${fpath[1]}/_cabinet"   # then start a new shell
  fish:  cabinet completion fish > ~/.config/fish/completions/cabinet.fish`,
		Args:                  cobra.ExactArgs(1),
		ValidArgs:             []string{"bash", "zsh", "fish"},
		DisableFlagsInUseLine: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			out := cmd.OutOrStdout()
			switch args[0] {
			case "bash":
				return cmd.Root().GenBashCompletionV2(out, true)
			case "zsh":
				return cmd.Root().GenZshCompletion(out)
			case "fish":
				return cmd.Root().GenFishCompletion(out, true)
			}
			return fmt.Errorf("unsupported shell %q: choose bash, zsh or fish", args[0])
		},
	}
}
