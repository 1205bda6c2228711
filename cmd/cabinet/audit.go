package main

import "github.com/spf13/cobra"

// auditCmd is `cabinet operator audit` (being written: issue 5).
func auditCmd(f *clientFlags) *cobra.Command {
	return &cobra.Command{Use: "audit", Short: "Inspect and verify a node's hash-chained audit log", Hidden: true}
}
