package testcluster

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

func keyClient(t *testing.T, c *Cluster, i int) cabinetpb.KeyServiceClient {
	t.Helper()
	cc, err := grpc.NewClient(c.Endpoint(i), grpc.WithTransportCredentials(credentials.NewTLS(c.adminTLS)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cabinetpb.NewKeyServiceClient(cc)
}

// TestClusterServesStopsAndRestarts: a key created through one node is
// usable through the others; a stopped leader is replaced; a restarted
// node catches up and serves again.
func TestClusterServesStopsAndRestarts(t *testing.T) {
	c := Start(t, Config{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	created, err := keyClient(t, c, 1).CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, RequestId: "t1"})
	if err != nil {
		t.Fatalf("CreateKey via node2: %v", err)
	}
	keyID := created.GetKey().GetKeyId()
	enc, err := keyClient(t, c, 2).Encrypt(ctx, &cabinetpb.EncryptRequest{KeyId: keyID, Plaintext: []byte("hi")})
	if err != nil {
		t.Fatalf("Encrypt via node3: %v", err)
	}

	leader := c.Leader()
	if leader < 0 {
		t.Fatal("no leader")
	}
	c.Stop(leader)
	other := (leader + 1) % 3
	if err := poll(ctx, "a new leader", func() error {
		if c.Leader() < 0 {
			return context.DeadlineExceeded
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	dec, err := keyClient(t, c, other).Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: enc.GetCiphertext()})
	if err != nil || string(dec.GetPlaintext()) != "hi" {
		t.Fatalf("Decrypt after stopping the leader: %q, %v", dec.GetPlaintext(), err)
	}

	if err := c.Restart(leader); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	dec, err = keyClient(t, c, leader).Decrypt(ctx, &cabinetpb.DecryptRequest{Ciphertext: enc.GetCiphertext()})
	if err != nil || string(dec.GetPlaintext()) != "hi" {
		t.Fatalf("Decrypt via the restarted node: %q, %v", dec.GetPlaintext(), err)
	}
}
