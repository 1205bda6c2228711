package main

import (
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
)

// CABINET_CPUPROFILE=FILE makes `cabinet server` write a CPU profile of its
// whole life to FILE, flushed when the server receives SIGTERM or SIGINT
// (what `cabinet bench --server-cpuprofile` and `make cluster-down` send).
// A benchmarking aid: it costs nothing when the variable is unset.
func init() {
	path := os.Getenv("CABINET_CPUPROFILE")
	if path == "" || len(os.Args) < 2 || os.Args[1] != "server" {
		return
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		fmt.Fprintf(os.Stderr, "CABINET_CPUPROFILE: %v\n", err)
		return
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintf(os.Stderr, "CABINET_CPUPROFILE: %v\n", err)
		f.Close()
		return
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, os.Interrupt)
	go func() {
		<-sigs
		pprof.StopCPUProfile()
		f.Close()
	}()
}
