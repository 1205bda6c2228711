//go:build !linux

package main

import (
	"syscall"
	"time"
)

func setPdeathsig(*syscall.SysProcAttr) {}

func threadCPUTime() (time.Duration, bool) { return 0, false }
