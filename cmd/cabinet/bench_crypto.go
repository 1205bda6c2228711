package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"fmt"
	"runtime"
	"sort"
	"time"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// cryptoProbe times, in this process and on one goroutine, the Go crypto a
// server does for one sign or verify (hash of the raw message + the
// signature), so the report can set "cost over the ceiling" beside "cost of
// the signature itself" measured in the same run on the same machine.
type cryptoProbe struct {
	name    string
	fn      func() error
	samples []float64 // CPU ns per op (wall ns where thread CPU time is unavailable), one per round
	wall    []float64 // wall ns per op
	cpuTime bool
}

const (
	cryptoRounds = 3
	cryptoRound  = 150 * time.Millisecond
)

func newCryptoProbe(op string, spec cabinetpb.KeySpec, payload int) (*cryptoProbe, error) {
	msg := benchRandom(payload)
	switch spec {
	case cabinetpb.KeySpec_EC_P256, cabinetpb.KeySpec_EC_P384:
		curve, newHash, hname, cname := elliptic.P256(), sha256.New, "SHA-256", "P-256"
		if spec == cabinetpb.KeySpec_EC_P384 {
			curve, newHash, hname, cname = elliptic.P384(), sha512.New384, "SHA-384", "P-384"
		}
		priv, err := ecdsa.GenerateKey(curve, rand.Reader)
		if err != nil {
			return nil, err
		}
		digest := func() []byte { h := newHash(); h.Write(msg); return h.Sum(nil) }
		if op == "sign" {
			return &cryptoProbe{
				name: fmt.Sprintf("ecdsa.SignASN1 %s + %s(%d B)", cname, hname, payload),
				fn:   func() error { _, err := ecdsa.SignASN1(rand.Reader, priv, digest()); return err },
			}, nil
		}
		sig, err := ecdsa.SignASN1(rand.Reader, priv, digest())
		if err != nil {
			return nil, err
		}
		return &cryptoProbe{
			name: fmt.Sprintf("ecdsa.VerifyASN1 %s + %s(%d B)", cname, hname, payload),
			fn: func() error {
				if !ecdsa.VerifyASN1(&priv.PublicKey, digest(), sig) {
					return fmt.Errorf("verify failed")
				}
				return nil
			},
		}, nil
	case cabinetpb.KeySpec_ED25519:
		pub, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, err
		}
		if op == "sign" {
			return &cryptoProbe{
				name: fmt.Sprintf("ed25519.Sign (%d B)", payload),
				fn:   func() error { _ = ed25519.Sign(priv, msg); return nil },
			}, nil
		}
		sig := ed25519.Sign(priv, msg)
		return &cryptoProbe{
			name: fmt.Sprintf("ed25519.Verify (%d B)", payload),
			fn: func() error {
				if !ed25519.Verify(pub, msg, sig) {
					return fmt.Errorf("verify failed")
				}
				return nil
			},
		}, nil
	}
	return nil, fmt.Errorf("no in-process probe for %s", spec)
}

// measure adds cryptoRounds samples (bounded in time and count). It counts
// the thread's CPU time, not wall time: on a shared machine the thread may
// wait for a CPU, which is not the signature's cost.
func (c *cryptoProbe) measure(ctx context.Context) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for r := 0; r < cryptoRounds && ctx.Err() == nil; r++ {
		start := time.Now()
		cpu0, ok0 := threadCPUTime()
		n := 0
		for n < 10_000_000 && time.Since(start) < cryptoRound {
			for j := 0; j < 8; j++ {
				if c.fn() != nil {
					return
				}
			}
			n += 8
		}
		wall := float64(time.Since(start).Nanoseconds()) / float64(n)
		cpu1, ok1 := threadCPUTime()
		c.wall = append(c.wall, wall)
		if ok0 && ok1 {
			c.cpuTime = true
			c.samples = append(c.samples, float64((cpu1-cpu0).Nanoseconds())/float64(n))
		} else {
			c.samples = append(c.samples, wall)
		}
	}
}

func benchMedian(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// result compares the operation's cost over its ceiling with the probe.
func (c *cryptoProbe) result(op, ceil benchStats) *benchCrypto {
	b := &benchCrypto{Operation: c.name, USPerOp: benchMedian(c.samples) / 1e3, WallUSPerOp: benchMedian(c.wall) / 1e3, CPUTime: c.cpuTime}
	for _, s := range c.samples {
		b.SamplesUS = append(b.SamplesUS, s/1e3)
	}
	if op.OpsPerSec > 0 && ceil.OpsPerSec > 0 {
		w := 1e6/op.OpsPerSec - 1e6/ceil.OpsPerSec
		b.ExtraWallUSPerOp = &w
	}
	if op.CPUUSPerOp != nil && ceil.CPUUSPerOp != nil {
		x := *op.CPUUSPerOp - *ceil.CPUUSPerOp
		b.ExtraCPUUSPerOp = &x
		if b.USPerOp > 0 {
			r := x / b.USPerOp
			b.ExtraOverCrypto = &r
		}
	}
	return b
}
