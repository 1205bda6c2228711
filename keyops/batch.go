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
	// Index is the item's position in the caller's batch request (0-based),
	// written into its ciphertext and mixed into its nonce. Indices must
	// increase strictly through the items passed to one EncryptBatch call
	// (items the caller dropped from its request may leave gaps), so no two
	// messages of a batch share a nonce.
	Index uint32

	Ciphertext []byte
	Version    uint32
	Err        error
}

// EncryptBatch does what Encrypt(ctx, it.Key, it.Plaintext, it.Context)
// would do for every item, with the same checks and errors, and sets each
// item's Ciphertext and Version or Err: one item's failure never affects the
// others. The ciphertexts are in format 2 (batch; docs/CIPHERTEXT.md), not
// Encrypt's format 1: the batch reads one fresh 32-byte salt from the random
// source, and per distinct key record and version it takes the cache entry
// once, derives one batch key and base nonce with HKDF and builds one
// AES-GCM instance; each item is then sealed under the nonce of its Index.
// All ciphertexts are allocated as one block (they alias it; each has its
// own capacity).
//
// Indices that do not increase strictly are a caller bug: every item fails
// with ErrInvalidArgument and nothing is encrypted.
func (e *Engine) EncryptBatch(ctx context.Context, items []EncryptItem) {
	for i := range items {
		it := &items[i]
		it.Ciphertext, it.Version, it.Err = nil, 0, nil
		if i > 0 && it.Index <= items[i-1].Index {
			err := newErr(ErrInvalidArgument, "batch item indices must increase strictly (item %d has index %d after %d)", i, it.Index, items[i-1].Index)
			for j := range items {
				items[j].Ciphertext, items[j].Version, items[j].Err = nil, 0, err
			}
			return
		}
	}
	// A group is one key record and version of the batch: one cache
	// entry, one batch key.
	type group struct {
		key     *fsmpb.KeyRecord
		version uint32
		entry   *cacheEntry
		sealer  batchSealer
		err     error
	}
	var groups []group
	defer func() {
		for i := range groups {
			groups[i].sealer.wipe()
			groups[i].entry.release()
		}
	}()
	// Pass 1: the checks and material, as encrypt does them, per item.
	type readyItem struct {
		i, g int
	}
	ready := make([]readyItem, 0, len(items))
	total := 0
	for i := range items {
		it := &items[i]
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
		g := -1
		for j := range groups {
			if groups[j].key == key && groups[j].version == version {
				g = j
				break
			}
		}
		if g < 0 {
			// Failures are not remembered: the next item of this key
			// tries again, as a separate Encrypt would.
			en, err := e.material(ctx, key, version)
			if err != nil {
				it.Err = err
				continue
			}
			groups = append(groups, group{key: key, version: version, entry: en})
			g = len(groups) - 1
		}
		ready = append(ready, readyItem{i, g})
		it.Version = version
		total += sealedLenV2(keyID, len(it.Plaintext))
	}
	if len(ready) == 0 {
		return
	}
	// Pass 2: one salt for the batch, one batch key per group, one block
	// for all ciphertexts.
	salt := make([]byte, saltLen)
	if _, err := io.ReadFull(e.rand, salt); err != nil {
		err = wrapErr(ErrUnwrap, err, "could not read random salt")
		for _, r := range ready {
			items[r.i].Version, items[r.i].Err = 0, err
		}
		return
	}
	s := getScratch()
	defer s.release()
	for j := range groups {
		g := &groups[j]
		g.err = g.sealer.init(s, g.entry.material, g.key.GetKeyId(), g.version, salt)
	}
	block := make([]byte, total)
	off := 0
	for _, r := range ready {
		it, g := &items[r.i], &groups[r.g]
		n := sealedLenV2(it.Key.GetKeyId(), len(it.Plaintext))
		if g.err != nil {
			it.Version, it.Err = 0, wrapErr(ErrUnwrap, g.err, "could not derive message key")
			off += n
			continue
		}
		it.Ciphertext = g.sealer.seal(block[off:off:off+n], s, it.Index, it.Plaintext, it.Context)
		off += n
	}
}
