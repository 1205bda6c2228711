//go:build unix

package main

import (
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
)

// CABINET_CPUPROFILE=FILE makes `cabinet server` profile its CPU from start
// until it receives SIGUSR1 (or SIGTERM/SIGINT); it then writes FILE.tmp and
// renames it to FILE, so FILE appears only complete. Send SIGUSR1 and wait
// for FILE before stopping the server: on SIGTERM the server may exit before
// the profile is flushed. `cabinet bench --local --server-cpuprofile DIR`
// does exactly that. A benchmarking aid; nothing happens when it is unset.
func init() {
	path := os.Getenv("CABINET_CPUPROFILE")
	if path == "" || len(os.Args) < 2 || os.Args[1] != "server" {
		return
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
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
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGTERM, os.Interrupt)
	go func() {
		sig := <-sigs
		signal.Reset(syscall.SIGUSR1)
		pprof.StopCPUProfile()
		if err := f.Close(); err == nil {
			err = os.Rename(tmp, path)
		}
		if sig == syscall.SIGUSR1 {
			signal.Ignore(syscall.SIGUSR1) // a second SIGUSR1 must not kill the server
		}
		signal.Stop(sigs)
	}()
}
