package main

import "github.com/spf13/cobra"

// envelopeCmds are `cabinet encrypt-file` / `decrypt-file` (being written: issue 8).
func envelopeCmds() []*cobra.Command { return nil }
