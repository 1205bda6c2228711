package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/cabinet-kms/cabinet/client"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// kekStatusJSON runs `cabinet operator kek status -o json` against nd and
// parses its output (protojson) into the response message.
func (c *testCluster) kekStatusJSON(nd *node) (*cabinetpb.KEKStatusResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	out, errOut, err := c.cli(ctx, nil, "operator", "kek", "status", "-o", "json", "--addr", nd.apiAddr)
	if err != nil {
		return nil, fmt.Errorf("kek status: %v: %s", err, strings.TrimSpace(errOut))
	}
	st := &cabinetpb.KEKStatusResponse{}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal([]byte(out), st); err != nil {
		return nil, fmt.Errorf("parse kek status JSON: %v\n%s", err, out)
	}
	return st, nil
}

// TestKEKRotationOnRealCluster rotates the KEK of a real three-process
// cluster (SoftHSM tokens) holding 10,000 keys with the CLI (`kek rotate
// --wait`), while four client-library workers encrypt and decrypt through
// every node. No client call may fail; a second rotation is refused while
// the first runs; afterwards `kek status` reports version 2 current and
// version 1 destroyed everywhere, every ciphertext made before the rotation
// decrypts to its plaintext, and no node's HSM token holds version 1.
func TestKEKRotationOnRealCluster(t *testing.T) {
	c := newTestCluster(t, 3)
	c.startThree(t)

	var eps []string
	for _, nd := range c.nodes {
		eps = append(eps, nd.apiAddr)
	}
	tlsOpt := client.WithTLSFiles(filepath.Join(c.adminDir, "ca.pem"), filepath.Join(c.adminDir, "admin.pem"), filepath.Join(c.adminDir, "admin-key.pem"))
	// newClient connects to every node, preferring node `pref`.
	newClient := func(pref int) *client.Client {
		t.Helper()
		rot := append(append([]string(nil), eps[pref:]...), eps[:pref]...)
		cl, err := client.New(rot, tlsOpt, client.WithCallTimeout(30*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cl.Close() })
		return cl
	}
	clients := []*client.Client{newClient(0), newClient(1), newClient(2)}

	// 1. 10,000 AES-256 keys and one ciphertext per key, made before the rotation.
	const nKeys, creators = 10_000, 32
	keys := make([]string, nKeys)
	cts := make([][]byte, nKeys)
	plaintext := func(i int) []byte { return []byte(fmt.Sprintf("pre-rotation plaintext %d", i)) }
	{
		ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
		var next atomic.Int64
		var firstErr error
		var errMu sync.Mutex
		var wg sync.WaitGroup
		start := time.Now()
		for g := range creators {
			cl := clients[g%3]
			wg.Go(func() {
				for {
					i := int(next.Add(1) - 1)
					if i >= nKeys || ctx.Err() != nil {
						return
					}
					k, err := cl.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, RequestId: fmt.Sprintf("kek-it-create-%d", i)})
					var ct []byte
					if err == nil {
						ct, err = cl.Encrypt(ctx, k.GetKeyId(), plaintext(i), nil)
					}
					if err != nil {
						errMu.Lock()
						if firstErr == nil {
							firstErr = fmt.Errorf("key %d: %w", i, err)
						}
						errMu.Unlock()
						cancel()
						return
					}
					keys[i], cts[i] = k.GetKeyId(), ct
				}
			})
		}
		wg.Wait()
		cancel()
		if firstErr != nil {
			t.Fatalf("creating keys: %v", firstErr)
		}
		for i := range keys {
			if keys[i] == "" || cts[i] == nil {
				t.Fatalf("key %d was not created (creation timed out?)", i)
			}
		}
		t.Logf("created %d AES-256 keys (+1 ciphertext each) with %d goroutines in %v", nKeys, creators, time.Since(start).Round(time.Millisecond))
	}

	before, err := c.kekStatusJSON(c.nodes[0])
	if err != nil {
		t.Fatal(err)
	}
	if before.GetCurrentVersion() != 1 || !before.GetDone() || before.GetPhase() != "idle" {
		t.Fatalf("before the rotation: %v", before)
	}

	// 2. Workers: encrypt+decrypt round trips on random keys through the
	// client library, each preferring a different node. Every failure counts.
	var ops, fails atomic.Int64
	var firstWorkErr atomic.Value
	stopWork := make(chan struct{})
	workCtx, workCancel := context.WithTimeout(context.Background(), 5*time.Minute) // hard cap
	defer workCancel()
	var workers sync.WaitGroup
	for w := range 4 {
		cl := newClient(w % 3)
		workers.Go(func() {
			msg := []byte(fmt.Sprintf("worker %d", w))
			for {
				select {
				case <-stopWork:
					return
				case <-workCtx.Done():
					return
				default:
				}
				k := keys[rand.IntN(nKeys)]
				ct, err := cl.Encrypt(workCtx, k, msg, nil)
				var pt []byte
				if err == nil {
					pt, err = cl.Decrypt(workCtx, ct, nil)
				}
				if err == nil && !bytes.Equal(pt, msg) {
					err = fmt.Errorf("decrypt returned %q, want %q", pt, msg)
				}
				if err != nil {
					if workCtx.Err() != nil {
						return // the hard cap, not a failure of the service
					}
					fails.Add(1)
					firstWorkErr.CompareAndSwap(nil, fmt.Errorf("worker %d key %s: %w", w, k, err))
				}
				ops.Add(1)
			}
		})
	}
	stopWorkers := sync.OnceFunc(func() { close(stopWork); workers.Wait() })
	defer stopWorkers()

	// 3. `kek rotate --wait` through a follower (it generates version 2 in
	// its own HSM), run in the background.
	var leader *node
	waitFor(t, 30*time.Second, "a leader", func() (err error) { leader, err = c.leader(c.nodes); return err })
	via := c.nodes[0]
	if via == leader {
		via = c.nodes[1]
	}
	type cliResult struct {
		stdout, stderr string
		err            error
		took           time.Duration
	}
	rotateDone := make(chan cliResult, 1)
	rotCtx, rotCancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer rotCancel()
	rotStart := time.Now()
	go func() {
		so, se, err := c.cli(rotCtx, nil, "operator", "kek", "rotate", "--wait", "--wait-timeout", "5m", "--request-id", "kek-it-1", "--addr", via.apiAddr)
		rotateDone <- cliResult{so, se, err, time.Since(rotStart)}
	}()

	// 4. While it runs, a second rotation is refused.
	op := clients[2].Operator()
	sawInProgress := ""
	waitFor(t, 60*time.Second, "the rotation to be in progress", func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		st, err := op.KEKStatus(ctx, &cabinetpb.KEKStatusRequest{})
		if err != nil {
			return err
		}
		if st.GetDone() {
			if st.GetCurrentVersion() >= 2 {
				return errors.New("rotation finished before it was seen in progress") // waitFor keeps polling; it fails at the deadline
			}
			return errors.New(st.GetSummary())
		}
		sawInProgress = st.GetSummary()
		return nil
	})
	{
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		so, se, err := c.cli(ctx, nil, "operator", "kek", "rotate", "--request-id", "kek-it-2", "--addr", c.nodes[2].apiAddr)
		cancel()
		if err == nil {
			t.Fatalf("a second `kek rotate` was accepted while one was in progress (%s):\n%s", sawInProgress, so)
		}
		if !strings.Contains(se, "FailedPrecondition") || !strings.Contains(se, "already in progress") {
			t.Fatalf("second `kek rotate` failed without a clear FailedPrecondition: %v\nstderr: %s", err, se)
		}
		t.Logf("second rotation refused while %q: %s", sawInProgress, strings.TrimSpace(se))
	}

	var rot cliResult
	select {
	case rot = <-rotateDone:
	case <-time.After(6 * time.Minute):
		t.Fatal("`kek rotate --wait` did not return within 6 minutes")
	}
	if rot.err != nil {
		t.Fatalf("kek rotate --wait: %v\nstdout: %s\nstderr: %s", rot.err, rot.stdout, rot.stderr)
	}
	var phasesSeen []string
	for _, p := range []string{"distributing", "re-wrapping", "removing"} {
		if strings.Contains(rot.stderr, p+":") {
			phasesSeen = append(phasesSeen, p)
		}
	}
	if !slices.Contains(phasesSeen, "re-wrapping") && !slices.Contains(phasesSeen, "removing") {
		t.Fatalf("`kek rotate --wait` progress shows neither re-wrapping nor removing:\n%s", rot.stderr)
	}
	if !strings.Contains(rot.stdout, "KEK rotation done: version 2 is current") {
		t.Fatalf("`kek rotate --wait` stdout does not report done:\n%s", rot.stdout)
	}

	// 5. Stop the workers: no client call may have failed.
	stopWorkers()
	if fails.Load() > 0 {
		t.Fatalf("%d of %d client round trips failed during the rotation; first: %v", fails.Load(), ops.Load(), firstWorkErr.Load())
	}
	if ops.Load() == 0 {
		t.Fatal("the workers made no round trip")
	}

	// `kek status -o json`, parsed, through every node.
	var final *cabinetpb.KEKStatusResponse
	for _, nd := range c.nodes {
		waitFor(t, 30*time.Second, "kek status done on "+nd.id, func() error {
			st, err := c.kekStatusJSON(nd)
			if err != nil {
				return err
			}
			if !st.GetDone() {
				return errors.New(st.GetSummary())
			}
			final = st
			return nil
		})
		if err := checkFinalKEKStatus(final, c.nodes, nKeys); err != nil {
			t.Fatalf("kek status via %s: %v\n%v", nd.id, err, final)
		}
	}

	t.Logf("KEK rotation: %d keys, rotation (kek rotate --wait) took %v, phases shown %v; %d encrypt+decrypt round trips by 4 workers, %d errors; %s",
		nKeys, rot.took.Round(time.Millisecond), phasesSeen, ops.Load(), fails.Load(), final.GetSummary())
	t.Logf("kek rotate --wait progress:\n%s", strings.TrimRight(rot.stderr, "\n"))

	// 6. Every pre-rotation ciphertext decrypts, through each node in turn.
	{
		single := make([]*client.Client, len(c.nodes))
		for i := range c.nodes {
			cl, err := client.New([]string{eps[i]}, tlsOpt, client.WithCallTimeout(30*time.Second))
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			single[i] = cl
		}
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		var next atomic.Int64
		var bad atomic.Int64
		var firstErr atomic.Value
		var wg sync.WaitGroup
		start := time.Now()
		for range 16 {
			wg.Go(func() {
				for {
					i := int(next.Add(1) - 1)
					if i >= nKeys || ctx.Err() != nil {
						return
					}
					pt, err := single[i%3].Decrypt(ctx, cts[i], nil)
					if err == nil && !bytes.Equal(pt, plaintext(i)) {
						err = fmt.Errorf("plaintext %q, want %q", pt, plaintext(i))
					}
					if err != nil {
						bad.Add(1)
						firstErr.CompareAndSwap(nil, fmt.Errorf("ciphertext %d (key %s) via %s: %w", i, keys[i], c.nodes[i%3].id, err))
					}
				}
			})
		}
		wg.Wait()
		if ctx.Err() != nil {
			t.Fatalf("decrypting the pre-rotation ciphertexts timed out after %d", next.Load())
		}
		if bad.Load() > 0 {
			t.Fatalf("%d of %d pre-rotation ciphertexts did not decrypt; first: %v", bad.Load(), nKeys, firstErr.Load())
		}
		t.Logf("all %d pre-rotation ciphertexts decrypt to their plaintexts (through all 3 nodes) in %v", nKeys, time.Since(start).Round(time.Millisecond))
	}

	// 7. Stop every node and look into each SoftHSM token: version 1 is
	// gone, version 2 is there.
	c.stopAll()
	// Not a check: what the nodes said about the rotation beyond info level.
	for _, nd := range c.nodes {
		b, _ := readFile(nd.logPath)
		for _, l := range strings.Split(b, "\n") {
			if strings.Contains(l, "KEK") && (strings.Contains(l, "WARN") || strings.Contains(l, "ERROR")) {
				t.Logf("%s: %s", nd.id, l)
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, nd := range c.nodes {
		pin, err := os.ReadFile(nd.pinFile)
		if err != nil {
			t.Fatal(err)
		}
		p, err := hsm.OpenPKCS11(ctx, hsm.PKCS11Config{Library: softhsmLib, TokenLabel: "cabinet-" + nd.id,
			PIN: strings.TrimSpace(string(pin)), ConfigPath: nd.conf})
		if err != nil {
			t.Fatalf("open %s's token: %v", nd.id, err)
		}
		_, err1 := p.KEKCheckValue(ctx, 1)
		kcv2, err2 := p.KEKCheckValue(ctx, 2)
		// Close before the next token: they share the library, which holds
		// one SoftHSM config at a time.
		if err := p.Close(); err != nil {
			t.Fatalf("close %s's token: %v", nd.id, err)
		}
		if !errors.Is(err1, hsm.ErrKEKNotFound) {
			t.Errorf("%s's HSM token still holds KEK version 1 (KEKCheckValue: %v)", nd.id, err1)
		}
		if err2 != nil {
			t.Errorf("%s's HSM token lacks KEK version 2: %v", nd.id, err2)
		} else if got, want := fmt.Sprintf("%x", kcv2), final.GetVersions()[1].GetCheckValue(); got != want {
			t.Errorf("%s's KEK version 2 check value %s, the cluster's %s", nd.id, got, want)
		}
	}
	if !t.Failed() {
		t.Logf("all 3 HSM tokens: KEK version 1 absent (ErrKEKNotFound), version 2 present with the cluster's check value")
	}
}

func checkFinalKEKStatus(st *cabinetpb.KEKStatusResponse, nodes []*node, nKeys int) error {
	var ids []string
	for _, nd := range nodes {
		ids = append(ids, nd.id)
	}
	sameSet := func(got []string) bool {
		g := slices.Sorted(slices.Values(got))
		return slices.Equal(g, slices.Sorted(slices.Values(ids)))
	}
	switch {
	case !st.GetDone() || st.GetPhase() != "idle":
		return fmt.Errorf("done %v phase %q", st.GetDone(), st.GetPhase())
	case st.GetCurrentVersion() != 2:
		return fmt.Errorf("current version %d, want 2", st.GetCurrentVersion())
	case !sameSet(st.GetNodes()):
		return fmt.Errorf("nodes %v, want %v", st.GetNodes(), ids)
	case len(st.GetVersions()) != 2:
		return fmt.Errorf("%d versions, want 2", len(st.GetVersions()))
	}
	v1, v2 := st.GetVersions()[0], st.GetVersions()[1]
	switch {
	case v1.GetVersion() != 1 || v1.GetState() != "DESTROYED":
		return fmt.Errorf("version 1: %v", v1)
	case !sameSet(v1.GetRemovedFrom()):
		return fmt.Errorf("version 1 removed from %v, want %v", v1.GetRemovedFrom(), ids)
	case v1.GetSealedBlobs() != 0 || len(v1.GetWaitingFor()) != 0:
		return fmt.Errorf("version 1 still has %d sealed blobs / waits for %v", v1.GetSealedBlobs(), v1.GetWaitingFor())
	case v2.GetVersion() != 2 || v2.GetState() != "ACTIVE":
		return fmt.Errorf("version 2: %v", v2)
	case !sameSet(v2.GetInstalledOn()):
		return fmt.Errorf("version 2 installed on %v, want %v", v2.GetInstalledOn(), ids)
	case v2.GetSealedBlobs() < uint64(nKeys):
		return fmt.Errorf("version 2 seals %d blobs, want >= %d", v2.GetSealedBlobs(), nKeys)
	case v2.GetCheckValue() == "" || v2.GetCheckValue() == v1.GetCheckValue():
		return fmt.Errorf("check values v1 %q v2 %q", v1.GetCheckValue(), v2.GetCheckValue())
	}
	return nil
}
