package transport

import (
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// principalLimiter is a token bucket per principal (certificate name). A
// zero rate disables it. Buckets idle for long are dropped so the map stays
// bounded by the number of active principals.
type principalLimiter struct {
	rate  float64 // tokens per second
	burst float64
	clock func() time.Time

	mu      sync.Mutex
	buckets map[string]*bucket
	sweep   time.Time
}

type bucket struct {
	tokens float64
	last   time.Time
}

func newPrincipalLimiter(rate float64, burst int, clock func() time.Time) *principalLimiter {
	if burst <= 0 {
		burst = int(rate)
		if burst < 1 {
			burst = 1
		}
	}
	return &principalLimiter{rate: rate, burst: float64(burst), clock: clock, buckets: map[string]*bucket{}}
}

func (l *principalLimiter) allow(principal string) error {
	if l == nil || l.rate <= 0 {
		return nil
	}
	now := l.clock()
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.sweep) > time.Minute {
		for p, b := range l.buckets {
			if now.Sub(b.last) > time.Minute {
				delete(l.buckets, p)
			}
		}
		l.sweep = now
	}
	b, ok := l.buckets[principal]
	if !ok {
		b = &bucket{tokens: l.burst, last: now}
		l.buckets[principal] = b
	}
	b.tokens += now.Sub(b.last).Seconds() * l.rate
	if b.tokens > l.burst {
		b.tokens = l.burst
	}
	b.last = now
	if b.tokens < 1 {
		return status.Errorf(codes.ResourceExhausted, "principal %q exceeded its rate limit of %.0f requests/s; slow down and retry", principal, l.rate)
	}
	b.tokens--
	return nil
}
