package client

import (
	"context"
	"iter"

	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// Typed forms of the common KeyService methods. Each is one gRPC call with
// the client's failover, retries and deadline; Raw has every method and
// every field.

// CreateKey creates a key. req is not modified. When req.RequestId is empty
// a fresh id is set once for all attempts, so a retry after a lost answer
// returns the key created the first time instead of a second key; set it
// yourself to stay idempotent across separate CreateKey calls.
func (c *Client) CreateKey(ctx context.Context, req *cabinetpb.CreateKeyRequest) (*cabinetpb.Key, error) {
	if req.GetRequestId() == "" {
		req = proto.CloneOf(req)
		req.RequestId = NewRequestID()
	}
	resp, err := c.keys.CreateKey(ctx, req)
	if err != nil {
		return nil, err
	}
	return resp.GetKey(), nil
}

// DescribeKey returns a key's metadata by id or alias.
func (c *Client) DescribeKey(ctx context.Context, keyID string) (*cabinetpb.Key, error) {
	resp, err := c.keys.DescribeKey(ctx, &cabinetpb.DescribeKeyRequest{KeyId: keyID})
	if err != nil {
		return nil, err
	}
	return resp.GetKey(), nil
}

// listPageSize is the page size ListKeys asks for.
const listPageSize = 100

// ListKeys iterates over every key in id order, fetching pages as it goes
// (each page is one call with its own deadline). It stops at the first
// error, which it yields with a nil key.
//
//	for k, err := range c.ListKeys(ctx) {
//		if err != nil { return err }
//		fmt.Println(k.GetKeyId())
//	}
func (c *Client) ListKeys(ctx context.Context) iter.Seq2[*cabinetpb.Key, error] {
	return func(yield func(*cabinetpb.Key, error) bool) {
		token := ""
		for {
			resp, err := c.keys.ListKeys(ctx, &cabinetpb.ListKeysRequest{PageSize: listPageSize, PageToken: token})
			if err != nil {
				yield(nil, err)
				return
			}
			for _, k := range resp.GetKeys() {
				if !yield(k, nil) {
					return
				}
			}
			if token = resp.GetNextPageToken(); token == "" {
				return
			}
		}
	}
}

// ListAllKeys returns every key (all pages).
func (c *Client) ListAllKeys(ctx context.Context) ([]*cabinetpb.Key, error) {
	var out []*cabinetpb.Key
	for k, err := range c.ListKeys(ctx) {
		if err != nil {
			return nil, err
		}
		out = append(out, k)
	}
	return out, nil
}

// Encrypt seals plaintext (at most 64 KiB; use Envelope for more) under
// the key's primary version, binding encCtx (may be nil) as associated
// data. The ciphertext names the key, so Decrypt needs no key id.
func (c *Client) Encrypt(ctx context.Context, keyID string, plaintext []byte, encCtx map[string]string) ([]byte, error) {
	resp, err := c.keys.Encrypt(ctx, &cabinetpb.EncryptRequest{
		KeyId: keyID, Plaintext: plaintext, EncryptionContext: encCtx, Consistency: c.consistency,
	})
	if err != nil {
		return nil, err
	}
	return resp.GetCiphertext(), nil
}

// Decrypt opens a ciphertext made by Encrypt (or a data key made by
// GenerateDataKey) with the same encryption context. A wrong context, a
// tampered ciphertext and a wrong key all fail alike (InvalidArgument).
func (c *Client) Decrypt(ctx context.Context, ciphertext []byte, encCtx map[string]string) ([]byte, error) {
	resp, err := c.keys.Decrypt(ctx, &cabinetpb.DecryptRequest{
		Ciphertext: ciphertext, EncryptionContext: encCtx, Consistency: c.consistency,
	})
	if err != nil {
		return nil, err
	}
	return resp.GetPlaintext(), nil
}

// GenerateDataKey returns a fresh random data key of numberOfBytes bytes
// (32 when 0) in plaintext and encrypted under keyID with encCtx. Keep the
// ciphertext, use the plaintext, then clear it.
func (c *Client) GenerateDataKey(ctx context.Context, keyID string, numberOfBytes int, encCtx map[string]string) (*cabinetpb.GenerateDataKeyResponse, error) {
	return c.keys.GenerateDataKey(ctx, &cabinetpb.GenerateDataKeyRequest{
		KeyId: keyID, NumberOfBytes: int32(numberOfBytes), EncryptionContext: encCtx, Consistency: c.consistency,
	})
}

// ReEncrypt moves a ciphertext to destKeyID's primary version (the source
// key's own primary version when destKeyID is empty, e.g. after rotation),
// inside the node: the plaintext never reaches the client.
func (c *Client) ReEncrypt(ctx context.Context, ciphertext []byte, srcCtx map[string]string, destKeyID string, destCtx map[string]string) ([]byte, error) {
	resp, err := c.keys.ReEncrypt(ctx, &cabinetpb.ReEncryptRequest{
		Ciphertext: ciphertext, SourceEncryptionContext: srcCtx,
		DestinationKeyId: destKeyID, DestinationEncryptionContext: destCtx, Consistency: c.consistency,
	})
	if err != nil {
		return nil, err
	}
	return resp.GetCiphertext(), nil
}

// RotateKey adds a version to the key and makes it primary. Retries reuse
// one request id, so a retried rotation adds one version, not two.
func (c *Client) RotateKey(ctx context.Context, keyID string) (*cabinetpb.Key, error) {
	resp, err := c.keys.RotateKey(ctx, &cabinetpb.KeyRefRequest{KeyId: keyID, RequestId: NewRequestID()})
	if err != nil {
		return nil, err
	}
	return resp.GetKey(), nil
}

// Sign signs message (not a digest; use Raw with MessageType DIGEST for
// that) with a SIGN_VERIFY key's primary version. algorithm is one of
// docs/KEY-SPECS.md, e.g. "ECDSA_SHA_256", "RSASSA_PSS_SHA_256", "ED25519".
func (c *Client) Sign(ctx context.Context, keyID, algorithm string, message []byte) ([]byte, error) {
	resp, err := c.keys.Sign(ctx, &cabinetpb.SignRequest{
		KeyId: keyID, Message: message, MessageType: cabinetpb.MessageType_RAW,
		SigningAlgorithm: algorithm, Consistency: c.consistency,
	})
	if err != nil {
		return nil, err
	}
	return resp.GetSignature(), nil
}

// Verify checks a signature made by Sign against the key's primary version
// (a signature does not name its version: use Raw to check one made before
// a rotation). A bad signature is (false, nil).
func (c *Client) Verify(ctx context.Context, keyID, algorithm string, message, signature []byte) (bool, error) {
	resp, err := c.keys.Verify(ctx, &cabinetpb.VerifyRequest{
		KeyId: keyID, Message: message, MessageType: cabinetpb.MessageType_RAW,
		SigningAlgorithm: algorithm, Signature: signature, Consistency: c.consistency,
	})
	if err != nil {
		return false, err
	}
	return resp.GetValid(), nil
}

// GenerateMac computes an HMAC of message with a GENERATE_VERIFY_MAC key's
// primary version.
func (c *Client) GenerateMac(ctx context.Context, keyID string, message []byte) ([]byte, error) {
	resp, err := c.keys.GenerateMac(ctx, &cabinetpb.GenerateMacRequest{KeyId: keyID, Message: message, Consistency: c.consistency})
	if err != nil {
		return nil, err
	}
	return resp.GetMac(), nil
}

// VerifyMac checks an HMAC against the key's primary version (Raw names
// another version). A wrong MAC is (false, nil).
func (c *Client) VerifyMac(ctx context.Context, keyID string, message, mac []byte) (bool, error) {
	resp, err := c.keys.VerifyMac(ctx, &cabinetpb.VerifyMacRequest{KeyId: keyID, Message: message, Mac: mac, Consistency: c.consistency})
	if err != nil {
		return false, err
	}
	return resp.GetValid(), nil
}
