//go:build cabinet_testhooks

package main

// This file is compiled only into the binary the integration tests build
// (go build -tags cabinet_testhooks). It records every key material the node
// seals, in hex (plaintext and sealed form), into $CABINET_TEST_MATERIAL_LOG — a file the tests keep
// outside every node directory — so the leak scan knows what plaintext to
// look for in the files the nodes wrote. Never build releases with this tag.

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"sync"

	"github.com/cabinet-kms/cabinet/keyops"
)

func init() {
	path := os.Getenv("CABINET_TEST_MATERIAL_LOG")
	if path == "" {
		return
	}
	wrapSealer = func(s keyops.Sealer) keyops.Sealer { return &observingSealer{Sealer: s, path: path} }
}

type observingSealer struct {
	keyops.Sealer
	path string
	mu   sync.Mutex
}

var materialLabel = []byte("cabinet/key-material/v1")

func (o *observingSealer) Seal(ctx context.Context, kekVersion uint32, plaintext, aad []byte) ([]byte, error) {
	sealed, err := o.Sealer.Seal(ctx, kekVersion, plaintext, aad)
	if err == nil && len(aad) > 4+len(materialLabel) && bytes.Equal(aad[4:4+len(materialLabel)], materialLabel) {
		rest := aad[4+len(materialLabel):]
		id, version := "?", uint32(0)
		if len(rest) >= 4 {
			n := int(binary.BigEndian.Uint32(rest))
			if len(rest) >= 4+n+4 {
				id = string(rest[4 : 4+n])
				version = binary.BigEndian.Uint32(rest[4+n:])
			}
		}
		o.mu.Lock()
		if f, err := os.OpenFile(o.path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err == nil {
			fmt.Fprintf(f, "%s %d %s %s\n", id, version, hex.EncodeToString(plaintext), hex.EncodeToString(sealed))
			f.Close()
		}
		o.mu.Unlock()
	}
	return sealed, err
}
