package keyops

import (
	"bytes"
	"context"
	"errors"
	"testing"
)

// countingSealer hands out a counter stream as "HSM randomness" and counts calls.
type countingSealer struct {
	*testSealer
	calls, next int
	fail        bool
}

func (c *countingSealer) GenerateRandom(_ context.Context, n int) ([]byte, error) {
	c.calls++
	if c.fail {
		return nil, errors.New("token gone")
	}
	out := make([]byte, n)
	for i := range out {
		out[i] = byte(c.next)
		c.next++
	}
	return out, nil
}

// TestHSMEntropyPool: one HSM call per 4 KiB, every byte handed out once
// and in order, large requests bypass the pool, failures propagate.
func TestHSMEntropyPool(t *testing.T) {
	ctx := context.Background()
	s := &countingSealer{testSealer: newTestSealer()}
	var h hsmEntropy
	var got []byte
	for range 300 { // 300 x 32 = 9600 bytes: 3 refills
		b, err := h.take(ctx, s, 32)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, b...)
	}
	if s.calls != 3 {
		t.Fatalf("%d HSM calls for 9600 bytes, want 3", s.calls)
	}
	// 4096 is a multiple of 32, so the stream is used without gaps.
	for i, b := range got {
		if b != byte(i) {
			t.Fatalf("byte %d = %d, want %d: a byte was skipped or handed out twice", i, b, byte(i))
		}
	}
	if !bytes.Equal(h.buf[:h.off], make([]byte, h.off)) {
		t.Fatal("handed-out bytes are still in the pool")
	}
	big, err := h.take(ctx, s, 2000)
	if err != nil || len(big) != 2000 || s.calls != 4 {
		t.Fatalf("large request: %d bytes, %v, %d calls", len(big), err, s.calls)
	}
	s.fail = true
	h2 := hsmEntropy{}
	if _, err := h2.take(ctx, s, 32); err == nil {
		t.Fatal("an HSM failure was not reported")
	}
}
