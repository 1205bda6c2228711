package main

import "github.com/spf13/cobra"

// Placeholders replaced by the snapshot/DR work (issue 4).
func snapshotCmd(f *clientFlags) *cobra.Command {
	return &cobra.Command{Use: "snapshot", Short: "Save, inspect and restore snapshots", Hidden: true}
}

func recoveryCmd(f *clientFlags) *cobra.Command {
	return &cobra.Command{Use: "recovery", Short: "Disaster-recovery keys and bundles", Hidden: true}
}
