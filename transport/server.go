// Package transport is Cabinet's edge: the gRPC services, mTLS, the
// authentication/authorization interceptors, error mapping, and the
// node-to-node clients used for forwarding.
package transport

import (
	"context"
	"crypto/rsa"
	"crypto/subtle"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"regexp"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/keyops"
	"github.com/cabinet-kms/cabinet/transport/audit"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

// Cluster is what the API needs from the Raft node (cluster.Node).
type Cluster interface {
	Propose(ctx context.Context, cmd *fsmpb.Command) (*fsmpb.Result, error)
	ApplyForwarded(ctx context.Context, data []byte) (*fsmpb.Result, uint64, error)
	ReadIndexLocal(ctx context.Context) (uint64, error)
	CheckRead(ctx context.Context, strong bool) error
	AddVoter(ctx context.Context, id, raftAddr string) error
	Status() cluster.Status
	Servers() ([]cluster.Server, error)
	Leader() (id, apiAddr string)
	IsLeader() bool
}

// State is the read side of the replicated state (fsm.FSM).
type State interface {
	Key(idOrAlias string) (*fsmpb.KeyRecord, bool)
	ListKeys(afterID string, limit int) []*fsmpb.KeyRecord
	KeyCount() int
	Cluster() *fsmpb.ClusterInfo
	Node(id string) (*fsmpb.NodeRecord, bool)
	Nodes() []*fsmpb.NodeRecord
	JoinToken(id string) (*fsmpb.JoinToken, bool)
	// Halted is non-nil when this node met a command it cannot apply (it
	// is too old): it must not serve.
	Halted() error
	ImportToken(id string) (*fsmpb.ImportToken, bool)
	GrantsFor(keyID, principal string) []*fsmpb.Grant
	Grants(keyID, principal string) []*fsmpb.Grant
	Grant(id string) (*fsmpb.Grant, bool)
	Denied(principal string) (*fsmpb.DeniedPrincipal, bool)
	DeniedPrincipals() []*fsmpb.DeniedPrincipal
	DueRotations(now int64, limit int) []*fsmpb.KeyRecord
	DueDestructions(now int64, limit int) []*fsmpb.KeyRecord
	// KEK rotation (kek.go).
	KEKProgress() fsm.KEKProgress
	MaterialUnderKEK(kek uint32, afterID string, limit, scan int) ([]fsm.SealedMaterial, string)
	ImportTokensUnderKEK(kek uint32) []*fsmpb.ImportToken
	// Rolling upgrades (features.go).
	MinFeatureLevel() (uint32, []string)
}

// Crypto is what the API needs from keyops (*keyops.Engine).
type Crypto interface {
	WrapNewMaterial(ctx context.Context, keyID string, version uint32, spec fsmpb.KeySpec, kekVersion uint32) (*fsmpb.WrappedBlob, []byte, error)
	SealImportedMaterial(ctx context.Context, keyID string, version uint32, spec fsmpb.KeySpec, kekVersion uint32, material []byte) (*fsmpb.WrappedBlob, []byte, error)
	NewImportKeyPair(ctx context.Context, tokenID string, kekVersion uint32) ([]byte, *fsmpb.WrappedBlob, error)
	UnwrapImportedMaterial(ctx context.Context, tokenID string, sealed *fsmpb.WrappedBlob, wrapped []byte) ([]byte, error)
	Encrypt(ctx context.Context, key *fsmpb.KeyRecord, plaintext []byte, encCtx map[string]string) ([]byte, uint32, error)
	Decrypt(ctx context.Context, lookup func(string) (*fsmpb.KeyRecord, bool), ciphertext []byte, encCtx map[string]string, allowCompromised bool) ([]byte, string, uint32, error)
	GenerateDataKey(ctx context.Context, key *fsmpb.KeyRecord, n int, encCtx map[string]string) ([]byte, []byte, uint32, error)
	ReEncrypt(ctx context.Context, lookup func(string) (*fsmpb.KeyRecord, bool), ciphertext []byte, srcCtx map[string]string, destKey *fsmpb.KeyRecord, destCtx map[string]string, allowCompromised bool) ([]byte, string, uint32, uint32, error)
	Sign(ctx context.Context, key *fsmpb.KeyRecord, msg []byte, mt keyops.MessageType, alg keyops.SigningAlgorithm) ([]byte, uint32, error)
	Verify(ctx context.Context, key *fsmpb.KeyRecord, version uint32, msg []byte, mt keyops.MessageType, alg keyops.SigningAlgorithm, sig []byte, allowCompromised bool) (bool, error)
	GenerateMac(ctx context.Context, key *fsmpb.KeyRecord, msg []byte) ([]byte, uint32, error)
	VerifyMac(ctx context.Context, key *fsmpb.KeyRecord, version uint32, msg, mac []byte, allowCompromised bool) (bool, error)
	EncryptAsymmetric(ctx context.Context, key *fsmpb.KeyRecord, version uint32, plaintext []byte) ([]byte, uint32, error)
	DecryptAsymmetric(ctx context.Context, key *fsmpb.KeyRecord, version uint32, ciphertext []byte, allowCompromised bool) ([]byte, error)
}

// HSM is what the API needs from the node's HSM (hsm.Provider).
type HSM interface {
	WrapKEK(ctx context.Context, version uint32, recipient *rsa.PublicKey) ([]byte, error)
	KEKCheckValue(ctx context.Context, version uint32) ([]byte, error)
	Open(ctx context.Context, kekVersion uint32, sealed, aad []byte) ([]byte, error)
	// KEK rotation (kek.go).
	GenerateKEK(ctx context.Context, version uint32) ([]byte, error)
	UnwrapKEK(ctx context.Context, version uint32, wrapped []byte) ([]byte, error)
	DestroyKEK(ctx context.Context, version uint32) error
	Seal(ctx context.Context, kekVersion uint32, plaintext, aad []byte) ([]byte, error)
	Health(ctx context.Context) error
	GenerateRandom(ctx context.Context, n int) ([]byte, error)
}

// Config wires a Server.
type Config struct {
	NodeID   string
	APIAddr  string
	RaftAddr string
	Version  string
	Cluster  Cluster
	State    State
	Crypto   Crypto
	HSM      HSM
	Peers    *PeerClients
	Logger   *slog.Logger
	Clock    func() time.Time
	// MinRotationPeriod is the shortest automatic rotation period accepted
	// (default 24h; tests use seconds).
	MinRotationPeriod time.Duration
	// MinPendingWindow is the shortest destruction waiting period accepted
	// (default 7 days; tests use seconds).
	MinPendingWindow time.Duration
	// Audit receives a record for every request; nil disables auditing
	// (unit tests only: the server always sets it).
	Audit AuditLog
	// AuditPath is the audit file AuditVerify checks.
	AuditPath string
	// RateLimit is requests per second per principal (0: unlimited), with
	// bursts of RateBurst.
	RateLimit float64
	RateBurst int
}

// AuditLog is this node's hash-chained audit file (*audit.Log).
type AuditLog interface {
	Append(r audit.Record) (audit.Record, error)
	Healthy() error
	Tail(n int) ([]audit.Record, error)
	Verify() (audit.Report, error)
}

// Server implements the gRPC services.
type Server struct {
	cabinetpb.UnimplementedKeyServiceServer
	cabinetpb.UnimplementedOperatorServiceServer
	cabinetpb.UnimplementedNodeServiceServer
	cfg Config
	log *slog.Logger

	kekMu       sync.Mutex
	kekChecked  uint32 // KEK version last verified
	kekVerified bool
	kekErr      string

	health  *health.Server
	limiter *principalLimiter
	// hsmDown is set by the health watcher when this node's HSM fails its
	// health check: crypto is then refused (Unavailable) even for keys in
	// the cache, so clients move to a healthy node and behaviour matches
	// what health reports.
	hsmDown atomic.Bool

	membership membershipState // gossip view (membership.go)
	features   featureState    // rolling upgrades (features.go)
	kek        kekDriver       // KEK rotation (kek.go)
}

// NewServer builds the API server.
func NewServer(cfg Config) *Server {
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MinRotationPeriod == 0 {
		cfg.MinRotationPeriod = 24 * time.Hour
	}
	if cfg.MinPendingWindow == 0 {
		cfg.MinPendingWindow = 7 * 24 * time.Hour
	}
	return &Server{cfg: cfg, log: cfg.Logger, limiter: newPrincipalLimiter(cfg.RateLimit, cfg.RateBurst, cfg.Clock)}
}

// CAKeyAAD binds the sealed cluster CA key to its cluster.
func CAKeyAAD(clusterID string) []byte { return []byte("cabinet/ca-key/v1\x00" + clusterID) }

// principal names the caller for the audit trail in commands.
func principal(ctx context.Context) string {
	if id, ok := IdentityFrom(ctx); ok {
		return id.Role + ":" + id.Name
	}
	return "anonymous"
}

// kekStatus verifies, once per KEK version, that this node's HSM holds the
// cluster's current KEK (check values equal) before it serves.
func (s *Server) kekStatus(ctx context.Context) (uint32, bool, string) {
	ci := s.cfg.State.Cluster()
	if ci == nil {
		return 0, false, "cluster is not initialised yet"
	}
	v := ci.GetCurrentKekVersion()
	s.kekMu.Lock()
	defer s.kekMu.Unlock()
	if s.kekChecked == v && s.kekVerified {
		return v, true, ""
	}
	var want []byte
	for _, k := range ci.GetKekVersions() {
		if k.GetVersion() == v {
			want = k.GetCheckValue()
		}
	}
	got, err := s.cfg.HSM.KEKCheckValue(ctx, v)
	switch {
	case err != nil:
		s.kekVerified, s.kekErr = false, fmt.Sprintf("KEK version %d is not usable in this node's HSM: %v", v, err)
	case len(want) == 0 || subtle.ConstantTimeCompare(got, want) != 1:
		s.kekVerified, s.kekErr = false, fmt.Sprintf("KEK version %d in this node's HSM does not match the cluster's check value", v)
	default:
		s.kekVerified, s.kekErr = true, ""
	}
	s.kekChecked = v
	return v, s.kekVerified, s.kekErr
}

// readyForCrypto gates every crypto operation: KEK proven, fresh enough.
func (s *Server) readyForCrypto(ctx context.Context, c cabinetpb.Consistency) error {
	if s.hsmDown.Load() {
		return status.Errorf(codes.Unavailable, "node %s cannot reach its HSM; use another node", s.cfg.NodeID)
	}
	if err := s.cfg.State.Halted(); err != nil {
		return status.Errorf(codes.Unavailable, "node %s stopped applying the log (upgrade it): %v", s.cfg.NodeID, err)
	}
	if _, ok, why := s.kekStatus(ctx); !ok {
		return status.Errorf(codes.Unavailable, "node %s cannot serve: %s", s.cfg.NodeID, why)
	}
	if err := s.cfg.Cluster.CheckRead(ctx, c == cabinetpb.Consistency_STRONG); err != nil {
		return toStatus(err)
	}
	return nil
}

var nodeIDPattern = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

// ---- KeyService ----

func (s *Server) CreateKey(ctx context.Context, req *cabinetpb.CreateKeyRequest) (*cabinetpb.CreateKeyResponse, error) {
	spec := fsmpb.KeySpec(req.GetSpec())
	if spec == fsmpb.KeySpec_KEY_SPEC_UNSPECIFIED {
		return nil, status.Error(codes.InvalidArgument, "spec is required (e.g. AES_256)")
	}
	if _, ok := fsmpb.KeySpec_name[int32(spec)]; !ok {
		return nil, status.Errorf(codes.InvalidArgument, "unknown key spec %d", req.GetSpec())
	}
	ci := s.cfg.State.Cluster()
	if ci == nil {
		return nil, status.Error(codes.Unavailable, "the cluster is not initialised yet")
	}
	keyID, err := keyops.NewKeyID()
	if err != nil {
		return nil, toStatus(err)
	}
	if err := s.checkRotationPeriod(req.GetRotationPeriodSeconds()); err != nil {
		return nil, err
	}
	blob, pub, err := s.cfg.Crypto.WrapNewMaterial(ctx, keyID, 1, spec, ci.GetCurrentKekVersion())
	if err != nil {
		return nil, toStatus(err)
	}
	res, err := s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_CREATE_KEY, &fsmpb.CreateKey{
		KeyId:                 keyID,
		Spec:                  spec,
		Usage:                 fsmpb.KeyUsage(req.GetUsage()),
		Alias:                 req.GetAlias(),
		Description:           req.GetDescription(),
		Tags:                  req.GetTags(),
		Material:              blob,
		PublicKeyDer:          pub,
		RotationPeriodSeconds: req.GetRotationPeriodSeconds(),
	}, requestID(ctx, req.GetRequestId()), principal(ctx))
	if err != nil {
		return nil, err
	}
	return &cabinetpb.CreateKeyResponse{Key: keyToAPI(res.GetKey())}, nil
}

func (s *Server) ListKeys(ctx context.Context, req *cabinetpb.ListKeysRequest) (*cabinetpb.ListKeysResponse, error) {
	size := int(req.GetPageSize())
	if size < 0 || size > 1000 {
		return nil, status.Error(codes.InvalidArgument, "page_size must be between 0 and 1000 (0 means 100)")
	}
	if size == 0 {
		size = 100
	}
	recs := s.cfg.State.ListKeys(req.GetPageToken(), size+1)
	out := &cabinetpb.ListKeysResponse{}
	for i, r := range recs {
		if i == size {
			out.NextPageToken = recs[size-1].GetKeyId()
			break
		}
		out.Keys = append(out.Keys, keyToAPI(r))
	}
	return out, nil
}

// lookupKey finds a key by id or alias. A miss on this replica is not final:
// the key may have been created a moment ago through another node, so the
// node first catches up with the leader's commit index (one read-index round
// trip, only on a miss) and looks again. NotFound therefore means "not in
// the cluster", and a client may create a key through one node and use it
// through another at once.
func (s *Server) lookupKey(ctx context.Context, idOrAlias string) (*fsmpb.KeyRecord, error) {
	if idOrAlias == "" {
		return nil, status.Error(codes.InvalidArgument, "key_id is required (a key id or an alias)")
	}
	k, ok, err := s.findKeyErr(ctx, idOrAlias)
	if ok {
		return k, nil
	}
	if err != nil {
		// The key is not on this replica and the node could not catch up
		// with the leader: that is "try elsewhere", not "no such key".
		return nil, status.Errorf(codes.Unavailable, "key %q is not on this node yet and it cannot reach the leader to catch up: %v", idOrAlias, err)
	}
	if id, _ := IdentityFrom(ctx); id.Role == roleClient {
		// No existence oracle for plain principals: a key they cannot see
		// and a key that does not exist look the same.
		return nil, status.Errorf(codes.PermissionDenied, "%s has no grant on key %q (or it does not exist)", id.Name, idOrAlias)
	}
	return nil, status.Errorf(codes.NotFound, "key %q not found: check the id or alias with `cabinet key list`", idOrAlias)
}

func (s *Server) findKey(ctx context.Context, idOrAlias string) (*fsmpb.KeyRecord, bool) {
	k, ok, _ := s.findKeyErr(ctx, idOrAlias)
	return k, ok
}

// findKeyErr looks locally, then once more after catching up with the
// leader; err is the catch-up failure when the key is still missing.
func (s *Server) findKeyErr(ctx context.Context, idOrAlias string) (*fsmpb.KeyRecord, bool, error) {
	if k, ok := s.cfg.State.Key(idOrAlias); ok {
		return k, true, nil
	}
	if err := s.cfg.Cluster.CheckRead(ctx, true); err != nil {
		return nil, false, err
	}
	k, ok := s.cfg.State.Key(idOrAlias)
	return k, ok, nil
}

func (s *Server) DescribeKey(ctx context.Context, req *cabinetpb.DescribeKeyRequest) (*cabinetpb.DescribeKeyResponse, error) {
	k, err := s.lookupKey(ctx, req.GetKeyId())
	if err != nil {
		return nil, err
	}
	if err := s.authorizeKey(ctx, k, nil, fsmpb.GrantOperation_GRANT_OPERATION_DESCRIBE); err != nil {
		return nil, err
	}
	return &cabinetpb.DescribeKeyResponse{Key: keyToAPI(k)}, nil
}

// ---- OperatorService ----

func (s *Server) Status(ctx context.Context, _ *cabinetpb.StatusRequest) (*cabinetpb.StatusResponse, error) {
	return s.localStatus(ctx), nil
}

func (s *Server) localStatus(ctx context.Context) *cabinetpb.StatusResponse {
	st := s.cfg.Cluster.Status()
	out := &cabinetpb.StatusResponse{
		NodeId:       s.cfg.NodeID,
		ApiAddr:      s.cfg.APIAddr,
		RaftAddr:     s.cfg.RaftAddr,
		RaftState:    st.State,
		LeaderId:     st.LeaderID,
		LeaderAddr:   st.LeaderAddr,
		Term:         st.Term,
		CommitIndex:  st.CommitIndex,
		AppliedIndex: st.AppliedIndex,
		LastLogIndex: st.LastLogIndex,
		LastContactMs: func() int64 {
			if st.LastContact < 0 {
				return -1
			}
			return st.LastContact.Milliseconds()
		}(),
		KeyCount: uint64(s.cfg.State.KeyCount()),
		Version:  s.cfg.Version,
		Voter:    st.Voter,
	}
	if ci := s.cfg.State.Cluster(); ci != nil {
		out.ClusterId = ci.GetClusterId()
		out.GossipKeyGeneration = fsm.GossipKeyGeneration(ci)
		out.GossipKeyRotationDue = ci.GetGossipKeyRotationDue()
	}
	out.FeatureLevel = fsm.FeatureLevel
	out.ClusterFeatureLevel, _ = s.cfg.State.MinFeatureLevel()
	s.membership.mu.Lock()
	out.GossipKeyInUse, out.GossipKeysHeld = s.membership.keyInUse, s.membership.keysHeld
	s.membership.mu.Unlock()
	if rec, ok := s.cfg.State.Node(s.cfg.NodeID); ok {
		out.Region = rec.GetRegion()
	}
	hctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := s.cfg.HSM.Health(hctx); err != nil {
		out.HsmStatus, out.HsmError = "unavailable", err.Error()
		out.UnhealthyReasons = append(out.UnhealthyReasons, "HSM unavailable")
		s.hsmDown.Store(true)
	} else {
		out.HsmStatus = "ok"
		s.hsmDown.Store(false)
	}
	if err := s.cfg.State.Halted(); err != nil {
		out.UnhealthyReasons = append(out.UnhealthyReasons, "state machine halted: "+err.Error())
	}
	v, ok, why := s.kekStatus(ctx)
	out.KekVersion, out.KekVerified = v, ok
	if !ok {
		out.UnhealthyReasons = append(out.UnhealthyReasons, why)
	}
	if err := s.cfg.Cluster.CheckRead(ctx, false); err != nil {
		out.UnhealthyReasons = append(out.UnhealthyReasons, err.Error())
	}
	out.Healthy = len(out.UnhealthyReasons) == 0
	return out
}

func (s *Server) ListPeers(ctx context.Context, _ *cabinetpb.ListPeersRequest) (*cabinetpb.ListPeersResponse, error) {
	servers, err := s.cfg.Cluster.Servers()
	if err != nil {
		return nil, toStatus(err)
	}
	leaderID, _ := s.cfg.Cluster.Leader()
	out := make([]*cabinetpb.Peer, len(servers))
	var wg sync.WaitGroup
	for i, srv := range servers {
		p := &cabinetpb.Peer{NodeId: srv.ID, RaftAddr: srv.RaftAddr, Voter: srv.Voter, RaftRole: "unknown",
			Gossip: s.gossipHealth(srv.ID)}
		if rec, ok := s.cfg.State.Node(srv.ID); ok {
			p.ApiAddr = rec.GetApiAddr()
			p.Region = rec.GetRegion()
			p.FeatureLevel = rec.GetFeatureLevel()
		}
		out[i] = p
		wg.Add(1)
		go func() {
			defer wg.Done()
			var st *cabinetpb.StatusResponse
			if srv.ID == s.cfg.NodeID {
				st = s.localStatus(ctx)
			} else if p.ApiAddr == "" || s.cfg.Peers == nil {
				p.Error = "API address unknown"
				return
			} else {
				cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				defer cancel()
				var err error
				st, err = s.cfg.Peers.Status(cctx, p.ApiAddr)
				if err != nil {
					p.Error = status.Convert(err).Message()
					if srv.ID == leaderID {
						p.RaftRole = "leader"
					}
					return
				}
			}
			p.Reachable = true
			p.RaftRole = st.GetRaftState()
			p.AppliedIndex = st.GetAppliedIndex()
			p.LastContactMs = st.GetLastContactMs()
			p.HsmStatus = st.GetHsmStatus()
			p.Healthy = st.GetHealthy()
			p.Version = st.GetVersion()
		}()
	}
	wg.Wait()
	return &cabinetpb.ListPeersResponse{Peers: out}, nil
}

func (s *Server) CreateJoinToken(ctx context.Context, req *cabinetpb.CreateJoinTokenRequest) (*cabinetpb.CreateJoinTokenResponse, error) {
	ttl := time.Duration(req.GetTtlSeconds()) * time.Second
	if ttl < 0 || ttl > 24*time.Hour {
		return nil, status.Error(codes.InvalidArgument, "ttl must be between 1s and 24h (0 means 15m)")
	}
	if ttl == 0 {
		ttl = 15 * time.Minute
	}
	ci := s.cfg.State.Cluster()
	if ci == nil {
		return nil, status.Error(codes.Unavailable, "the cluster is not initialised yet")
	}
	tok, err := cluster.NewJoinToken(tlsutil.Fingerprint(ci.GetCaCertDer()))
	if err != nil {
		return nil, toStatus(err)
	}
	expires := s.cfg.Clock().Add(ttl)
	_, err = s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_CREATE_JOIN_TOKEN, &fsmpb.CreateJoinToken{
		TokenId: tok.ID, SecretHash: tok.SecretHash(), ExpiresUnixNano: expires.UnixNano(),
	}, requestID(ctx, req.GetRequestId()), principal(ctx))
	if err != nil {
		return nil, err
	}
	return &cabinetpb.CreateJoinTokenResponse{Token: tok.String(), ExpiresAt: timestamppb.New(expires)}, nil
}

// Join admits a node: the join token is checked and consumed through Raft,
// then this node signs the joiner's certificate with the cluster CA (its key
// unsealed by this node's HSM for the moment it takes) and wraps every active
// KEK version under the joiner's HSM identity key.
func (s *Server) Join(ctx context.Context, req *cabinetpb.JoinRequest) (*cabinetpb.JoinResponse, error) {
	if !nodeIDPattern.MatchString(req.GetNodeId()) {
		return nil, status.Error(codes.InvalidArgument, "node id must be 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit")
	}
	ips, err := addrIPs(req.GetApiAddr(), req.GetRaftAddr())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	pubAny, err := x509.ParsePKIXPublicKey(req.GetIdentityPublicKeyDer())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, "identity_public_key_der is not a PKIX public key")
	}
	pub, ok := pubAny.(*rsa.PublicKey)
	if !ok || pub.N.BitLen() < 2048 {
		return nil, status.Error(codes.InvalidArgument, "identity public key must be RSA with at least 2048 bits")
	}
	if _, err := x509.ParseCertificateRequest(req.GetCsrDer()); err != nil {
		return nil, status.Error(codes.InvalidArgument, "csr_der is not a PKCS#10 certificate request")
	}
	ci := s.cfg.State.Cluster()
	if ci == nil {
		return nil, status.Error(codes.Unavailable, "the cluster is not initialised yet")
	}
	if len(req.GetTokenSecret()) != 32 || req.GetTokenId() == "" {
		return nil, status.Error(codes.PermissionDenied, "join token is invalid, expired or already used")
	}
	tok := cluster.JoinToken{ID: req.GetTokenId(), Secret: req.GetTokenSecret()}
	if low, at := s.cfg.State.MinFeatureLevel(); at != nil && req.GetFeatureLevel() < low {
		// Say why only to a holder of a valid token (ADMIT_NODE checks it
		// again; this is a read of this node's state).
		rec, ok := s.cfg.State.JoinToken(tok.ID)
		if !ok || rec.GetUsedByNode() != "" || rec.GetExpiresUnixNano() <= time.Now().UnixNano() ||
			subtle.ConstantTimeCompare(rec.GetSecretHash(), tok.SecretHash()) != 1 {
			return nil, status.Error(codes.PermissionDenied, "join token is invalid, expired or already used")
		}
		return nil, status.Errorf(codes.FailedPrecondition,
			"node %+.64q runs a release with feature level %d, older than every member's (%d or later): it could not apply what the cluster proposes; install the cluster's release on it and join again",
			req.GetNodeId(), req.GetFeatureLevel(), low)
	}
	_, err = s.propose(ctx, fsmpb.CommandType_COMMAND_TYPE_ADMIT_NODE, &fsmpb.AdmitNode{
		TokenId:    tok.ID,
		SecretHash: tok.SecretHash(),
		Node: &fsmpb.NodeRecord{
			NodeId:               req.GetNodeId(),
			ApiAddr:              req.GetApiAddr(),
			RaftAddr:             req.GetRaftAddr(),
			IdentityPublicKeyDer: req.GetIdentityPublicKeyDer(),
			Region:               req.GetRegion(),
			Voter:                !req.GetNonVoter(),
			FeatureLevel:         req.GetFeatureLevel(),
		},
	}, "join/"+tok.ID+"/"+req.GetNodeId(), "node:"+req.GetNodeId())
	if err != nil {
		return nil, err
	}
	caKey, err := s.cfg.HSM.Open(ctx, ci.GetCaKey().GetKekVersion(), ci.GetCaKey().GetBlob(), CAKeyAAD(ci.GetClusterId()))
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "this node's HSM could not unseal the cluster CA key: %v", err)
	}
	ca, err := tlsutil.LoadCA(ci.GetCaCertDer(), caKey)
	clear(caKey)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "load cluster CA: %v", err)
	}
	certDER, err := ca.IssueNode(req.GetCsrDer(), req.GetNodeId(), ips, s.cfg.Clock())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "issue node certificate: %v", err)
	}
	out := &cabinetpb.JoinResponse{
		ClusterId:         ci.GetClusterId(),
		NodeCertDer:       certDER,
		CaCertDer:         ci.GetCaCertDer(),
		CurrentKekVersion: ci.GetCurrentKekVersion(),
		AdmittedBy:        s.cfg.NodeID,
	}
	for _, k := range ci.GetKekVersions() {
		if !fsm.KEKOpensMaterial(k.GetState()) {
			continue
		}
		wrapped, err := s.cfg.HSM.WrapKEK(ctx, k.GetVersion(), pub)
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "wrap KEK version %d for the joiner: %v", k.GetVersion(), err)
		}
		out.Keks = append(out.Keks, &cabinetpb.WrappedKEK{Version: k.GetVersion(), Wrapped: wrapped, CheckValue: k.GetCheckValue()})
	}
	s.log.Info("admitted node", "node_id", req.GetNodeId(), "api_addr", req.GetApiAddr(), "raft_addr", req.GetRaftAddr(),
		"voter", !req.GetNonVoter(), "region", req.GetRegion())
	return out, nil
}

// ---- NodeService ----

func (s *Server) Apply(ctx context.Context, req *cabinetpb.ApplyRequest) (*cabinetpb.ApplyResponse, error) {
	res, idx, err := s.cfg.Cluster.ApplyForwarded(ctx, req.GetCommand())
	if err != nil {
		return nil, toStatus(err)
	}
	b, err := fsm.EncodeResult(res)
	if err != nil {
		return nil, toStatus(err)
	}
	return &cabinetpb.ApplyResponse{Result: b, Index: idx}, nil
}

func (s *Server) ReadIndex(ctx context.Context, _ *cabinetpb.ReadIndexRequest) (*cabinetpb.ReadIndexResponse, error) {
	idx, err := s.cfg.Cluster.ReadIndexLocal(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	return &cabinetpb.ReadIndexResponse{Index: idx}, nil
}

// AddPeer adds the calling node (named by its node certificate) to the Raft
// configuration, once Join admitted it.
func (s *Server) AddPeer(ctx context.Context, req *cabinetpb.AddPeerRequest) (*cabinetpb.AddPeerResponse, error) {
	id, _ := IdentityFrom(ctx)
	rec, ok := s.cfg.State.Node(id.NodeID)
	if !ok {
		return nil, status.Errorf(codes.FailedPrecondition, "node %q was not admitted: run `cabinet operator join` with a join token first", id.NodeID)
	}
	if !s.cfg.Cluster.IsLeader() {
		_, addr := s.cfg.Cluster.Leader()
		return &cabinetpb.AddPeerResponse{LeaderApiAddr: addr}, nil
	}
	servers, err := s.cfg.Cluster.Servers()
	if err != nil {
		return nil, toStatus(err)
	}
	for _, srv := range servers {
		if srv.ID == rec.GetNodeId() && srv.RaftAddr == rec.GetRaftAddr() {
			return &cabinetpb.AddPeerResponse{Added: true}, nil
		}
	}
	// The node record decides the suffrage (operator join --non-voter).
	if !rec.GetVoter() {
		mc, err := s.membershipCluster()
		if err != nil {
			return nil, err
		}
		if err := mc.AddNonvoter(ctx, rec.GetNodeId(), rec.GetRaftAddr()); err != nil {
			return nil, toStatus(err)
		}
		s.log.Info("added non-voter", "node_id", rec.GetNodeId(), "raft_addr", rec.GetRaftAddr(), "region", rec.GetRegion())
		return &cabinetpb.AddPeerResponse{Added: true}, nil
	}
	if err := s.cfg.Cluster.AddVoter(ctx, rec.GetNodeId(), rec.GetRaftAddr()); err != nil {
		return nil, toStatus(err)
	}
	s.log.Info("added voter", "node_id", rec.GetNodeId(), "raft_addr", rec.GetRaftAddr(), "region", rec.GetRegion())
	return &cabinetpb.AddPeerResponse{Added: true}, nil
}

// ---- helpers ----

// propose builds a command, sends it through the Raft leader and maps both
// transport errors and refused results to gRPC statuses.
func (s *Server) propose(ctx context.Context, typ fsmpb.CommandType, payload proto.Message, reqID, who string) (*fsmpb.Result, error) {
	cmd, err := fsm.NewCommand(typ, payload, reqID, who)
	if err != nil {
		return nil, toStatus(err)
	}
	res, err := s.cfg.Cluster.Propose(ctx, cmd)
	if err != nil {
		return nil, toStatus(err)
	}
	if err := resultError(res); err != nil {
		return nil, err
	}
	return res, nil
}

// requestID scopes a caller's idempotency key to the caller, so one
// principal can never receive another's result by reusing its request id.
func requestID(ctx context.Context, id string) string {
	if id != "" {
		return principal(ctx) + "/" + id
	}
	// No idempotency asked for: a fresh id keeps the dedup table meaningful.
	kid, err := keyops.NewKeyID()
	if err != nil {
		return ""
	}
	return "auto-" + kid
}

func addrIPs(addrs ...string) ([]net.IP, error) {
	var ips []net.IP
	for _, a := range addrs {
		host, _, err := net.SplitHostPort(a)
		if err != nil {
			return nil, fmt.Errorf("address %q must be host:port", a)
		}
		ip := net.ParseIP(host)
		if ip == nil {
			return nil, fmt.Errorf("address %q must use an IP address (certificates carry IP SANs)", a)
		}
		ips = append(ips, ip)
	}
	return ips, nil
}

func ts(unixNano int64) *timestamppb.Timestamp {
	if unixNano == 0 {
		return nil
	}
	return timestamppb.New(time.Unix(0, unixNano))
}

func keyToAPI(k *fsmpb.KeyRecord) *cabinetpb.Key {
	if k == nil {
		return nil
	}
	out := &cabinetpb.Key{
		KeyId:                 k.GetKeyId(),
		Alias:                 k.GetAlias(),
		Spec:                  cabinetpb.KeySpec(k.GetSpec()),
		Usage:                 cabinetpb.KeyUsage(k.GetUsage()),
		State:                 cabinetpb.KeyState(k.GetState()),
		Description:           k.GetDescription(),
		Tags:                  k.GetTags(),
		CreatedAt:             ts(k.GetCreatedUnixNano()),
		UpdatedAt:             ts(k.GetUpdatedUnixNano()),
		CreatedBy:             k.GetCreatedBy(),
		PrimaryVersion:        k.GetPrimaryVersion(),
		Origin:                trimEnum(k.GetOrigin().String(), "KEY_ORIGIN_"),
		RotationPeriodSeconds: k.GetRotationPeriodSeconds(),
		NextRotationAt:        ts(k.GetNextRotationUnixNano()),
		MinDecryptionVersion:  k.GetMinDecryptionVersion(),
		RevocationComment:     k.GetRevocationComment(),
		RevokedAt:             ts(k.GetRevokedUnixNano()),
		DestroyAfter:          ts(k.GetDestroyAfterUnixNano()),
		DestroyedAt:           ts(k.GetDestroyedUnixNano()),
	}
	if k.GetRevocationReason() != fsmpb.RevocationReason_REVOCATION_REASON_UNSPECIFIED {
		out.RevocationReason = trimEnum(k.GetRevocationReason().String(), "REVOCATION_REASON_")
	}
	if out.Origin == "UNSPECIFIED" {
		out.Origin = "GENERATED"
	}
	for _, v := range k.GetVersions() {
		out.Versions = append(out.Versions, &cabinetpb.KeyVersionInfo{
			Version: v.GetVersion(), State: trimEnum(v.GetState().String(), "KEY_VERSION_STATE_"), CreatedAt: ts(v.GetCreatedUnixNano()),
			DestroyedAt: ts(v.GetDestroyedUnixNano()), HasPublicKey: len(v.GetPublicKeyDer()) > 0,
		})
	}
	return out
}

func trimEnum(s, prefix string) string {
	if len(s) > len(prefix) && s[:len(prefix)] == prefix {
		return s[len(prefix):]
	}
	return s
}

// resultError maps an FSM result code to a gRPC status.
func resultError(r *fsmpb.Result) error {
	if r == nil {
		return status.Error(codes.Internal, "no result from the state machine")
	}
	var c codes.Code
	switch r.GetCode() {
	case fsmpb.ResultCode_RESULT_CODE_OK:
		return nil
	case fsmpb.ResultCode_RESULT_CODE_INVALID_ARGUMENT:
		c = codes.InvalidArgument
	case fsmpb.ResultCode_RESULT_CODE_NOT_FOUND:
		c = codes.NotFound
	case fsmpb.ResultCode_RESULT_CODE_ALREADY_EXISTS:
		c = codes.AlreadyExists
	case fsmpb.ResultCode_RESULT_CODE_FAILED_PRECONDITION:
		c = codes.FailedPrecondition
	case fsmpb.ResultCode_RESULT_CODE_PERMISSION_DENIED:
		c = codes.PermissionDenied
	default:
		c = codes.Internal
	}
	return status.Error(c, r.GetMessage())
}

// toStatus maps package errors to gRPC codes, once, at the edge.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	var c codes.Code
	switch {
	case errors.Is(err, context.Canceled):
		c = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		c = codes.DeadlineExceeded
	case errors.Is(err, cluster.ErrNotLeader):
		c = codes.Aborted // forwarding clients retry at the new leader
	case errors.Is(err, cluster.ErrNoLeader), errors.Is(err, cluster.ErrStale):
		c = codes.Unavailable
	case errors.Is(err, keyops.ErrInvalidArgument), errors.Is(err, keyops.ErrInvalidCiphertext):
		c = codes.InvalidArgument
	case errors.Is(err, keyops.ErrKeyNotFound), errors.Is(err, keyops.ErrVersionNotFound):
		c = codes.NotFound
	case errors.Is(err, keyops.ErrKeyState):
		c = codes.FailedPrecondition
	case errors.Is(err, keyops.ErrUnsupported):
		c = codes.Unimplemented
	case errors.Is(err, keyops.ErrUnwrap):
		c = codes.Unavailable
	default:
		c = codes.Internal
	}
	return status.Error(c, err.Error())
}
