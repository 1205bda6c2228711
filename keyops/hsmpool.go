package keyops

import (
	"context"
	"sync"
)

// hsmEntropyBatch is how many random bytes are fetched from the HSM per
// call. Each byte is handed out once and zeroed in the pool as it is taken.
const hsmEntropyBatch = 4096

// hsmEntropy amortises C_GenerateRandom: one HSM call per hsmEntropyBatch
// bytes instead of one per key (≈18 µs per call on SoftHSM, most of a
// CreateKey's HSM time after the seal). The bytes wait in process memory
// until used; they are only the HSM half of mixRandom's secret (the other
// half comes fresh from Config.Rand for every key), so a reader of this
// process's memory — who could read unwrapped keys anyway — learns nothing
// it could not otherwise.
type hsmEntropy struct {
	mu  sync.Mutex
	buf []byte // unused bytes at buf[off:]
	off int
}

// take returns n fresh HSM random bytes (a new slice the caller zeroes).
func (h *hsmEntropy) take(ctx context.Context, s Sealer, n int) ([]byte, error) {
	if n > hsmEntropyBatch/4 { // large requests go straight to the HSM
		return s.GenerateRandom(ctx, n)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.buf)-h.off < n {
		fresh, err := s.GenerateRandom(ctx, hsmEntropyBatch)
		if err != nil {
			return nil, err
		}
		if len(fresh) != hsmEntropyBatch {
			clear(fresh)
			return s.GenerateRandom(ctx, n) // let the caller's length check report it
		}
		clear(h.buf)
		h.buf, h.off = fresh, 0
	}
	out := make([]byte, n)
	copy(out, h.buf[h.off:h.off+n])
	clear(h.buf[h.off : h.off+n])
	h.off += n
	return out, nil
}
