package main

import "github.com/spf13/cobra"

// membershipCmds are remove, transfer-leadership, rejoin, recover-quorum
// (placeholder replaced by the membership work, issue 4).
func membershipCmds(f *clientFlags) []*cobra.Command { return nil }
