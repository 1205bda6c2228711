package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// membershipCmds are remove, transfer-leadership, rejoin and recover-quorum.
// (join and list-peers live in operator.go.)
func membershipCmds(f *clientFlags) []*cobra.Command {
	return []*cobra.Command{removeCmd(f), transferLeadershipCmd(f), rejoinCmd(), recoverQuorumCmd()}
}

func printPeers(w io.Writer, peers []*cabinetpb.Peer) error {
	t := newTable(w)
	fmt.Fprintln(t, "NODE\tADDRESS\tREGION\tRAFT ROLE\tVOTER\tGOSSIP\tAPPLIED\tLAST CONTACT\tHSM\tHEALTHY\tVERSION (LEVEL)\tERROR")
	for _, p := range peers {
		g := p.GetGossip()
		if g == cluster.GossipDead {
			g = "DEAD" // stands out: gossip says this node does not answer
		}
		region := p.GetRegion()
		if region == "" {
			region = "-"
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%v\t%s\t%d\t%s\t%s\t%v\t%s (%d)\t%s\n", p.GetNodeId(), p.GetApiAddr(), region, p.GetRaftRole(), p.GetVoter(),
			g, p.GetAppliedIndex(), lastContact(p.GetRaftRole(), p.GetLastContactMs()), p.GetHsmStatus(), p.GetHealthy(), p.GetVersion(), p.GetFeatureLevel(), p.GetError())
	}
	return t.Flush()
}

func removeCmd(f *clientFlags) *cobra.Command {
	var reqID string
	cmd := &cobra.Command{
		Use:   "remove NODE",
		Short: "Remove a node from the cluster (Raft configuration and node records)",
		Long: `remove takes NODE out of the Raft configuration and deletes its node record, through any
node (followers relay to the leader). The leader cannot remove itself: move leadership first
with 'cabinet operator transfer-leadership'. A removed node keeps its HSM identity and KEK but
can come back only with a new join token: 'cabinet operator rejoin' on its machine.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			if reqID == "" {
				reqID = newRequestID()
			}
			if _, err := cabinetpb.NewOperatorServiceClient(conn).RemovePeer(ctx, &cabinetpb.RemovePeerRequest{NodeId: args[0], RequestId: reqID}); err != nil {
				return rpcError(err)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "Removed %s. To bring it back: stop it, then on its machine run\n  cabinet operator rejoin --data-dir DIR --token $(cabinet operator join-token create -q) --peer %s\n", args[0], f.addr)
			return err
		},
	}
	cmd.Flags().StringVar(&reqID, "request-id", "", "idempotency key (default: a fresh one)")
	return cmd
}

func transferLeadershipCmd(f *clientFlags) *cobra.Command {
	var to string
	cmd := &cobra.Command{
		Use:   "transfer-leadership",
		Short: "Move Raft leadership to another voter (--to NODE, or the most up-to-date one)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			resp, err := cabinetpb.NewOperatorServiceClient(conn).TransferLeadership(ctx, &cabinetpb.TransferLeadershipRequest{ToNodeId: to})
			if err != nil {
				return rpcError(err)
			}
			if f.output == "json" {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "Leader is now %s.\n", resp.GetLeaderId())
			return err
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "node id of the voter to lead (default: Raft picks the most up-to-date)")
	return cmd
}

// confirm asks the operator to type want on in; it fails on anything else.
func confirm(in io.Reader, out io.Writer, prompt, want string) error {
	fmt.Fprintf(out, "%s\nType %q to continue: ", prompt, want)
	line, err := bufio.NewReader(in).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	if strings.TrimSpace(line) != want {
		return errors.New("not confirmed; nothing was changed")
	}
	return nil
}

const rejoinBackup = nodeConfigFile + ".before-rejoin"

func rejoinCmd() *cobra.Command {
	var dataDir, token, peer, region string
	var nonVoter, yes bool
	cmd := &cobra.Command{
		Use:   "rejoin",
		Short: "Bring a removed node back: wipe its Raft state and node config, keep its HSM identity and KEK, join again",
		Long: `rejoin runs on the machine of a node that was removed ('cabinet operator remove NODE'),
with its server stopped. After confirmation (or --yes) it deletes the node's Raft state
(DIR/raft: log, snapshots, votes) and its node config and TLS files, keeps its HSM token
(identity key pair and KEK) and audit log, and joins the cluster again with the same node id,
addresses, region and HSM settings, using a new join token:

  cabinet operator remove node3                       # on any node, if not done yet
  cabinet operator rejoin --data-dir DIR --token $(cabinet operator join-token create -q) --peer ADDR --yes
  cabinet server --data-dir DIR                       # it asks to be added again

If the join fails, run rejoin again: the old settings are kept in DIR/node.json.before-rejoin
until a join succeeds.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if token == "" {
				token = os.Getenv("CABINET_JOIN_TOKEN")
			}
			if dataDir == "" || token == "" || peer == "" {
				return errors.New("--data-dir, --token (or CABINET_JOIN_TOKEN) and --peer are required")
			}
			nc, err := loadNodeConfig(dataDir)
			if errors.Is(err, os.ErrNotExist) {
				nc, err = loadNodeConfigFile(filepath.Join(dataDir, rejoinBackup))
			}
			if err != nil {
				return fmt.Errorf("read this node's settings from %s: %w", dataDir, err)
			}
			raftDir := filepath.Join(dataDir, "raft")
			if err := cluster.EnsureStopped(raftDir); err != nil {
				return err
			}
			if !yes {
				if err := confirm(cmd.InOrStdin(), cmd.ErrOrStderr(), fmt.Sprintf(
					"This deletes node %s's Raft state (%s), node config and TLS files, then joins it again via %s.\nIts HSM token and audit log are kept.",
					nc.NodeID, raftDir, peer), nc.NodeID); err != nil {
					return err
				}
			}
			// Keep the settings until the join succeeded, so a failed
			// join can be retried.
			if _, err := os.Stat(filepath.Join(dataDir, nodeConfigFile)); err == nil {
				if err := os.Rename(filepath.Join(dataDir, nodeConfigFile), filepath.Join(dataDir, rejoinBackup)); err != nil {
					return err
				}
			}
			for _, p := range []string{raftDir, tlsDir(dataDir), filepath.Join(dataDir, initFile)} {
				if err := os.RemoveAll(p); err != nil {
					return fmt.Errorf("wipe %s: %w", p, err)
				}
			}
			if region == "" {
				region = nc.Region
			}
			nf := &nodeFlags{dataDir: dataDir, nodeID: nc.NodeID, apiAddr: nc.APIAddr, raftAddr: nc.RaftAddr, region: region}
			ctx, cancel := context.WithTimeout(cmd.Context(), 2*time.Minute)
			defer cancel()
			if err := joinNode(ctx, cmd.OutOrStdout(), nf, nc.HSM, token, peer, nonVoter); err != nil {
				return fmt.Errorf("%w (the old settings are in %s; fix the cause and run rejoin again)", err, filepath.Join(dataDir, rejoinBackup))
			}
			_ = os.Remove(filepath.Join(dataDir, rejoinBackup))
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", "", "the removed node's data directory")
	cmd.Flags().StringVar(&token, "token", "", "a new join token (or CABINET_JOIN_TOKEN)")
	cmd.Flags().StringVar(&peer, "peer", "", "API address of any cluster member")
	cmd.Flags().StringVar(&region, "region", "", "region label (default: the node's previous one)")
	cmd.Flags().BoolVar(&nonVoter, "non-voter", false, "rejoin as a non-voter (read replica)")
	cmd.Flags().BoolVar(&yes, "yes", false, "do not ask for confirmation")
	return cmd
}

func loadNodeConfigFile(path string) (*nodeConfig, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var nc nodeConfig
	if err := json.Unmarshal(b, &nc); err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	return &nc, nil
}

func recoverQuorumCmd() *cobra.Command {
	var dataDir string
	var survivors []string
	var understood bool
	cmd := &cobra.Command{
		Use:   "recover-quorum",
		Short: "DANGER: force a new Raft configuration on a stopped survivor after quorum was lost for good",
		Long: `recover-quorum is the last resort when a majority of the voters is lost for good (machines
gone, disks gone) and the cluster cannot elect a leader. Run it on each SURVIVING node with its
server STOPPED, with the same --survivors list everywhere (node ids; addresses and suffrage come
from the node records in the node's own replicated state; default: this node alone), then start
the survivors. It rewrites the node's Raft configuration (raft.RecoverCluster): entries that were
appended but never committed become committed, so a write that failed may turn out to have
happened. Never run it while the lost nodes could come back with the old configuration: wipe
them, and bring them back with 'cabinet operator rejoin' after 'cabinet operator remove'.

  cabinet operator recover-quorum --data-dir DIR [--survivors node1,node2] --yes-i-understand`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dataDir == "" {
				return errors.New("--data-dir is required")
			}
			nc, err := loadNodeConfig(dataDir)
			if err != nil {
				return fmt.Errorf("read this node's settings from %s: %w", dataDir, err)
			}
			raftDir := filepath.Join(dataDir, "raft")
			recs, err := cluster.ReadNodeRecords(raftDir)
			if err != nil {
				return err
			}
			if len(survivors) == 0 {
				survivors = []string{nc.NodeID}
			}
			byID := map[string]cluster.Server{}
			for _, r := range recs {
				byID[r.GetNodeId()] = cluster.Server{ID: r.GetNodeId(), RaftAddr: r.GetRaftAddr(), Voter: r.GetVoter()}
			}
			if _, ok := byID[nc.NodeID]; !ok {
				// The state has no record yet (e.g. the first node before
				// INIT_CLUSTER was applied): use node.json.
				byID[nc.NodeID] = cluster.Server{ID: nc.NodeID, RaftAddr: nc.RaftAddr, Voter: true}
			}
			var servers []cluster.Server
			var lost []string
			seen := map[string]bool{}
			for _, id := range survivors {
				srv, ok := byID[id]
				if !ok {
					return fmt.Errorf("survivor %q has no node record in this node's state; known nodes: %s", id, strings.Join(sortedKeys(byID), ", "))
				}
				if !seen[id] {
					servers = append(servers, srv)
					seen[id] = true
				}
			}
			for _, id := range sortedKeys(byID) {
				if !seen[id] {
					lost = append(lost, id)
				}
			}
			w := cmd.ErrOrStderr()
			fmt.Fprintln(w, "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!")
			fmt.Fprintln(w, "!!  RECOVER QUORUM: this forces a new Raft configuration on this node.        !!")
			fmt.Fprintln(w, "!!  Uncommitted log entries become committed. Lost nodes must NEVER return   !!")
			fmt.Fprintln(w, "!!  with their old data: wipe them and rejoin them.                          !!")
			fmt.Fprintln(w, "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!")
			for _, s := range servers {
				role := "voter"
				if !s.Voter {
					role = "non-voter"
				}
				fmt.Fprintf(w, "  keep   %s (%s, %s)\n", s.ID, s.RaftAddr, role)
			}
			for _, id := range lost {
				fmt.Fprintf(w, "  drop   %s\n", id)
			}
			if !understood {
				return errors.New("refusing without --yes-i-understand (nothing was changed)")
			}
			if err := cluster.RecoverCluster(cluster.RecoverConfig{NodeID: nc.NodeID, Dir: raftDir, Servers: servers}); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Recovered %s with configuration %s.\n", nc.NodeID, strings.Join(survivors, ","))
			fmt.Fprintf(cmd.OutOrStdout(), "Next: run the same command on every other survivor, start the survivors, then remove the lost nodes' records:\n")
			for _, id := range lost {
				fmt.Fprintf(cmd.OutOrStdout(), "  cabinet operator remove %s\n", id)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&dataDir, "data-dir", "", "this (stopped) node's data directory")
	cmd.Flags().StringSliceVar(&survivors, "survivors", nil, "node ids of every surviving node (default: this node alone)")
	cmd.Flags().BoolVar(&understood, "yes-i-understand", false, "confirm that the lost nodes are gone for good")
	return cmd
}

func sortedKeys[V any](m map[string]V) []string { return slices.Sorted(maps.Keys(m)) }
