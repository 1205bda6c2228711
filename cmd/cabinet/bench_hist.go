package main

import (
	"math/bits"
	"time"
)

// latencyHist is a fixed-size log-linear histogram of durations (like
// HdrHistogram with 64 sub-buckets per power of two: about 1.6 % relative
// precision). It never allocates after creation, so every caller keeps its
// own and they are merged once the callers have stopped.
type latencyHist struct {
	counts [histBuckets]uint64
	n      uint64
	sum    time.Duration
	max    time.Duration
}

const (
	histSubBits = 6
	histSub     = 1 << histSubBits // 64
	// Values up to 2^46 ns (about 19 hours) have their own bucket; larger
	// ones land in the last.
	histBuckets = (46-histSubBits+1)*histSub + histSub
)

func histIndex(v uint64) int {
	if v < histSub {
		return int(v)
	}
	e := bits.Len64(v) - histSubBits - 1 // v>>e is in [64, 128)
	i := (e+1)*histSub + int(v>>uint(e)) - histSub
	if i >= histBuckets {
		return histBuckets - 1
	}
	return i
}

// histValue is the upper edge of bucket i (so quantiles never under-report).
func histValue(i int) uint64 {
	if i < histSub {
		return uint64(i)
	}
	e := i/histSub - 1
	sub := uint64(i%histSub + histSub)
	return (sub+1)<<uint(e) - 1
}

func (h *latencyHist) record(d time.Duration) {
	if d < 0 {
		d = 0
	}
	h.counts[histIndex(uint64(d))]++
	h.n++
	h.sum += d
	if d > h.max {
		h.max = d
	}
}

func (h *latencyHist) merge(o *latencyHist) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.sum += o.sum
	if o.max > h.max {
		h.max = o.max
	}
}

// quantile returns the latency below which a fraction q of the samples lie.
func (h *latencyHist) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(q*float64(h.n) + 0.5)
	if rank < 1 {
		rank = 1
	}
	if rank > h.n {
		rank = h.n
	}
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			v := time.Duration(histValue(i))
			if v > h.max {
				v = h.max
			}
			return v
		}
	}
	return h.max
}

func (h *latencyHist) mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return h.sum / time.Duration(h.n)
}
