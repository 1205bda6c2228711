package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// benchCallFn makes one request as caller `caller` (each caller owns its
// request messages; callers never share a mutable message). It returns the
// number of failed items of a batch and the first item error.
type benchCallFn func(ctx context.Context, caller int) (itemErrs int, itemErr string, err error)

const (
	ceilingEcho     = "echo"      // ceiling (a): Echo with the op's request and response sizes
	ceilingRaftNoop = "raft-noop" // ceiling (b): ApplyNoop with the op's Raft command size
	ceilingBareGRPC = "bare-grpc" // the echo op's reference: a bare gRPC server in the bench process
)

type benchOpDef struct {
	name    string
	ceiling string
	// prepare creates what the operation needs (keys, ciphertexts), makes one
	// real request to learn the sizes, and returns the callers' function.
	prepare func(ctx context.Context, env *benchEnv) (*preparedOp, error)
	// custom replaces the interleaved runner (first-use).
	custom func(ctx context.Context, env *benchEnv, prog *benchProgress) benchResult
}

type preparedOp struct {
	call            benchCallFn
	items           int
	reqBytes        int
	respBytes       int
	commandBytes    int // raft-noop: the op's Raft command (envelope + payload)
	noopPadding     int // raft-noop: ApplyNoop size giving a command of commandBytes
	noopCommandSize int
	crypto          *cryptoProbe
	// ceilingOverride replaces the ceiling of the op's kind (echo op).
	ceilingOverride benchCallFn
	ceilingInfo     benchCeiling
	cleanup         func()
	// keys: distinct keys the requests spread over (report: keys).
	keys int
}

var benchOps = map[string]*benchOpDef{
	"echo":              {name: "echo", ceiling: ceilingBareGRPC, prepare: prepEcho},
	"encrypt":           {name: "encrypt", ceiling: ceilingEcho, prepare: prepEncrypt},
	"decrypt":           {name: "decrypt", ceiling: ceilingEcho, prepare: prepDecrypt},
	"generate-data-key": {name: "generate-data-key", ceiling: ceilingEcho, prepare: prepDataKey},
	"re-encrypt":        {name: "re-encrypt", ceiling: ceilingEcho, prepare: prepReEncrypt},
	"sign":              {name: "sign", ceiling: ceilingEcho, prepare: prepSign},
	"verify":            {name: "verify", ceiling: ceilingEcho, prepare: prepVerify},
	"mac":               {name: "mac", ceiling: ceilingEcho, prepare: prepMac},
	"batch-encrypt":     {name: "batch-encrypt", ceiling: ceilingEcho, prepare: prepBatchEncrypt},
	"batch-decrypt":     {name: "batch-decrypt", ceiling: ceilingEcho, prepare: prepBatchDecrypt},
	"create-key":        {name: "create-key", ceiling: ceilingRaftNoop, prepare: prepCreateKey},
	"rotate-key":        {name: "rotate-key", ceiling: ceilingRaftNoop, prepare: prepRotateKey},
	"first-use":         {name: "first-use", ceiling: "warm-use", custom: runFirstUse},
	// Only by name and with --local: never in "all" (bench_failover.go).
	"failover": {name: "failover", ceiling: "none", custom: runFailover},
}

// benchOpOrder is the order of "all" and of the help text.
var benchOpOrder = []string{"echo", "encrypt", "decrypt", "generate-data-key", "re-encrypt", "sign", "verify", "mac",
	"batch-encrypt", "batch-decrypt", "create-key", "rotate-key", "first-use"}

func benchOpNames() []string { return append([]string(nil), benchOpOrder...) }

func init() {
	if len(benchOpOrder) != len(benchOps)-1 { // all but failover
		panic("bench: benchOpOrder and benchOps disagree")
	}
}

// ---- helpers ----

func (e *benchEnv) consistency() cabinetpb.Consistency {
	if e.f.strong {
		return cabinetpb.Consistency_STRONG
	}
	return cabinetpb.Consistency_BOUNDED_STALENESS
}

func (e *benchEnv) setupCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, e.f.timeout)
}

func (e *benchEnv) description() string { return "cabinet-bench " + e.runID }

// key returns the run's setup key for a purpose, creating it once.
func (e *benchEnv) key(ctx context.Context, spec cabinetpb.KeySpec, usage cabinetpb.KeyUsage) (string, error) {
	purpose := spec.String() + "/" + usage.String()
	e.mu.Lock()
	defer e.mu.Unlock()
	if id, ok := e.keys[purpose]; ok {
		return id, nil
	}
	id, err := e.createKey(ctx, spec, usage)
	if err != nil {
		return "", err
	}
	e.keys[purpose] = id
	return id, nil
}

func (e *benchEnv) createKey(ctx context.Context, spec cabinetpb.KeySpec, usage cabinetpb.KeyUsage) (string, error) {
	c, cancel := e.setupCtx(ctx)
	defer cancel()
	resp, err := e.setupKC().CreateKey(c, &cabinetpb.CreateKeyRequest{Spec: spec, Usage: usage, Description: e.description(), RequestId: "bench-setup-" + benchRunID()})
	if err != nil {
		return "", fmt.Errorf("create a %s key: %w", spec, rpcError(err))
	}
	return resp.GetKey().GetKeyId(), nil
}

func benchRandom(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// encryptN makes n ciphertexts of random payloads under key (one batch).
func (e *benchEnv) encryptN(ctx context.Context, key string, n int) ([][]byte, error) {
	req := &cabinetpb.BatchEncryptRequest{}
	for i := 0; i < n; i++ {
		req.Items = append(req.Items, &cabinetpb.EncryptRequest{KeyId: key, Plaintext: benchRandom(e.f.payload)})
	}
	c, cancel := e.setupCtx(ctx)
	defer cancel()
	resp, err := e.setupKC().BatchEncrypt(c, req)
	if err != nil {
		return nil, fmt.Errorf("encrypt the ciphertexts to %s: %w", "decrypt", rpcError(err))
	}
	var out [][]byte
	for _, r := range resp.GetResults() {
		if r.GetError() != nil {
			return nil, fmt.Errorf("encrypt a ciphertext: %s: %s", r.GetError().GetCode(), r.GetError().GetMessage())
		}
		out = append(out, r.GetResponse().GetCiphertext())
	}
	if len(out) != n {
		return nil, fmt.Errorf("batch encrypt returned %d results for %d items", len(out), n)
	}
	return out, nil
}

// ctPool is how many distinct ciphertexts decrypt/re-encrypt cycle through.
func (e *benchEnv) ctPool() int { return min(e.f.concurrency, 64) }

// unaryOp builds a preparedOp from a request maker and an RPC. next builds
// (or returns the prebuilt) request for a caller's seq-th call; check
// inspects a response (batch item errors, verification results).
func unaryOp[Req, Resp proto.Message](ctx context.Context, env *benchEnv,
	next func(caller int, seq uint64) Req,
	do func(kc cabinetpb.KeyServiceClient, ctx context.Context, req Req, opts ...grpc.CallOption) (Resp, error),
	check func(Resp) (int, string, error),
) (*preparedOp, error) {
	n := env.f.concurrency
	seqs := make([]uint64, n) // seqs[i] is touched only by caller i
	sample := next(0, 0)
	c, cancel := env.setupCtx(ctx)
	resp, err := do(env.kcs[0], c, sample)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("first request: %w", rpcError(err))
	}
	if check != nil {
		if _, msg, err := check(resp); err != nil {
			return nil, fmt.Errorf("first request: %w", err)
		} else if msg != "" {
			return nil, fmt.Errorf("first request: item error %s", msg)
		}
	}
	p := &preparedOp{items: 1, reqBytes: proto.Size(sample), respBytes: proto.Size(resp)}
	p.call = func(ctx context.Context, caller int) (int, string, error) {
		seqs[caller]++
		resp, err := do(env.kcs[env.callerConn(caller)], ctx, next(caller, seqs[caller]))
		if err != nil {
			return 0, "", err
		}
		if check != nil {
			return check(resp)
		}
		return 0, "", nil
	}
	return p, nil
}

// perCaller prebuilds one request per caller.
func perCaller[Req any](n int, mk func(i int) Req) func(int, uint64) Req {
	reqs := make([]Req, n)
	for i := range reqs {
		reqs[i] = mk(i)
	}
	return func(caller int, _ uint64) Req { return reqs[caller] }
}

// ---- operations ----

func (e *benchEnv) aesKey(ctx context.Context) (string, error) {
	return e.key(ctx, cabinetpb.KeySpec_AES_256, cabinetpb.KeyUsage_ENCRYPT_DECRYPT)
}

func prepEncrypt(ctx context.Context, env *benchEnv) (*preparedOp, error) {
	keys, err := env.aesKeys(ctx)
	if err != nil {
		return nil, err
	}
	pt := benchRandom(env.f.payload)
	p, err := unaryOp(ctx, env, keyed(env.f.concurrency, len(keys), func(int) *cabinetpb.EncryptRequest {
		return &cabinetpb.EncryptRequest{KeyId: keys[0], Plaintext: pt, Consistency: env.consistency()}
	}, func(r *cabinetpb.EncryptRequest, i int) { r.KeyId = keys[i] }), cabinetpb.KeyServiceClient.Encrypt, nil)
	return p.withKeys(len(keys)), err
}

// withKeys records how many keys the requests spread over (nil-safe).
func (p *preparedOp) withKeys(n int) *preparedOp {
	if p != nil {
		p.keys = n
	}
	return p
}

// keyedCiphertexts returns the ciphertexts decrypt and re-encrypt cycle
// through: with --keys 1, ctPool of the one key, each caller keeping one;
// with more, one per key (up to the budget), and cts[i] is under keys[i mod
// len(keys)].
func (e *benchEnv) keyedCiphertexts(ctx context.Context) (cts [][]byte, keys int, err error) {
	ks, err := e.aesKeys(ctx)
	if err != nil {
		return nil, 0, err
	}
	n := ciphertextCount(len(ks), e.ctPool(), e.f.payload)
	cts, err = e.encryptOver(ctx, ks, n)
	return cts, distinctKeys(ks, n), err
}

func prepDecrypt(ctx context.Context, env *benchEnv) (*preparedOp, error) {
	cts, nkeys, err := env.keyedCiphertexts(ctx)
	if err != nil {
		return nil, err
	}
	want := env.f.payload
	n := 0 // --keys 1: caller i keeps ciphertext i (as before --keys)
	if env.f.keys > 1 {
		n = len(cts)
	}
	p, err := unaryOp(ctx, env, keyed(env.f.concurrency, n, func(i int) *cabinetpb.DecryptRequest {
		return &cabinetpb.DecryptRequest{Ciphertext: cts[i%len(cts)], Consistency: env.consistency()}
	}, func(r *cabinetpb.DecryptRequest, i int) { r.Ciphertext = cts[i] }), cabinetpb.KeyServiceClient.Decrypt, func(r *cabinetpb.DecryptResponse) (int, string, error) {
		if len(r.GetPlaintext()) != want {
			return 0, "", fmt.Errorf("decrypt returned %d bytes, want %d", len(r.GetPlaintext()), want)
		}
		return 0, "", nil
	})
	return p.withKeys(nkeys), err
}

func prepDataKey(ctx context.Context, env *benchEnv) (*preparedOp, error) {
	keys, err := env.aesKeys(ctx)
	if err != nil {
		return nil, err
	}
	p, err := unaryOp(ctx, env, keyed(env.f.concurrency, len(keys), func(int) *cabinetpb.GenerateDataKeyRequest {
		return &cabinetpb.GenerateDataKeyRequest{KeyId: keys[0], NumberOfBytes: 32, Consistency: env.consistency()}
	}, func(r *cabinetpb.GenerateDataKeyRequest, i int) { r.KeyId = keys[i] }), cabinetpb.KeyServiceClient.GenerateDataKey, nil)
	return p.withKeys(len(keys)), err
}

func prepReEncrypt(ctx context.Context, env *benchEnv) (*preparedOp, error) {
	cts, nkeys, err := env.keyedCiphertexts(ctx)
	if err != nil {
		return nil, err
	}
	n := 0
	if env.f.keys > 1 {
		n = len(cts)
	}
	p, err := unaryOp(ctx, env, keyed(env.f.concurrency, n, func(i int) *cabinetpb.ReEncryptRequest {
		return &cabinetpb.ReEncryptRequest{Ciphertext: cts[i%len(cts)], Consistency: env.consistency()}
	}, func(r *cabinetpb.ReEncryptRequest, i int) { r.Ciphertext = cts[i] }), cabinetpb.KeyServiceClient.ReEncrypt, nil)
	return p.withKeys(nkeys), err
}

// signSpecOf maps --spec to the key spec and signing algorithm.
func signSpecOf(s string) (cabinetpb.KeySpec, error) {
	switch strings.ToUpper(s) {
	case "EC_P256":
		return cabinetpb.KeySpec_EC_P256, nil
	case "EC_P384":
		return cabinetpb.KeySpec_EC_P384, nil
	case "ED25519":
		return cabinetpb.KeySpec_ED25519, nil
	}
	return 0, fmt.Errorf("--spec must be EC_P256, EC_P384 or ED25519, not %q", s)
}

func signAlgorithm(spec cabinetpb.KeySpec) string {
	switch spec {
	case cabinetpb.KeySpec_EC_P384:
		return "ECDSA_SHA_384"
	case cabinetpb.KeySpec_ED25519:
		return "ED25519"
	}
	return "ECDSA_SHA_256"
}

func (e *benchEnv) signKey(ctx context.Context) (string, cabinetpb.KeySpec, error) {
	spec, err := signSpecOf(e.f.spec)
	if err != nil {
		return "", 0, err
	}
	id, err := e.key(ctx, spec, cabinetpb.KeyUsage_SIGN_VERIFY)
	return id, spec, err
}

func prepSign(ctx context.Context, env *benchEnv) (*preparedOp, error) {
	key, spec, err := env.signKey(ctx)
	if err != nil {
		return nil, err
	}
	msg := benchRandom(env.f.payload)
	alg := signAlgorithm(spec)
	p, err := unaryOp(ctx, env, perCaller(env.f.concurrency, func(int) *cabinetpb.SignRequest {
		return &cabinetpb.SignRequest{KeyId: key, Message: msg, MessageType: cabinetpb.MessageType_RAW, SigningAlgorithm: alg, Consistency: env.consistency()}
	}), cabinetpb.KeyServiceClient.Sign, nil)
	if err != nil {
		return nil, err
	}
	p.keys = 1
	p.crypto, err = newCryptoProbe("sign", spec, env.f.payload)
	return p, err
}

func prepVerify(ctx context.Context, env *benchEnv) (*preparedOp, error) {
	key, spec, err := env.signKey(ctx)
	if err != nil {
		return nil, err
	}
	msg := benchRandom(env.f.payload)
	alg := signAlgorithm(spec)
	c, cancel := env.setupCtx(ctx)
	sig, err := env.setupKC().Sign(c, &cabinetpb.SignRequest{KeyId: key, Message: msg, MessageType: cabinetpb.MessageType_RAW, SigningAlgorithm: alg})
	cancel()
	if err != nil {
		return nil, fmt.Errorf("sign the message to verify: %w", rpcError(err))
	}
	p, err := unaryOp(ctx, env, perCaller(env.f.concurrency, func(int) *cabinetpb.VerifyRequest {
		return &cabinetpb.VerifyRequest{KeyId: key, Message: msg, MessageType: cabinetpb.MessageType_RAW, SigningAlgorithm: alg,
			Signature: sig.GetSignature(), Consistency: env.consistency()}
	}), cabinetpb.KeyServiceClient.Verify, func(r *cabinetpb.VerifyResponse) (int, string, error) {
		if !r.GetValid() {
			return 0, "", errors.New("verify said the signature is invalid")
		}
		return 0, "", nil
	})
	if err != nil {
		return nil, err
	}
	p.keys = 1
	p.crypto, err = newCryptoProbe("verify", spec, env.f.payload)
	return p, err
}

func prepMac(ctx context.Context, env *benchEnv) (*preparedOp, error) {
	keys, err := env.macKeys(ctx)
	if err != nil {
		return nil, err
	}
	msg := benchRandom(env.f.payload)
	p, err := unaryOp(ctx, env, keyed(env.f.concurrency, len(keys), func(int) *cabinetpb.GenerateMacRequest {
		return &cabinetpb.GenerateMacRequest{KeyId: keys[0], Message: msg, Consistency: env.consistency()}
	}, func(r *cabinetpb.GenerateMacRequest, i int) { r.KeyId = keys[i] }), cabinetpb.KeyServiceClient.GenerateMac, nil)
	return p.withKeys(len(keys)), err
}

func prepBatchEncrypt(ctx context.Context, env *benchEnv) (*preparedOp, error) {
	keys, err := env.aesKeys(ctx)
	if err != nil {
		return nil, err
	}
	pt := benchRandom(env.f.payload)
	// With --keys N, item j of a request uses key (start + j) mod N from a
	// spread start: a request spans min(batch, N) keys.
	p, err := unaryOp(ctx, env, keyed(env.f.concurrency, len(keys), func(int) *cabinetpb.BatchEncryptRequest {
		r := &cabinetpb.BatchEncryptRequest{Items: make([]*cabinetpb.EncryptRequest, env.f.batch)}
		for j := range r.Items {
			r.Items[j] = &cabinetpb.EncryptRequest{KeyId: keys[j%len(keys)], Plaintext: pt, Consistency: env.consistency()}
		}
		return r
	}, func(r *cabinetpb.BatchEncryptRequest, start int) {
		for j, it := range r.Items {
			it.KeyId = keys[(start+j)%len(keys)]
		}
	}), cabinetpb.KeyServiceClient.BatchEncrypt, func(r *cabinetpb.BatchEncryptResponse) (int, string, error) {
		n, first := 0, ""
		for _, it := range r.GetResults() {
			if e := it.GetError(); e != nil {
				if n++; first == "" {
					first = e.GetCode() + ": " + e.GetMessage()
				}
			}
		}
		return n, first, nil
	})
	if p != nil {
		p.items = env.f.batch
	}
	return p.withKeys(len(keys)), err
}

func prepBatchDecrypt(ctx context.Context, env *benchEnv) (*preparedOp, error) {
	keys, err := env.aesKeys(ctx)
	if err != nil {
		return nil, err
	}
	// --keys 1: every request decrypts the same --batch ciphertexts. More:
	// a pool of one ciphertext per key (at least --batch, within the
	// budget), and a request takes --batch consecutive ones (wrapping) from
	// a spread start.
	nct := ciphertextCount(len(keys), env.f.batch, env.f.payload)
	cts, err := env.encryptOver(ctx, keys, nct)
	if err != nil {
		return nil, err
	}
	n := 0
	if len(keys) > 1 {
		n = len(cts)
	}
	batch := env.f.batch
	p, err := unaryOp(ctx, env, keyed(env.f.concurrency, n, func(int) *cabinetpb.BatchDecryptRequest {
		r := &cabinetpb.BatchDecryptRequest{Items: make([]*cabinetpb.DecryptRequest, batch)}
		for j := range r.Items {
			r.Items[j] = &cabinetpb.DecryptRequest{Ciphertext: cts[j], Consistency: env.consistency()}
		}
		return r
	}, func(r *cabinetpb.BatchDecryptRequest, start int) {
		for j, it := range r.Items {
			it.Ciphertext = cts[(start+j)%len(cts)]
		}
	}), cabinetpb.KeyServiceClient.BatchDecrypt, func(r *cabinetpb.BatchDecryptResponse) (int, string, error) {
		n, first := 0, ""
		for _, it := range r.GetResults() {
			if e := it.GetError(); e != nil {
				if n++; first == "" {
					first = e.GetCode() + ": " + e.GetMessage()
				}
			}
		}
		return n, first, nil
	})
	if p != nil {
		p.items = env.f.batch
	}
	return p.withKeys(distinctKeys(keys, nct)), err
}

// requestIDFor is a fresh idempotency key per write, as a client library
// would send (the server scopes it to the principal).
func (e *benchEnv) requestIDFor(caller int, seq uint64) string {
	return "bench-" + e.runID + "-" + strconv.Itoa(caller) + "-" + strconv.FormatUint(seq, 10)
}

func prepCreateKey(ctx context.Context, env *benchEnv) (*preparedOp, error) {
	desc := env.description()
	p, err := unaryOp(ctx, env, func(caller int, seq uint64) *cabinetpb.CreateKeyRequest {
		return &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, Description: desc, RequestId: env.requestIDFor(caller, seq)}
	}, cabinetpb.KeyServiceClient.CreateKey, nil)
	if err != nil {
		return nil, err
	}
	payload := &fsmpb.CreateKey{
		KeyId:       "k-" + strings.Repeat("a", 26),
		Spec:        fsmpb.KeySpec_KEY_SPEC_AES_256,
		Description: desc,
		Material:    &fsmpb.WrappedBlob{KekVersion: 1, Blob: make([]byte, aesSealedBytes)},
	}
	p.setNoop(env, fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, payload, env.requestIDFor(env.f.concurrency-1, 99999))
	return p, nil
}

// aesSealedBytes is an AES-256 version's material sealed under the KEK by
// the HSM: 12-byte IV || 32-byte key || 16-byte GCM tag.
const aesSealedBytes = 12 + 32 + 16

func prepRotateKey(ctx context.Context, env *benchEnv) (*preparedOp, error) {
	// One key per caller: concurrent rotations of one key would conflict
	// on the version number (and measure retries, not rotations).
	n := env.f.concurrency
	keys := make([]string, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 16)
	for i := range keys {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			id, err := env.createKey(ctx, cabinetpb.KeySpec_AES_256, cabinetpb.KeyUsage_ENCRYPT_DECRYPT)
			if err != nil {
				errs <- err
				return
			}
			keys[i] = id
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return nil, err
	}
	p, err := unaryOp(ctx, env, func(caller int, seq uint64) *cabinetpb.KeyRefRequest {
		return &cabinetpb.KeyRefRequest{KeyId: keys[caller], RequestId: env.requestIDFor(caller, seq)}
	}, cabinetpb.KeyServiceClient.RotateKey, nil)
	if err != nil {
		return nil, err
	}
	payload := &fsmpb.RotateKey{
		KeyId:    keys[0],
		Version:  100,
		Material: &fsmpb.WrappedBlob{KekVersion: 1, Blob: make([]byte, aesSealedBytes)},
	}
	p.setNoop(env, fsmpb.CommandType_COMMAND_TYPE_ROTATE_KEY, payload, env.requestIDFor(env.f.concurrency-1, 99999))
	p.keys = n
	return p, nil
}

// setNoop sizes ceiling (b): the Raft command the operation proposes (the
// envelope as fsm.NewCommand builds it, stamped by the leader) and the
// ApplyNoop padding that makes a no-op command of the same size.
func (p *preparedOp) setNoop(env *benchEnv, typ fsmpb.CommandType, payload proto.Message, reqID string) {
	data, _ := proto.MarshalOptions{Deterministic: true}.Marshal(payload)
	stamp := time.Now().UnixNano()
	cmdSize := proto.Size(&fsmpb.Command{Format: fsm.CommandFormat, Type: typ, LeaderTimeUnixNano: stamp,
		RequestId: env.principal + "/" + reqID, Principal: env.principal, Payload: data})
	noopCmd := func(n int) int {
		d, _ := proto.Marshal(&fsmpb.Noop{Padding: make([]byte, n)})
		return proto.Size(&fsmpb.Command{Format: fsm.CommandFormat, Type: fsmpb.CommandType_COMMAND_TYPE_NOOP, LeaderTimeUnixNano: stamp,
			Principal: env.principal, Payload: d})
	}
	pad := sort.Search(cmdSize+1, func(n int) bool { return noopCmd(n) > cmdSize })
	if pad > 0 {
		pad--
	}
	p.commandBytes, p.noopPadding, p.noopCommandSize = cmdSize, pad, noopCmd(pad)
}

// ---- ceilings ----

// echoSizes finds the Echo payload and response_size whose messages are as
// large as the operation's request and response (never larger).
func echoSizes(reqBytes, respBytes int) (payload, respSize int) {
	respSize = sort.Search(respBytes+1, func(n int) bool {
		return proto.Size(&cabinetpb.EchoResponse{Payload: make([]byte, n)}) > respBytes
	}) - 1
	if respSize < 1 {
		respSize = 1 // 0 would mean "echo the payload"
	}
	payload = sort.Search(reqBytes+1, func(n int) bool {
		return proto.Size(&cabinetpb.EchoRequest{Payload: make([]byte, n), ResponseSize: int32(respSize)}) > reqBytes
	}) - 1
	return max(payload, 0), respSize
}

// ceilingCall returns ceiling (a) or (b) for a prepared operation, after one
// request to check it is allowed.
func ceilingCall(ctx context.Context, env *benchEnv, kind string, p *preparedOp) (benchCallFn, benchCeiling, error) {
	info := benchCeiling{Kind: kind}
	n := env.f.concurrency
	var call benchCallFn
	switch {
	case p.ceilingOverride != nil:
		call, info = p.ceilingOverride, p.ceilingInfo
	case kind == ceilingEcho:
		pl, rs := echoSizes(p.reqBytes, p.respBytes)
		reqs := make([]*cabinetpb.EchoRequest, n)
		body := benchRandom(pl)
		for i := range reqs {
			reqs[i] = &cabinetpb.EchoRequest{Payload: body, ResponseSize: int32(rs)}
		}
		info.RequestBytes = proto.Size(reqs[0])
		info.ResponseBytes = proto.Size(&cabinetpb.EchoResponse{Payload: make([]byte, rs)})
		call = func(ctx context.Context, caller int) (int, string, error) {
			r, err := env.ocs[env.callerConn(caller)].Echo(ctx, reqs[caller])
			if err == nil && len(r.GetPayload()) != rs {
				err = fmt.Errorf("echo returned %d bytes, want %d", len(r.GetPayload()), rs)
			}
			return 0, "", err
		}
	case kind == ceilingRaftNoop:
		req := &cabinetpb.ApplyNoopRequest{Size: int32(p.noopPadding)}
		reqs := make([]*cabinetpb.ApplyNoopRequest, n)
		for i := range reqs {
			reqs[i] = proto.Clone(req).(*cabinetpb.ApplyNoopRequest)
		}
		info.RequestBytes = proto.Size(req)
		info.ResponseBytes = proto.Size(&cabinetpb.ApplyNoopResponse{Index: 1 << 20})
		info.CommandBytes = p.noopCommandSize
		info.NoopPaddingBytes = p.noopPadding
		call = func(ctx context.Context, caller int) (int, string, error) {
			_, err := env.ocs[env.callerConn(caller)].ApplyNoop(ctx, reqs[caller])
			return 0, "", err
		}
	default:
		return nil, info, fmt.Errorf("unknown ceiling %q", kind)
	}
	c, cancel := env.setupCtx(ctx)
	defer cancel()
	if _, _, err := call(c, 0); err != nil {
		return nil, info, fmt.Errorf("ceiling %s: first request: %w", kind, rpcError(err))
	}
	return call, info, nil
}
