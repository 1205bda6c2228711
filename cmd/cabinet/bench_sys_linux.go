package main

import (
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// setPdeathsig makes the kernel kill the child when the thread that started
// it exits (see spawner).
func setPdeathsig(a *syscall.SysProcAttr) { a.Pdeathsig = syscall.SIGKILL }

// threadCPUTime is the CPU time of the calling OS thread (the caller locks
// its goroutine to the thread), immune to time the thread spent waiting for
// a CPU on a shared machine.
func threadCPUTime() (time.Duration, bool) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		return 0, false
	}
	return time.Duration(ts.Nano()), true
}
