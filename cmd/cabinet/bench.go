package main

import "github.com/spf13/cobra"

// newBenchCmd is `cabinet bench` (being written: see issue 7).
func newBenchCmd() *cobra.Command {
	return &cobra.Command{Use: "bench", Short: "Benchmark a cluster against in-run ceilings", Hidden: true}
}
