package testcluster

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/cabinet-kms/cabinet/client"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

func operatorClient(t *testing.T, c *Cluster, i int) cabinetpb.OperatorServiceClient {
	t.Helper()
	cc, err := grpc.NewClient(c.Endpoint(i), grpc.WithTransportCredentials(credentials.NewTLS(c.adminTLS)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cabinetpb.NewOperatorServiceClient(cc)
}

// TestKEKRotation rotates the KEK of an in-process cluster while workers
// encrypt and decrypt through every node, with one node stopped while the
// new version is pending (activation waits for it) and the leader stopped
// while material is re-wrapped. Afterwards every ciphertext made before
// decrypts, no HSM holds version 1, and every HSM holds version 2.
func TestKEKRotation(t *testing.T) {
	c := Start(t, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	kc := []cabinetpb.KeyServiceClient{keyClient(t, c, 0), keyClient(t, c, 1), keyClient(t, c, 2)}
	const nKeys = 300
	keys := make([]string, nKeys)
	cts := make([][]byte, nKeys)
	for i := range keys {
		k, err := kc[i%3].CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, RequestId: fmt.Sprint("k", i)})
		if err != nil {
			t.Fatalf("CreateKey %d: %v", i, err)
		}
		keys[i] = k.GetKey().GetKeyId()
		enc, err := kc[i%3].Encrypt(ctx, &cabinetpb.EncryptRequest{KeyId: keys[i], Plaintext: []byte(fmt.Sprint("pt", i))})
		if err != nil {
			t.Fatalf("Encrypt %d: %v", i, err)
		}
		cts[i] = enc.GetCiphertext()
	}

	// Workers: encrypt+decrypt round trips through the client library
	// (failover and retries, as a service would use it), each preferring a
	// different node. Every failure counts.
	var ops, fails atomic.Int64
	var firstErr atomic.Value
	stopWork := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 3 {
		eps := c.Endpoints()
		eps = append(eps[w:], eps[:w]...)
		cl, err := client.New(eps, client.WithTLSConfig(c.adminTLS), client.WithCallTimeout(15*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stopWork:
					return
				default:
				}
				k := keys[(w*97+i)%nKeys]
				ct, err := cl.Encrypt(ctx, k, []byte("x"), nil)
				if err == nil {
					_, err = cl.Decrypt(ctx, ct, nil)
				}
				if err != nil {
					fails.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Errorf("worker %d: %w", w, err))
				}
				ops.Add(1)
			}
		})
	}

	// A follower is stopped: the new version cannot become current.
	leader := c.Leader()
	stopped := (leader + 1) % 3
	c.Stop(stopped)
	via := (leader + 2) % 3
	oc := operatorClient(t, c, via)
	st, err := oc.RotateKEK(ctx, &cabinetpb.RotateKEKRequest{RequestId: "kek-1"})
	if err != nil {
		t.Fatalf("RotateKEK: %v", err)
	}
	if st.GetPhase() != "distributing" {
		t.Fatalf("phase after RotateKEK = %q (%s)", st.GetPhase(), st.GetSummary())
	}
	if _, err := oc.RotateKEK(ctx, &cabinetpb.RotateKEKRequest{RequestId: "kek-2"}); err == nil {
		t.Fatal("a second rotation started while one is in progress")
	}
	waitKEK(t, ctx, oc, "version 2 installed on 2 nodes, waiting for the stopped one", func(st *cabinetpb.KEKStatusResponse) bool {
		v := st.GetVersions()[1]
		return len(v.GetInstalledOn()) == 2 && len(v.GetWaitingFor()) == 1 && v.GetState() == "PENDING"
	})
	// Stays PENDING while the node is down.
	for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end); {
		st, err := oc.KEKStatus(ctx, &cabinetpb.KEKStatusRequest{})
		if err != nil || st.GetCurrentVersion() != 1 {
			t.Fatalf("version 2 activated while node %d was down: %v %v", stopped, st.GetSummary(), err)
		}
	}
	if err := c.Restart(stopped); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}

	// Stop the leader once re-wrapping has begun.
	waitKEK(t, ctx, oc, "version 2 current", func(st *cabinetpb.KEKStatusResponse) bool { return st.GetCurrentVersion() == 2 })
	if l := c.Leader(); l >= 0 && l != via {
		c.Stop(l)
		// The new leader finishes re-wrapping and retires version 1; the
		// stopped node holds up only its own removal.
		waitKEK(t, ctx, oc, "version 1 retired, removal waiting for the stopped node", func(st *cabinetpb.KEKStatusResponse) bool {
			v := st.GetVersions()[0]
			return v.GetState() == "RETIRED" && len(v.GetWaitingFor()) == 1 && v.GetWaitingFor()[0] == c.nodes[l].id
		})
		if err := c.Restart(l); err != nil {
			t.Fatal(err)
		}
		if err := c.WaitHealthy(ctx); err != nil {
			t.Fatal(err)
		}
	}
	final := waitKEK(t, ctx, oc, "rotation done", func(st *cabinetpb.KEKStatusResponse) bool { return st.GetDone() })
	close(stopWork)
	wg.Wait()
	if fails.Load() > 0 {
		t.Fatalf("%d of %d client operations failed during the rotation; first: %v", fails.Load(), ops.Load(), firstErr.Load())
	}
	t.Logf("%d encrypt+decrypt round trips during the rotation; %s", ops.Load(), final.GetSummary())
	if final.GetVersions()[0].GetState() != "DESTROYED" || final.GetVersions()[1].GetSealedBlobs() != nKeys+1 /* + the CA key */ {
		t.Fatalf("final status: %v", final)
	}

	// Every node (the restarted ones included) removed v1 and holds v2.
	if err := c.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	for i, nd := range c.nodes {
		if _, err := nd.hsm.KEKCheckValue(ctx, 1); !errors.Is(err, hsm.ErrKEKNotFound) {
			t.Errorf("node %d still holds KEK version 1 (err %v)", i, err)
		}
		if _, err := nd.hsm.KEKCheckValue(ctx, 2); err != nil {
			t.Errorf("node %d lacks KEK version 2: %v", i, err)
		}
	}
	for i := range keys {
		dec, err := kc[(i+1)%3].Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: cts[i]})
		if err != nil || string(dec.GetPlaintext()) != fmt.Sprint("pt", i) {
			t.Fatalf("decrypt pre-rotation ciphertext %d: %q %v", i, dec.GetPlaintext(), err)
		}
	}
}

func waitKEK(t *testing.T, ctx context.Context, oc cabinetpb.OperatorServiceClient, what string, cond func(*cabinetpb.KEKStatusResponse) bool) *cabinetpb.KEKStatusResponse {
	t.Helper()
	var last *cabinetpb.KEKStatusResponse
	err := poll(ctx, what, func() error {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		st, err := oc.KEKStatus(cctx, &cabinetpb.KEKStatusRequest{})
		if err != nil {
			return err
		}
		last = st
		if !cond(st) {
			return errors.New(st.GetSummary())
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v (last status: %v)", err, last)
	}
	return last
}
