package main

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/fsm"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"github.com/cabinet-kms/cabinet/hsm"
	"github.com/cabinet-kms/cabinet/transport"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
	"github.com/cabinet-kms/cabinet/transport/tlsutil"
)

func newOperatorCmd() *cobra.Command {
	f := &clientFlags{}
	cmd := &cobra.Command{Use: "operator", Short: "Initialise, grow and inspect the cluster"}
	addClientFlags(cmd, f)
	jt := &cobra.Command{Use: "join-token", Short: "Manage join tokens"}
	jt.AddCommand(joinTokenCreateCmd(f))
	cmd.AddCommand(initCmd(), joinCmd(), jt, statusCmd(f), listPeersCmd(f), auditCmd(f))
	cmd.AddCommand(authzOperatorCmds(f)...)
	cmd.AddCommand(snapshotCmd(f), recoveryCmd(f), kekCmd(f), gossipCmd(f))
	cmd.AddCommand(membershipCmds(f)...)
	return cmd
}

// nodeFlags are the identity flags of init and join.
type nodeFlags struct {
	dataDir, nodeID, apiAddr, raftAddr, region string
	hsm                                        hsmFlags
}

func addNodeFlags(cmd *cobra.Command, f *nodeFlags) {
	cmd.Flags().StringVar(&f.dataDir, "data-dir", "", "node data directory (created)")
	cmd.Flags().StringVar(&f.nodeID, "node-id", "", "node id (a-z, 0-9, '-')")
	cmd.Flags().StringVar(&f.apiAddr, "api-addr", "", "gRPC API address, IP:port")
	cmd.Flags().StringVar(&f.raftAddr, "raft-addr", "", "Raft address, IP:port")
	cmd.Flags().StringVar(&f.region, "region", "", "region label")
	addHSMFlags(cmd, &f.hsm)
	for _, n := range []string{"data-dir", "node-id", "api-addr", "raft-addr", "hsm-token-label"} {
		_ = cmd.MarkFlagRequired(n)
	}
}

func (f *nodeFlags) validate() ([]net.IP, error) {
	if _, err := os.Stat(filepath.Join(f.dataDir, nodeConfigFile)); err == nil {
		return nil, fmt.Errorf("%s already holds a node (%s exists); use a fresh --data-dir", f.dataDir, nodeConfigFile)
	}
	var ips []net.IP
	for _, a := range []string{f.apiAddr, f.raftAddr} {
		host, _, err := net.SplitHostPort(a)
		if err != nil {
			return nil, fmt.Errorf("address %q must be IP:port", a)
		}
		ip := net.ParseIP(host)
		if ip == nil {
			return nil, fmt.Errorf("address %q must use an IP address", a)
		}
		ips = append(ips, ip)
	}
	return ips, nil
}

func openNodeHSM(ctx context.Context, c hsmConfig) (*hsm.PKCS11, error) {
	pcfg, err := pkcs11Config(c)
	if err != nil {
		return nil, err
	}
	h, err := hsm.OpenPKCS11(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("open HSM token %q: %w", c.TokenLabel, err)
	}
	return h, nil
}

func initCmd() *cobra.Command {
	f := &nodeFlags{}
	var adminOut string
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Create a new cluster on this node: HSM identity and KEK, cluster CA, node and admin certificates",
		Long: `init prepares --data-dir for the first node of a new cluster. In the node's HSM it
generates the identity key pair and the cluster KEK (version 1); it creates the cluster CA
(its private key is stored only sealed under the KEK), this node's certificate and a first
admin client certificate (written to --admin-out). Start the node with
'cabinet server --data-dir DIR'; it bootstraps Raft and records the cluster.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ips, err := f.validate()
			if err != nil {
				return err
			}
			hc, err := f.hsm.config()
			if err != nil {
				return err
			}
			if adminOut == "" {
				return errors.New("--admin-out is required: where to write the first admin's certificate and key")
			}
			ctx := cmd.Context()
			h, err := openNodeHSM(ctx, hc)
			if err != nil {
				return err
			}
			defer h.Close()
			pub, err := h.EnsureIdentity(ctx)
			if err != nil {
				return fmt.Errorf("HSM identity key: %w", err)
			}
			pubDER, err := x509.MarshalPKIXPublicKey(pub)
			if err != nil {
				return err
			}
			kcv, err := h.GenerateKEK(ctx, 1)
			if err != nil {
				return fmt.Errorf("generate the cluster KEK in the HSM: %w", err)
			}
			idb := make([]byte, 8)
			if _, err := rand.Read(idb); err != nil {
				return err
			}
			clusterID := "c-" + hex.EncodeToString(idb)
			now := time.Now()
			ca, err := tlsutil.NewCA(clusterID, now)
			if err != nil {
				return err
			}
			caKey, err := ca.KeyPKCS8()
			if err != nil {
				return err
			}
			sealedCA, err := h.Seal(ctx, 1, caKey, transport.CAKeyAAD(clusterID))
			clear(caKey)
			if err != nil {
				return fmt.Errorf("seal the CA key under the KEK: %w", err)
			}
			if err := writeFirstNodeCreds(f.dataDir, f.nodeID, ips, ca, adminOut, now); err != nil {
				return err
			}
			initCmd, err := fsm.NewCommand(fsmpb.CommandType_COMMAND_TYPE_INIT_CLUSTER, &fsmpb.InitCluster{
				ClusterId: clusterID,
				CaCertDer: ca.CertDER,
				CaKey:     &fsmpb.WrappedBlob{KekVersion: 1, Blob: sealedCA},
				Kek:       &fsmpb.KEKVersion{Version: 1, CheckValue: kcv, CreatedUnixNano: now.UnixNano(), State: fsmpb.KEKState_KEK_STATE_ACTIVE},
				FirstNode: &fsmpb.NodeRecord{NodeId: f.nodeID, ApiAddr: f.apiAddr, RaftAddr: f.raftAddr, IdentityPublicKeyDer: pubDER, Region: f.region, Voter: true,
					FeatureLevel: fsm.FeatureLevel},
			}, "init/"+clusterID, "admin:init")
			if err != nil {
				return err
			}
			data, err := fsm.EncodeCommand(initCmd)
			if err != nil {
				return err
			}
			if err := writeFileAtomic(filepath.Join(f.dataDir, initFile), data, 0o600); err != nil {
				return err
			}
			if err := saveNodeConfig(f.dataDir, &nodeConfig{
				NodeID: f.nodeID, ClusterID: clusterID, APIAddr: f.apiAddr, RaftAddr: f.raftAddr, Region: f.region, HSM: hc, Bootstrap: true,
			}); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Initialised cluster %s on node %s (KEK v1 check value %x).\n", clusterID, f.nodeID, kcv)
			fmt.Fprintf(cmd.OutOrStdout(), "Admin credentials: %s/{ca.pem,admin.pem,admin-key.pem}\n", adminOut)
			fmt.Fprintf(cmd.OutOrStdout(), "Next: cabinet server --data-dir %s\n", f.dataDir)
			return nil
		},
	}
	addNodeFlags(cmd, f)
	cmd.Flags().StringVar(&adminOut, "admin-out", "", "directory for the first admin's credentials (ca.pem, admin.pem, admin-key.pem)")
	return cmd
}

// writeFirstNodeCreds gives the first node of a cluster (init, or a
// disaster-recovery restore) its TLS key and certificate signed by ca, the
// CA certificate, and the first admin's credentials in adminOut.
func writeFirstNodeCreds(dataDir, nodeID string, ips []net.IP, ca *tlsutil.CA, adminOut string, now time.Time) error {
	td := tlsDir(dataDir)
	if err := os.MkdirAll(td, 0o700); err != nil {
		return err
	}
	nodeKey, csr, err := tlsutil.NewNodeKey(nodeID)
	if err != nil {
		return err
	}
	nodeCert, err := ca.IssueNode(csr, nodeID, ips, now)
	if err != nil {
		return err
	}
	if err := tlsutil.WriteKeyPEM(filepath.Join(td, "node-key.pem"), nodeKey); err != nil {
		return err
	}
	if err := tlsutil.WriteCertPEM(filepath.Join(td, "node.pem"), nodeCert, ca.CertDER); err != nil {
		return err
	}
	if err := tlsutil.WriteCertPEM(filepath.Join(td, "ca.pem"), ca.CertDER); err != nil {
		return err
	}
	return writeClientCreds(adminOut, ca, "admin", tlsutil.RoleAdmin, now)
}

func writeClientCreds(dir string, ca *tlsutil.CA, name, role string, now time.Time) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	der, key, err := ca.IssueClient(name, role, now)
	if err != nil {
		return err
	}
	if err := tlsutil.WriteKeyPEM(filepath.Join(dir, name+"-key.pem"), key); err != nil {
		return err
	}
	if err := tlsutil.WriteCertPEM(filepath.Join(dir, name+".pem"), der); err != nil {
		return err
	}
	return tlsutil.WriteCertPEM(filepath.Join(dir, "ca.pem"), ca.CertDER)
}

func joinCmd() *cobra.Command {
	f := &nodeFlags{}
	var token, peer string
	var nonVoter bool
	cmd := &cobra.Command{
		Use:   "join",
		Short: "Join this node to a cluster with a join token",
		Long: `join runs on the new node's machine. It generates the node's HSM identity key pair,
presents the join token to --peer (any member; the cluster CA is pinned by the token), receives
a node certificate and the cluster KEK wrapped under the identity key, unwraps the KEK inside
this node's HSM and checks it against the cluster's check value. Then start (or keep running)
'cabinet server --data-dir DIR': it asks the cluster to add it to the Raft configuration, as a
voter, or as a non-voter (read replica: it serves reads from its replica but never votes nor
counts for quorum) with --non-voter. --region labels the node (list-peers shows it).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if token == "" {
				token = os.Getenv("CABINET_JOIN_TOKEN")
			}
			if token == "" || peer == "" {
				return errors.New("--token (or CABINET_JOIN_TOKEN) and --peer are required")
			}
			if _, err := f.validate(); err != nil {
				return err
			}
			hc, err := f.hsm.config()
			if err != nil {
				return err
			}
			return joinNode(cmd.Context(), cmd.OutOrStdout(), f, hc, token, peer, nonVoter)
		},
	}
	addNodeFlags(cmd, f)
	cmd.Flags().StringVar(&token, "token", "", "join token from `cabinet operator join-token create` (or CABINET_JOIN_TOKEN)")
	cmd.Flags().StringVar(&peer, "peer", "", "API address of any cluster member")
	cmd.Flags().BoolVar(&nonVoter, "non-voter", false, "join as a non-voter (read replica): receives the log and serves reads, never votes")
	return cmd
}

// joinNode performs the join ceremony for the node described by f (HSM
// config hc) through the member at peer, and writes the node's TLS files
// and node.json into f.dataDir. Used by join and rejoin.
func joinNode(ctx context.Context, out io.Writer, f *nodeFlags, hc hsmConfig, token, peer string, nonVoter bool) error {
	tok, err := cluster.ParseJoinToken(token)
	if err != nil {
		return err
	}
	h, err := openNodeHSM(ctx, hc)
	if err != nil {
		return err
	}
	defer h.Close()
	pub, err := h.EnsureIdentity(ctx)
	if err != nil {
		return fmt.Errorf("HSM identity key: %w", err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return err
	}
	nodeKey, csr, err := tlsutil.NewNodeKey(f.nodeID)
	if err != nil {
		return err
	}
	var seenCA []byte
	tcfg := tlsutil.PinnedConfig(tok.CAFingerprint, func(der []byte) { seenCA = der })
	conn, err := grpc.NewClient(peer, grpc.WithTransportCredentials(credentials.NewTLS(tcfg)))
	if err != nil {
		return err
	}
	defer conn.Close()
	jctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	resp, err := cabinetpb.NewOperatorServiceClient(conn).Join(jctx, &cabinetpb.JoinRequest{
		TokenId: tok.ID, TokenSecret: tok.Secret, NodeId: f.nodeID, ApiAddr: f.apiAddr, RaftAddr: f.raftAddr,
		IdentityPublicKeyDer: pubDER, CsrDer: csr, Region: f.region, NonVoter: nonVoter, FeatureLevel: fsm.FeatureLevel,
	})
	if err != nil {
		return fmt.Errorf("join via %s: %w", peer, rpcError(err))
	}
	if tlsutil.Fingerprint(resp.GetCaCertDer()) != tok.CAFingerprint || (seenCA != nil && subtle.ConstantTimeCompare(seenCA, resp.GetCaCertDer()) != 1) {
		return errors.New("the cluster CA in the join response does not match the join token's fingerprint; refusing")
	}
	for _, k := range resp.GetKeks() {
		kcv, err := h.UnwrapKEK(ctx, k.GetVersion(), k.GetWrapped())
		if err != nil {
			return fmt.Errorf("unwrap KEK version %d in this node's HSM: %w", k.GetVersion(), err)
		}
		if subtle.ConstantTimeCompare(kcv, k.GetCheckValue()) != 1 {
			return fmt.Errorf("KEK version %d unwrapped here does not match the cluster's check value; refusing", k.GetVersion())
		}
	}
	if err := os.MkdirAll(tlsDir(f.dataDir), 0o700); err != nil {
		return err
	}
	td := tlsDir(f.dataDir)
	if err := tlsutil.WriteKeyPEM(filepath.Join(td, "node-key.pem"), nodeKey); err != nil {
		return err
	}
	if err := tlsutil.WriteCertPEM(filepath.Join(td, "node.pem"), resp.GetNodeCertDer(), resp.GetCaCertDer()); err != nil {
		return err
	}
	if err := tlsutil.WriteCertPEM(filepath.Join(td, "ca.pem"), resp.GetCaCertDer()); err != nil {
		return err
	}
	if err := saveNodeConfig(f.dataDir, &nodeConfig{
		NodeID: f.nodeID, ClusterID: resp.GetClusterId(), APIAddr: f.apiAddr, RaftAddr: f.raftAddr, Region: f.region,
		HSM: hc, JoinAddrs: []string{peer},
	}); err != nil {
		return err
	}
	role := "voter"
	if nonVoter {
		role = "non-voter"
	}
	fmt.Fprintf(out, "Node %s admitted to cluster %s by %s as a %s; KEK versions verified: %d.\n",
		f.nodeID, resp.GetClusterId(), resp.GetAdmittedBy(), role, len(resp.GetKeks()))
	fmt.Fprintf(out, "Next: cabinet server --data-dir %s (a server already waiting on this dir starts by itself)\n", f.dataDir)
	return nil
}

func joinTokenCreateCmd(f *clientFlags) *cobra.Command {
	var ttl time.Duration
	var quiet bool
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Create a single-use join token (admin)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			resp, err := cabinetpb.NewOperatorServiceClient(conn).CreateJoinToken(ctx, &cabinetpb.CreateJoinTokenRequest{
				TtlSeconds: int64(ttl / time.Second), RequestId: newRequestID(),
			})
			if err != nil {
				return rpcError(err)
			}
			switch {
			case f.output == "json":
				return printJSON(cmd.OutOrStdout(), resp)
			case quiet:
				_, err = fmt.Fprintln(cmd.OutOrStdout(), resp.GetToken())
			default:
				_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s\n\nSingle use, expires %s. On the new node:\n  cabinet operator join --token <token> --peer %s --data-dir ... --node-id ... --api-addr ... --raft-addr ... --hsm-token-label ...\n",
					resp.GetToken(), resp.GetExpiresAt().AsTime().Format(time.RFC3339), f.addr)
			}
			return err
		},
	}
	cmd.Flags().DurationVar(&ttl, "ttl", 15*time.Minute, "lifetime (1s..24h)")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print only the token")
	return cmd
}

func statusCmd(f *clientFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show the node's status: Raft role, indexes, leader contact, KEK and HSM health",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			st, err := cabinetpb.NewOperatorServiceClient(conn).Status(ctx, &cabinetpb.StatusRequest{})
			if err != nil {
				return rpcError(err)
			}
			if f.output == "json" {
				return printJSON(cmd.OutOrStdout(), st)
			}
			t := newTable(cmd.OutOrStdout())
			fmt.Fprintf(t, "Node\t%s (%s)\n", st.GetNodeId(), st.GetApiAddr())
			fmt.Fprintf(t, "Cluster\t%s\n", st.GetClusterId())
			fmt.Fprintf(t, "Raft state\t%s (voter: %v), term %d\n", st.GetRaftState(), st.GetVoter(), st.GetTerm())
			fmt.Fprintf(t, "Leader\t%s %s\n", st.GetLeaderId(), st.GetLeaderAddr())
			fmt.Fprintf(t, "Indexes\tcommit %d, applied %d, last log %d\n", st.GetCommitIndex(), st.GetAppliedIndex(), st.GetLastLogIndex())
			fmt.Fprintf(t, "Last contact\t%s\n", lastContact(st.GetRaftState(), st.GetLastContactMs()))
			fmt.Fprintf(t, "KEK\tversion %d, verified: %v\n", st.GetKekVersion(), st.GetKekVerified())
			fmt.Fprintf(t, "HSM\t%s %s\n", st.GetHsmStatus(), st.GetHsmError())
			fmt.Fprintf(t, "Gossip key\t%s\n", gossipKeyLine(st))
			fmt.Fprintf(t, "Keys\t%d\n", st.GetKeyCount())
			fmt.Fprintf(t, "Healthy\t%v %s\n", st.GetHealthy(), strings.Join(st.GetUnhealthyReasons(), "; "))
			fmt.Fprintf(t, "Version\t%s, feature level %d (cluster: %d)\n", st.GetVersion(), st.GetFeatureLevel(), st.GetClusterFeatureLevel())
			return t.Flush()
		},
	}
}

func lastContact(role string, ms int64) string {
	switch {
	case role == "leader" || role == "unknown":
		return "-"
	case ms < 0:
		return "never"
	default:
		return (time.Duration(ms) * time.Millisecond).String() + " ago"
	}
}

func listPeersCmd(f *clientFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "list-peers",
		Short: "List the cluster's Raft members: role, voter, region, gossip health, applied index, last contact, HSM, version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			resp, err := cabinetpb.NewOperatorServiceClient(conn).ListPeers(ctx, &cabinetpb.ListPeersRequest{})
			if err != nil {
				return rpcError(err)
			}
			if f.output == "json" {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			return printPeers(cmd.OutOrStdout(), resp.GetPeers())
		},
	}
}
