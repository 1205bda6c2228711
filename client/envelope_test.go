package client_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/client"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// methodCounter counts calls per full method name (each attempt).
type methodCounter struct{ calls map[string]*atomic.Int64 }

func newMethodCounter() *methodCounter {
	m := &methodCounter{calls: map[string]*atomic.Int64{}}
	for _, n := range []string{"CreateKey", "Decrypt", "GenerateDataKey", "DescribeKey", "Encrypt"} {
		m.calls["/cabinet.v1.KeyService/"+n] = &atomic.Int64{}
	}
	return m
}

func (m *methodCounter) interceptor(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	if c, ok := m.calls[method]; ok {
		c.Add(1)
	}
	return invoker(ctx, method, req, reply, cc, opts...)
}

func (m *methodCounter) count(name string) int64 {
	return m.calls["/cabinet.v1.KeyService/"+name].Load()
}

// sharedClient returns a client of the shared cluster with extra options.
func sharedClient(t *testing.T, opts ...client.Option) *client.Client {
	t.Helper()
	c, err := client.New(shared.Endpoints(), append([]client.Option{
		client.WithTLSFiles(shared.CAFile(), shared.AdminCertFile(), shared.AdminKeyFile()),
	}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func newAESKey(t *testing.T, c *client.Client) string {
	t.Helper()
	k, err := c.CreateKey(context.Background(), &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256})
	if err != nil {
		t.Fatalf("CreateKey: %v", err)
	}
	return k.GetKeyId()
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestEnvelopeRoundTrip(t *testing.T) {
	counter := newMethodCounter()
	c := sharedClient(t, client.WithDialOptions(grpc.WithChainUnaryInterceptor(counter.interceptor)))
	keyID := newAESKey(t, c)
	env := client.NewEnvelope(c)
	ctx := context.Background()
	encCtx := map[string]string{"purpose": "test"}
	const chunk = client.DefaultChunkSize
	for _, size := range []int{0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 5<<20 + 3} {
		data := randomBytes(t, size)
		gen, dec := counter.count("GenerateDataKey"), counter.count("Decrypt")
		var sealed bytes.Buffer
		if err := env.EncryptStream(ctx, &sealed, bytes.NewReader(data), keyID, encCtx); err != nil {
			t.Fatalf("%d bytes: EncryptStream: %v", size, err)
		}
		chunks := max(1, (size+chunk-1)/chunk)
		if _, hdr := headerLen(t, sealed.Bytes()); sealed.Len() != hdr+size+16*chunks {
			t.Errorf("%d bytes: envelope is %d bytes, want header %d + data + %d tags", size, sealed.Len(), hdr, chunks)
		}
		var opened bytes.Buffer
		if err := env.DecryptStream(ctx, &opened, &sealed, encCtx); err != nil {
			t.Fatalf("%d bytes: DecryptStream: %v", size, err)
		}
		if !bytes.Equal(opened.Bytes(), data) {
			t.Fatalf("%d bytes: round trip differs", size)
		}
		// One data key per envelope: one GenerateDataKey, one Decrypt.
		if g, d := counter.count("GenerateDataKey")-gen, counter.count("Decrypt")-dec; g != 1 || d != 1 {
			t.Errorf("%d bytes: %d GenerateDataKey and %d Decrypt calls, want 1 and 1", size, g, d)
		}
	}
}

// headerLen returns the wrapped-key length and the header length of an
// envelope (DESIGN.md: 21 fixed bytes, then the wrapped data key).
func headerLen(t *testing.T, env []byte) (int, int) {
	t.Helper()
	if len(env) < 21 {
		t.Fatalf("envelope of %d bytes has no header", len(env))
	}
	l := int(binary.BigEndian.Uint16(env[19:21]))
	return l, 21 + l
}

func TestEnvelopeDetectsTampering(t *testing.T) {
	c := sharedClient(t)
	keyID := newAESKey(t, c)
	env := client.NewEnvelope(c, client.WithChunkSize(1024))
	ctx := context.Background()
	encCtx := map[string]string{"purpose": "tamper"}
	const cs, rec = 1024, 1024 + 16

	build := func(size int) ([]byte, int) {
		sealed, err := env.Encrypt(ctx, keyID, randomBytes(t, size), encCtx)
		if err != nil {
			t.Fatal(err)
		}
		_, h := headerLen(t, sealed)
		return sealed, h
	}
	partial, ph := build(3*cs + 100) // chunks: 3 full + 1 of 100 bytes
	exact, eh := build(3 * cs)       // chunks: 3 full, the last one full

	flip := func(b []byte, i int) []byte {
		out := bytes.Clone(b)
		out[i] ^= 0x01
		return out
	}
	swap := func(b []byte, h, i, j int) []byte {
		out := bytes.Clone(b)
		copy(out[h+i*rec:h+(i+1)*rec], b[h+j*rec:h+(j+1)*rec])
		copy(out[h+j*rec:h+(j+1)*rec], b[h+i*rec:h+(i+1)*rec])
		return out
	}
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

	cases := []struct {
		name string
		data []byte
		// server: the wrapped data key is damaged, so Cabinet's Decrypt
		// refuses it (InvalidArgument, or NotFound when the key id in it
		// changed) before any chunk is read.
		server bool
	}{
		{name: "magic", data: flip(partial, 0)},
		{name: "version", data: flip(partial, 6)},
		{name: "suite", data: flip(partial, 7)},
		{name: "chunk size", data: flip(partial, 10)},
		{name: "nonce prefix", data: flip(partial, 15)},
		{name: "wrapped key length", data: flip(partial, 20), server: true},
		{name: "wrapped key", data: flip(partial, 30), server: true},
		{name: "first chunk body", data: flip(partial, ph+5)},
		{name: "first chunk tag", data: flip(partial, ph+rec-1)},
		{name: "last chunk body", data: flip(partial, len(partial)-20)},
		{name: "last chunk tag", data: flip(partial, len(partial)-1)},
		{name: "header only", data: partial[:ph]},
		{name: "truncated header", data: partial[:ph-1]},
		{name: "last chunk dropped", data: partial[:ph+3*rec]},
		{name: "last full chunk dropped", data: exact[:eh+2*rec]},
		{name: "last chunk cut short", data: partial[:len(partial)-1]},
		{name: "last chunk cut to its tag", data: partial[:ph+3*rec+15]},
		{name: "chunks swapped", data: swap(partial, ph, 0, 1)},
		{name: "full chunks swapped (exact)", data: swap(exact, eh, 1, 2)},
		{name: "chunk appended", data: cat(partial, partial[ph:ph+rec])},
		{name: "last chunk appended again (exact)", data: cat(exact, exact[eh+2*rec:])},
		{name: "byte appended", data: cat(partial, []byte{0})},
		{name: "byte appended (exact)", data: cat(exact, []byte{0})},
		{name: "empty", data: nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			err := env.DecryptStream(ctx, &out, bytes.NewReader(tc.data), encCtx)
			if err == nil {
				t.Fatal("tampered envelope decrypted without error")
			}
			if tc.server {
				if code := status.Code(err); code != codes.InvalidArgument && code != codes.NotFound {
					t.Fatalf("error %v, want InvalidArgument or NotFound from Decrypt", err)
				}
			} else if !errors.Is(err, client.ErrInvalidEnvelope) {
				t.Fatalf("error %v, want ErrInvalidEnvelope", err)
			}
			if pt, err := env.Decrypt(ctx, tc.data, encCtx); err == nil || pt != nil {
				t.Fatalf("Decrypt returned %d bytes, %v", len(pt), err)
			}
		})
	}

	// The originals still open.
	for _, b := range [][]byte{partial, exact} {
		if _, err := env.Decrypt(ctx, b, encCtx); err != nil {
			t.Fatalf("untouched envelope: %v", err)
		}
	}
}

func TestEnvelopeEncryptionContext(t *testing.T) {
	c := sharedClient(t)
	keyID := newAESKey(t, c)
	env := client.NewEnvelope(c)
	ctx := context.Background()
	sealed, err := env.Encrypt(ctx, keyID, []byte("payroll"), map[string]string{"dept": "hr"})
	if err != nil {
		t.Fatal(err)
	}
	for _, wrong := range []map[string]string{nil, {"dept": "it"}, {"dept": "hr", "x": "y"}} {
		if _, err := env.Decrypt(ctx, sealed, wrong); status.Code(err) != codes.InvalidArgument {
			t.Errorf("context %v: error %v, want InvalidArgument", wrong, err)
		}
	}
	if pt, err := env.Decrypt(ctx, sealed, map[string]string{"dept": "hr"}); err != nil || string(pt) != "payroll" {
		t.Fatalf("right context: %q, %v", pt, err)
	}
}

func TestEnvelopeErrors(t *testing.T) {
	c := sharedClient(t)
	ctx := context.Background()
	if err := client.NewEnvelope(c, client.WithChunkSize(10)).EncryptStream(ctx, &bytes.Buffer{}, strings.NewReader("x"), "k", nil); err == nil {
		t.Error("chunk size 10 accepted")
	}
	_, err := client.NewEnvelope(c).Encrypt(ctx, "no-such-key", []byte("x"), nil)
	if status.Code(err) != codes.NotFound {
		t.Errorf("unknown key: %v, want NotFound", err)
	}
	// A failing reader aborts encryption with its error.
	keyID := newAESKey(t, c)
	boom := errors.New("disk on fire")
	err = client.NewEnvelope(c).EncryptStream(ctx, &bytes.Buffer{}, &failingReader{n: 100 << 10, err: boom}, keyID, nil)
	if !errors.Is(err, boom) {
		t.Errorf("reader error: %v, want %v", err, boom)
	}
}

type failingReader struct {
	n   int
	err error
}

func (r *failingReader) Read(p []byte) (int, error) {
	if r.n == 0 {
		return 0, r.err
	}
	n := min(len(p), r.n)
	r.n -= n
	return n, nil
}
