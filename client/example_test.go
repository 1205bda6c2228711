package client_test

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/client"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// The examples run against an in-process three-node cluster whose
// CABINET_* environment TestMain exports, as `make cluster` prints it.

func ExampleNew() {
	// FromEnv reads CABINET_ADDR (one endpoint or a comma-separated list),
	// CABINET_CACERT, CABINET_CLIENT_CERT and CABINET_CLIENT_KEY: the same
	// environment as the cabinet CLI.
	c, err := client.New(nil, client.FromEnv())
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	ctx := context.Background()
	key, err := c.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, Description: "orders"})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(key.GetSpec(), key.GetUsage(), key.GetState(), "version", key.GetPrimaryVersion())
	// Output: AES_256 ENCRYPT_DECRYPT ACTIVE version 1
}

func ExampleWithTLSFiles() {
	endpoints := strings.Split(os.Getenv("CABINET_ADDR"), ",") // e.g. 10.0.0.1:7101,10.0.0.2:7101,...
	c, err := client.New(endpoints,
		client.WithTLSFiles(os.Getenv("CABINET_CACERT"), os.Getenv("CABINET_CLIENT_CERT"), os.Getenv("CABINET_CLIENT_KEY")),
		client.WithCallTimeout(5*time.Second),
	)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	fmt.Println(len(c.Endpoints()), "endpoints")
	// Output: 3 endpoints
}

func ExampleClient_Encrypt() {
	c, err := client.New(nil, client.FromEnv())
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	key, err := c.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256})
	if err != nil {
		log.Fatal(err)
	}

	encCtx := map[string]string{"tenant": "acme"}
	ciphertext, err := c.Encrypt(ctx, key.GetKeyId(), []byte("attack at dawn"), encCtx)
	if err != nil {
		log.Fatal(err)
	}
	plaintext, err := c.Decrypt(ctx, ciphertext, encCtx) // the ciphertext names its key
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(plaintext))

	// Another encryption context does not decrypt it.
	_, err = c.Decrypt(ctx, ciphertext, map[string]string{"tenant": "evil"})
	fmt.Println(status.Code(err))
	// Output:
	// attack at dawn
	// InvalidArgument
}

func ExampleClient_ListKeys() {
	c, err := client.New(nil, client.FromEnv())
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	key, err := c.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_HMAC_SHA256})
	if err != nil {
		log.Fatal(err)
	}
	found := false
	for k, err := range c.ListKeys(ctx) {
		if err != nil {
			log.Fatal(err)
		}
		found = found || k.GetKeyId() == key.GetKeyId()
	}
	fmt.Println("listed:", found)
	// Output: listed: true
}

func ExampleEnvelope() {
	c, err := client.New(nil, client.FromEnv())
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	key, err := c.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256})
	if err != nil {
		log.Fatal(err)
	}

	env := client.NewEnvelope(c)
	encCtx := map[string]string{"file": "backup.tar"}
	data := bytes.Repeat([]byte("cabinet!"), 1<<17) // 1 MiB: too large for Encrypt
	sealed, err := env.Encrypt(ctx, key.GetKeyId(), data, encCtx)
	if err != nil {
		log.Fatal(err)
	}
	opened, err := env.Decrypt(ctx, sealed, encCtx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(len(data), "bytes, round trip equal:", bytes.Equal(opened, data))
	fmt.Println("overhead under 1%:", len(sealed)-len(data) < len(data)/100)
	// Output:
	// 1048576 bytes, round trip equal: true
	// overhead under 1%: true
}

func ExampleEnvelope_EncryptStream() {
	c, err := client.New(nil, client.FromEnv())
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	key, err := c.CreateKey(ctx, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256})
	if err != nil {
		log.Fatal(err)
	}

	env := client.NewEnvelope(c)
	// Any io.Reader and io.Writer: files, pipes, object storage streams.
	var sealed bytes.Buffer
	if err := env.EncryptStream(ctx, &sealed, strings.NewReader("the quarterly numbers\n"), key.GetKeyId(), nil); err != nil {
		log.Fatal(err)
	}
	// DecryptStream writes chunks as they authenticate: trust the output
	// only once it returns nil.
	if err := env.DecryptStream(ctx, os.Stdout, &sealed, nil); err != nil {
		log.Fatal(err)
	}
	// Output: the quarterly numbers
}
