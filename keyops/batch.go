package keyops

import (
	"context"
	"io"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// EncryptItem is one Encrypt of a batch: the inputs, then the outcome
// EncryptBatch fills in.
type EncryptItem struct {
	Key       *fsmpb.KeyRecord
	Plaintext []byte
	Context   map[string]string

	Ciphertext []byte
	Version    uint32
	Err        error
}

// EncryptBatch does what Encrypt(ctx, it.Key, it.Plaintext, it.Context)
// would do for every item, with the same checks, errors and ciphertext
// format, and sets each item's Ciphertext and Version or Err: one item's
// failure never affects the others. Per batch rather than per item, it
// takes the cache entry of each distinct key record and version once, reads
// the salts with one call to the random source (still 32 fresh bytes per
// message), and allocates all ciphertexts as one block (they alias it; each
// has its own capacity).
func (e *Engine) EncryptBatch(ctx context.Context, items []EncryptItem) {
	type held struct {
		key     *fsmpb.KeyRecord
		version uint32
		entry   *cacheEntry
	}
	var entries []held
	defer func() {
		for _, h := range entries {
			h.entry.release()
		}
	}()
	// Pass 1: the checks and material, as encrypt does them, per item.
	type readyItem struct {
		i        int
		material []byte
	}
	ready := make([]readyItem, 0, len(items))
	total := 0
	for i := range items {
		it := &items[i]
		it.Ciphertext, it.Version, it.Err = nil, 0, nil
		key := it.Key
		if len(it.Plaintext) > MaxPlaintextLen {
			it.Err = newErr(ErrInvalidArgument, "plaintext is %d bytes; Encrypt takes at most %d (encrypt larger data under a data key from GenerateDataKey)", len(it.Plaintext), MaxPlaintextLen)
			continue
		}
		if _, err := validateContext(it.Context); err != nil {
			it.Err = err
			continue
		}
		if err := CheckOperation(key, key.GetPrimaryVersion(), OpEncrypt, false); err != nil {
			it.Err = err
			continue
		}
		if key.GetSpec() != fsmpb.KeySpec_KEY_SPEC_AES_256 {
			it.Err = errNotSymmetric(key, "Encrypt")
			continue
		}
		keyID, version := key.GetKeyId(), key.GetPrimaryVersion()
		if !validKeyIDBytes(keyID) {
			it.Err = newErr(ErrInvalidArgument, "key id cannot be carried in a ciphertext")
			continue
		}
		var entry *cacheEntry
		for _, h := range entries {
			if h.key == key && h.version == version {
				entry = h.entry
				break
			}
		}
		if entry == nil {
			// Failures are not remembered: the next item of this key
			// tries again, as a separate Encrypt would.
			en, err := e.material(ctx, key, version)
			if err != nil {
				it.Err = err
				continue
			}
			entries = append(entries, held{key, version, en})
			entry = en
		}
		ready = append(ready, readyItem{i, entry.material})
		it.Version = version
		total += sealedLen(keyID, len(it.Plaintext))
	}
	if len(ready) == 0 {
		return
	}
	// Pass 2: one read for all salts, one block for all ciphertexts.
	salts := make([]byte, len(ready)*saltLen)
	if _, err := io.ReadFull(e.rand, salts); err != nil {
		err = wrapErr(ErrUnwrap, err, "could not read random salt")
		for _, r := range ready {
			items[r.i].Version, items[r.i].Err = 0, err
		}
		return
	}
	block := make([]byte, total)
	off := 0
	for _, r := range ready {
		it := &items[r.i]
		n := sealedLen(it.Key.GetKeyId(), len(it.Plaintext))
		salt := salts[:saltLen:saltLen]
		salts = salts[saltLen:]
		ct, err := sealV1(block[off:off:off+n], r.material, it.Key.GetKeyId(), it.Version, salt, it.Plaintext, it.Context)
		off += n
		if err != nil {
			it.Version, it.Err = 0, wrapErr(ErrUnwrap, err, "could not derive message key")
			continue
		}
		it.Ciphertext = ct
	}
}
