package transport

import (
	"context"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/keyops"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

// MaxBatchItems bounds every batch request.
const MaxBatchItems = 1000

// checkOverride allows the COMPROMISED-key recovery override only to admins.
func checkOverride(ctx context.Context, allow bool) error {
	if !allow {
		return nil
	}
	if id, ok := IdentityFrom(ctx); ok && id.Role == tlsutil.RoleAdmin {
		return nil
	}
	return status.Error(codes.PermissionDenied, "allow_compromised is an admin-only recovery override")
}

func isRSA(spec fsmpb.KeySpec) bool {
	return spec == fsmpb.KeySpec_KEY_SPEC_RSA_2048 || spec == fsmpb.KeySpec_KEY_SPEC_RSA_3072 || spec == fsmpb.KeySpec_KEY_SPEC_RSA_4096
}

func (s *Server) Encrypt(ctx context.Context, req *cabinetpb.EncryptRequest) (*cabinetpb.EncryptResponse, error) {
	if err := s.readyForCrypto(ctx, req.GetConsistency()); err != nil {
		return nil, err
	}
	k, err := s.lookupKey(ctx, req.GetKeyId())
	if err != nil {
		return nil, err
	}
	if err := s.authorizeKey(ctx, k, req.GetEncryptionContext(), fsmpb.GrantOperation_GRANT_OPERATION_ENCRYPT); err != nil {
		return nil, err
	}
	if isRSA(k.GetSpec()) {
		return s.encryptAsymmetric(ctx, k, req)
	}
	ct, v, err := s.cfg.Crypto.Encrypt(ctx, k, req.GetPlaintext(), req.GetEncryptionContext())
	if err != nil {
		return nil, toStatus(err)
	}
	noteKey(ctx, k.GetKeyId(), v)
	return &cabinetpb.EncryptResponse{Ciphertext: ct, KeyId: k.GetKeyId(), KeyVersion: v}, nil
}

// encryptAsymmetric is Encrypt for an RSA key, after the checks.
func (s *Server) encryptAsymmetric(ctx context.Context, k *fsmpb.KeyRecord, req *cabinetpb.EncryptRequest) (*cabinetpb.EncryptResponse, error) {
	if len(req.GetEncryptionContext()) > 0 {
		return nil, status.Error(codes.InvalidArgument, "RSA keys encrypt with RSAES_OAEP_SHA_256, which has no encryption context; omit it")
	}
	ct, v, err := s.cfg.Crypto.EncryptAsymmetric(ctx, k, 0, req.GetPlaintext())
	if err != nil {
		return nil, toStatus(err)
	}
	noteKey(ctx, k.GetKeyId(), v)
	return &cabinetpb.EncryptResponse{Ciphertext: ct, KeyId: k.GetKeyId(), KeyVersion: v}, nil
}

func (s *Server) Decrypt(ctx context.Context, req *cabinetpb.DecryptRequest) (*cabinetpb.DecryptResponse, error) {
	if err := s.readyForCrypto(ctx, req.GetConsistency()); err != nil {
		return nil, err
	}
	if err := checkOverride(ctx, req.GetAllowCompromised()); err != nil {
		return nil, err
	}
	if req.GetKeyId() != "" {
		k, err := s.lookupKey(ctx, req.GetKeyId())
		if err != nil {
			return nil, err
		}
		if isRSA(k.GetSpec()) {
			if err := s.authorizeKey(ctx, k, nil, fsmpb.GrantOperation_GRANT_OPERATION_DECRYPT); err != nil {
				return nil, err
			}
			v := req.GetKeyVersion()
			if v == 0 {
				v = k.GetPrimaryVersion()
			}
			pt, err := s.cfg.Crypto.DecryptAsymmetric(ctx, k, v, req.GetCiphertext(), req.GetAllowCompromised())
			if err != nil {
				return nil, toStatus(err)
			}
			return &cabinetpb.DecryptResponse{Plaintext: pt, KeyId: k.GetKeyId(), KeyVersion: v}, nil
		}
	}
	h, err := keyops.ParseCiphertext(req.GetCiphertext())
	if err != nil {
		return nil, toStatus(err)
	}
	hk, err := s.lookupKey(ctx, h.KeyID)
	if err != nil {
		return nil, err
	}
	if err := s.authorizeKey(ctx, hk, req.GetEncryptionContext(), fsmpb.GrantOperation_GRANT_OPERATION_DECRYPT); err != nil {
		return nil, err
	}
	lookup := func(id string) (*fsmpb.KeyRecord, bool) { return s.findKey(ctx, id) }
	pt, id, v, err := s.cfg.Crypto.Decrypt(ctx, lookup, req.GetCiphertext(), req.GetEncryptionContext(), req.GetAllowCompromised())
	if err != nil {
		return nil, toStatus(err)
	}
	if req.GetKeyId() != "" {
		if k, ok := s.findKey(ctx, req.GetKeyId()); !ok || k.GetKeyId() != id {
			return nil, status.Error(codes.InvalidArgument, "the ciphertext was not made with the key named in key_id")
		}
	}
	noteKey(ctx, id, v)
	return &cabinetpb.DecryptResponse{Plaintext: pt, KeyId: id, KeyVersion: v}, nil
}

func (s *Server) generateDataKey(ctx context.Context, req *cabinetpb.GenerateDataKeyRequest) ([]byte, []byte, *fsmpb.KeyRecord, uint32, error) {
	if err := s.readyForCrypto(ctx, req.GetConsistency()); err != nil {
		return nil, nil, nil, 0, err
	}
	k, err := s.lookupKey(ctx, req.GetKeyId())
	if err != nil {
		return nil, nil, nil, 0, err
	}
	if err := s.authorizeKey(ctx, k, req.GetEncryptionContext(), fsmpb.GrantOperation_GRANT_OPERATION_GENERATE_DATA_KEY); err != nil {
		return nil, nil, nil, 0, err
	}
	n := int(req.GetNumberOfBytes())
	if n < 0 || n > 1024 {
		return nil, nil, nil, 0, status.Error(codes.InvalidArgument, "number_of_bytes must be between 1 and 1024 (0 means 32)")
	}
	pt, ct, v, err := s.cfg.Crypto.GenerateDataKey(ctx, k, n, req.GetEncryptionContext())
	if err != nil {
		return nil, nil, nil, 0, toStatus(err)
	}
	return pt, ct, k, v, nil
}

func (s *Server) GenerateDataKey(ctx context.Context, req *cabinetpb.GenerateDataKeyRequest) (*cabinetpb.GenerateDataKeyResponse, error) {
	pt, ct, k, v, err := s.generateDataKey(ctx, req)
	if err != nil {
		return nil, err
	}
	return &cabinetpb.GenerateDataKeyResponse{Plaintext: pt, Ciphertext: ct, KeyId: k.GetKeyId(), KeyVersion: v}, nil
}

func (s *Server) GenerateDataKeyWithoutPlaintext(ctx context.Context, req *cabinetpb.GenerateDataKeyRequest) (*cabinetpb.GenerateDataKeyWithoutPlaintextResponse, error) {
	pt, ct, k, v, err := s.generateDataKey(ctx, req)
	if err != nil {
		return nil, err
	}
	clear(pt)
	return &cabinetpb.GenerateDataKeyWithoutPlaintextResponse{Ciphertext: ct, KeyId: k.GetKeyId(), KeyVersion: v}, nil
}

func (s *Server) ReEncrypt(ctx context.Context, req *cabinetpb.ReEncryptRequest) (*cabinetpb.ReEncryptResponse, error) {
	if err := s.readyForCrypto(ctx, req.GetConsistency()); err != nil {
		return nil, err
	}
	if err := checkOverride(ctx, req.GetAllowCompromised()); err != nil {
		return nil, err
	}
	h, err := keyops.ParseCiphertext(req.GetCiphertext())
	if err != nil {
		return nil, toStatus(err)
	}
	sk, err := s.lookupKey(ctx, h.KeyID)
	if err != nil {
		return nil, err
	}
	if err := s.authorizeKey(ctx, sk, req.GetSourceEncryptionContext(), fsmpb.GrantOperation_GRANT_OPERATION_RE_ENCRYPT); err != nil {
		return nil, err
	}
	dest := req.GetDestinationKeyId()
	if dest == "" {
		dest = h.KeyID
	}
	dk, err := s.lookupKey(ctx, dest)
	if err != nil {
		return nil, err
	}
	if err := s.authorizeKey(ctx, dk, req.GetDestinationEncryptionContext(), fsmpb.GrantOperation_GRANT_OPERATION_RE_ENCRYPT); err != nil {
		return nil, err
	}
	lookup := func(id string) (*fsmpb.KeyRecord, bool) { return s.findKey(ctx, id) }
	ct, srcID, srcV, dstV, err := s.cfg.Crypto.ReEncrypt(ctx, lookup, req.GetCiphertext(), req.GetSourceEncryptionContext(),
		dk, req.GetDestinationEncryptionContext(), req.GetAllowCompromised())
	if err != nil {
		return nil, toStatus(err)
	}
	return &cabinetpb.ReEncryptResponse{Ciphertext: ct, SourceKeyId: srcID, SourceKeyVersion: srcV, KeyId: dk.GetKeyId(), KeyVersion: dstV}, nil
}

func itemError(err error) *cabinetpb.ItemError {
	st := status.Convert(err)
	return &cabinetpb.ItemError{Code: st.Code().String(), Message: st.Message()}
}

func checkBatch(n int) error {
	if n == 0 || n > MaxBatchItems {
		return status.Errorf(codes.InvalidArgument, "a batch holds 1 to %d items, not %d", MaxBatchItems, n)
	}
	return nil
}

// runBatch calls one handler per item and turns each outcome into a
// per-item result: one bad item never fails the rest.
func runBatch[Req, Resp, Res any](ctx context.Context, items []Req, call func(context.Context, Req) (Resp, error), result func(Resp, *cabinetpb.ItemError) Res) ([]Res, error) {
	if err := checkBatch(len(items)); err != nil {
		return nil, err
	}
	out := make([]Res, len(items))
	for i, it := range items {
		r, err := call(ctx, it)
		if err != nil {
			var zero Resp
			out[i] = result(zero, itemError(err))
			continue
		}
		out[i] = result(r, nil)
	}
	return out, nil
}

// batchEncrypter is implemented by *keyops.Engine; a Crypto without it
// gets one Encrypt call per item.
type batchEncrypter interface {
	EncryptBatch(ctx context.Context, items []keyops.EncryptItem)
}

// batchPrep remembers, for one batch request, what does not depend on the
// item: the readiness gate per consistency level and the key each id or
// alias resolves to (or the error), so 100 items of one key cost one
// readiness check and one state lookup. Authorization stays per item: it
// depends on each item's encryption context.
type batchPrep struct {
	s      *Server
	ctx    context.Context
	ready  []readyResult
	keys   map[string]keyResult
	lastID string
	last   keyResult
}

type readyResult struct {
	c   cabinetpb.Consistency
	err error
}

type keyResult struct {
	k   *fsmpb.KeyRecord
	err error
}

func (b *batchPrep) readyFor(c cabinetpb.Consistency) error {
	for _, r := range b.ready {
		if r.c == c {
			return r.err
		}
	}
	err := b.s.readyForCrypto(b.ctx, c)
	b.ready = append(b.ready, readyResult{c, err})
	return err
}

func (b *batchPrep) lookup(idOrAlias string) (*fsmpb.KeyRecord, error) {
	if b.keys != nil && idOrAlias == b.lastID {
		return b.last.k, b.last.err
	}
	r, ok := b.keys[idOrAlias]
	if !ok {
		if b.keys == nil {
			b.keys = make(map[string]keyResult, 1)
		}
		r.k, r.err = b.s.lookupKey(b.ctx, idOrAlias)
		b.keys[idOrAlias] = r
	}
	b.lastID, b.last = idOrAlias, r
	return r.k, r.err
}

// BatchEncrypt encrypts each item as Encrypt would, with per-item results.
// The readiness gate and key lookups are done once per batch (per
// consistency level and per key), and the AES_256 items go to keyops in one
// EncryptBatch call; each item's checks, authorization and errors are
// those of Encrypt. Their ciphertexts are in format 2 (batch,
// docs/CIPHERTEXT.md): one salt per request, one derived key per key
// version, and the item's position in the request as its index. Decrypt,
// BatchDecrypt and ReEncrypt take them like any other.
func (s *Server) BatchEncrypt(ctx context.Context, req *cabinetpb.BatchEncryptRequest) (*cabinetpb.BatchEncryptResponse, error) {
	be, ok := s.cfg.Crypto.(batchEncrypter)
	// Format 2 only when every member can open it (a node of an older
	// release cannot): until then one format-1 Encrypt per item.
	if !ok || !s.featureReady(fsm.FeatureKEKRotation) {
		res, err := runBatch(ctx, req.GetItems(), s.Encrypt, func(r *cabinetpb.EncryptResponse, e *cabinetpb.ItemError) *cabinetpb.BatchEncryptResult {
			return &cabinetpb.BatchEncryptResult{Response: r, Error: e}
		})
		if err != nil {
			return nil, err
		}
		return &cabinetpb.BatchEncryptResponse{Results: res}, nil
	}
	items := req.GetItems()
	if err := checkBatch(len(items)); err != nil {
		return nil, err
	}
	out := make([]*cabinetpb.BatchEncryptResult, len(items))
	fail := func(i int, err error) { out[i] = &cabinetpb.BatchEncryptResult{Error: itemError(err)} }
	prep := &batchPrep{s: s, ctx: ctx}
	work := make([]keyops.EncryptItem, 0, len(items))
	index := make([]int, 0, len(items))
	for i, it := range items {
		if err := prep.readyFor(it.GetConsistency()); err != nil {
			fail(i, err)
			continue
		}
		k, err := prep.lookup(it.GetKeyId())
		if err != nil {
			fail(i, err)
			continue
		}
		if err := s.authorizeKey(ctx, k, it.GetEncryptionContext(), fsmpb.GrantOperation_GRANT_OPERATION_ENCRYPT); err != nil {
			fail(i, err)
			continue
		}
		if isRSA(k.GetSpec()) {
			r, err := s.encryptAsymmetric(ctx, k, it)
			if err != nil {
				fail(i, err)
				continue
			}
			out[i] = &cabinetpb.BatchEncryptResult{Response: r}
			continue
		}
		work = append(work, keyops.EncryptItem{Key: k, Plaintext: it.GetPlaintext(), Context: it.GetEncryptionContext(), Index: uint32(i)})
		index = append(index, i)
	}
	if len(work) > 0 {
		be.EncryptBatch(ctx, work)
	}
	resps := make([]cabinetpb.EncryptResponse, len(work))
	results := make([]cabinetpb.BatchEncryptResult, len(work))
	for j := range work {
		w, i := &work[j], index[j]
		if w.Err != nil {
			fail(i, toStatus(w.Err))
			continue
		}
		id := w.Key.GetKeyId()
		noteKey(ctx, id, w.Version)
		resps[j] = cabinetpb.EncryptResponse{Ciphertext: w.Ciphertext, KeyId: id, KeyVersion: w.Version}
		results[j].Response = &resps[j]
		out[i] = &results[j]
	}
	return &cabinetpb.BatchEncryptResponse{Results: out}, nil
}

func (s *Server) BatchDecrypt(ctx context.Context, req *cabinetpb.BatchDecryptRequest) (*cabinetpb.BatchDecryptResponse, error) {
	res, err := runBatch(ctx, req.GetItems(), s.Decrypt, func(r *cabinetpb.DecryptResponse, e *cabinetpb.ItemError) *cabinetpb.BatchDecryptResult {
		return &cabinetpb.BatchDecryptResult{Response: r, Error: e}
	})
	if err != nil {
		return nil, err
	}
	return &cabinetpb.BatchDecryptResponse{Results: res}, nil
}

func (s *Server) BatchReEncrypt(ctx context.Context, req *cabinetpb.BatchReEncryptRequest) (*cabinetpb.BatchReEncryptResponse, error) {
	res, err := runBatch(ctx, req.GetItems(), s.ReEncrypt, func(r *cabinetpb.ReEncryptResponse, e *cabinetpb.ItemError) *cabinetpb.BatchReEncryptResult {
		return &cabinetpb.BatchReEncryptResult{Response: r, Error: e}
	})
	if err != nil {
		return nil, err
	}
	return &cabinetpb.BatchReEncryptResponse{Results: res}, nil
}

func parseSigning(alg string, mt cabinetpb.MessageType) (keyops.SigningAlgorithm, keyops.MessageType, error) {
	a, err := keyops.ParseSigningAlgorithm(alg)
	if err != nil {
		return 0, 0, status.Error(codes.InvalidArgument, err.Error())
	}
	m := keyops.MessageRaw
	if mt == cabinetpb.MessageType_DIGEST {
		m = keyops.MessageDigest
	}
	return a, m, nil
}

func (s *Server) Sign(ctx context.Context, req *cabinetpb.SignRequest) (*cabinetpb.SignResponse, error) {
	if err := s.readyForCrypto(ctx, req.GetConsistency()); err != nil {
		return nil, err
	}
	k, err := s.lookupKey(ctx, req.GetKeyId())
	if err != nil {
		return nil, err
	}
	if err := s.authorizeKey(ctx, k, nil, fsmpb.GrantOperation_GRANT_OPERATION_SIGN); err != nil {
		return nil, err
	}
	alg, mt, err := parseSigning(req.GetSigningAlgorithm(), req.GetMessageType())
	if err != nil {
		return nil, err
	}
	sig, v, err := s.cfg.Crypto.Sign(ctx, k, req.GetMessage(), mt, alg)
	if err != nil {
		return nil, toStatus(err)
	}
	return &cabinetpb.SignResponse{Signature: sig, KeyId: k.GetKeyId(), KeyVersion: v, SigningAlgorithm: alg.String()}, nil
}

func (s *Server) Verify(ctx context.Context, req *cabinetpb.VerifyRequest) (*cabinetpb.VerifyResponse, error) {
	if err := s.readyForCrypto(ctx, req.GetConsistency()); err != nil {
		return nil, err
	}
	if err := checkOverride(ctx, req.GetAllowCompromised()); err != nil {
		return nil, err
	}
	k, err := s.lookupKey(ctx, req.GetKeyId())
	if err != nil {
		return nil, err
	}
	if err := s.authorizeKey(ctx, k, nil, fsmpb.GrantOperation_GRANT_OPERATION_VERIFY); err != nil {
		return nil, err
	}
	alg, mt, err := parseSigning(req.GetSigningAlgorithm(), req.GetMessageType())
	if err != nil {
		return nil, err
	}
	v := req.GetKeyVersion()
	if v == 0 {
		v = k.GetPrimaryVersion()
	}
	ok, err := s.cfg.Crypto.Verify(ctx, k, v, req.GetMessage(), mt, alg, req.GetSignature(), req.GetAllowCompromised())
	if err != nil {
		return nil, toStatus(err)
	}
	return &cabinetpb.VerifyResponse{Valid: ok, KeyId: k.GetKeyId(), KeyVersion: v}, nil
}

// signingAlgorithms lists what a key can sign with (for GetPublicKey).
func signingAlgorithms(spec fsmpb.KeySpec) []string {
	switch {
	case isRSA(spec):
		return []string{"RSASSA_PSS_SHA_256", "RSASSA_PSS_SHA_384", "RSASSA_PSS_SHA_512",
			"RSASSA_PKCS1_V1_5_SHA_256", "RSASSA_PKCS1_V1_5_SHA_384", "RSASSA_PKCS1_V1_5_SHA_512"}
	case spec == fsmpb.KeySpec_KEY_SPEC_EC_P256:
		return []string{"ECDSA_SHA_256"}
	case spec == fsmpb.KeySpec_KEY_SPEC_EC_P384:
		return []string{"ECDSA_SHA_384"}
	case spec == fsmpb.KeySpec_KEY_SPEC_ED25519:
		return []string{"ED25519"}
	}
	return nil
}

func (s *Server) GetPublicKey(ctx context.Context, req *cabinetpb.GetPublicKeyRequest) (*cabinetpb.GetPublicKeyResponse, error) {
	k, err := s.lookupKey(ctx, req.GetKeyId())
	if err != nil {
		return nil, err
	}
	if err := s.authorizeKey(ctx, k, nil, fsmpb.GrantOperation_GRANT_OPERATION_DESCRIBE, fsmpb.GrantOperation_GRANT_OPERATION_VERIFY); err != nil {
		return nil, err
	}
	v := req.GetKeyVersion()
	if v == 0 {
		v = k.GetPrimaryVersion()
	}
	der, err := keyops.PublicKey(k, v)
	if err != nil {
		return nil, toStatus(err)
	}
	out := &cabinetpb.GetPublicKeyResponse{KeyId: k.GetKeyId(), KeyVersion: v, PublicKeyDer: der, PublicKeyPem: pemPublicKey(der),
		Spec: cabinetpb.KeySpec(k.GetSpec()), Usage: cabinetpb.KeyUsage(k.GetUsage())}
	switch k.GetUsage() {
	case fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY:
		out.SigningAlgorithms = signingAlgorithms(k.GetSpec())
	case fsmpb.KeyUsage_KEY_USAGE_ENCRYPT_DECRYPT:
		out.EncryptionAlgorithms = []string{"RSAES_OAEP_SHA_256"}
	}
	return out, nil
}

func (s *Server) GenerateMac(ctx context.Context, req *cabinetpb.GenerateMacRequest) (*cabinetpb.GenerateMacResponse, error) {
	if err := s.readyForCrypto(ctx, req.GetConsistency()); err != nil {
		return nil, err
	}
	k, err := s.lookupKey(ctx, req.GetKeyId())
	if err != nil {
		return nil, err
	}
	if err := s.authorizeKey(ctx, k, nil, fsmpb.GrantOperation_GRANT_OPERATION_GENERATE_MAC); err != nil {
		return nil, err
	}
	mac, v, err := s.cfg.Crypto.GenerateMac(ctx, k, req.GetMessage())
	if err != nil {
		return nil, toStatus(err)
	}
	return &cabinetpb.GenerateMacResponse{Mac: mac, KeyId: k.GetKeyId(), KeyVersion: v}, nil
}

func (s *Server) VerifyMac(ctx context.Context, req *cabinetpb.VerifyMacRequest) (*cabinetpb.VerifyMacResponse, error) {
	if err := s.readyForCrypto(ctx, req.GetConsistency()); err != nil {
		return nil, err
	}
	if err := checkOverride(ctx, req.GetAllowCompromised()); err != nil {
		return nil, err
	}
	k, err := s.lookupKey(ctx, req.GetKeyId())
	if err != nil {
		return nil, err
	}
	if err := s.authorizeKey(ctx, k, nil, fsmpb.GrantOperation_GRANT_OPERATION_VERIFY_MAC); err != nil {
		return nil, err
	}
	v := req.GetKeyVersion()
	if v == 0 {
		v = k.GetPrimaryVersion()
	}
	ok, err := s.cfg.Crypto.VerifyMac(ctx, k, v, req.GetMessage(), req.GetMac(), req.GetAllowCompromised())
	if err != nil {
		return nil, toStatus(err)
	}
	return &cabinetpb.VerifyMacResponse{Valid: ok, KeyId: k.GetKeyId(), KeyVersion: v}, nil
}

func (s *Server) GenerateRandom(ctx context.Context, req *cabinetpb.GenerateRandomRequest) (*cabinetpb.GenerateRandomResponse, error) {
	n := int(req.GetNumberOfBytes())
	if n < 1 || n > 1024 {
		return nil, status.Error(codes.InvalidArgument, "number_of_bytes must be between 1 and 1024")
	}
	b, err := s.cfg.HSM.GenerateRandom(ctx, n)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "this node's HSM could not generate random bytes: %v", err)
	}
	return &cabinetpb.GenerateRandomResponse{Random: b}, nil
}
