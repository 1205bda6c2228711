package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// gossipCmd is `cabinet operator gossip rotate-key`.
func gossipCmd(f *clientFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "gossip",
		Short: "Manage the gossip (memberlist) encryption key",
		Long: `Nodes gossip (discovery and failure detection) encrypted with an AES-256 key that lives in the
replicated state sealed under the KEK, so only nodes holding the KEK can gossip. A node that
leaves the cluster still knows the key it gossiped with: the leader replaces it by itself after
'cabinet operator remove' (and after a snapshot restore); 'rotate-key' replaces it on demand.

Each node installs the new key for decryption, encrypts with it about 2 s later and drops the old
key about 10 s after that. 'cabinet operator status' shows each node's progress (Gossip key line).`,
	}
	cmd.AddCommand(gossipRotateKeyCmd(f))
	return cmd
}

func gossipRotateKeyCmd(f *clientFlags) *cobra.Command {
	var reqID string
	cmd := &cobra.Command{
		Use:   "rotate-key",
		Short: "Replace the gossip encryption key with a new one from the HSM (admin)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			if reqID == "" {
				reqID = newRequestID()
			}
			resp, err := cabinetpb.NewOperatorServiceClient(conn).RotateGossipKey(ctx, &cabinetpb.RotateGossipKeyRequest{RequestId: reqID})
			if err != nil {
				return rpcError(err)
			}
			if f.output == "json" {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "Gossip key rotated: generation %d. Every node switches to it within seconds and drops the old key\n"+
				"about 10 s later; follow with: cabinet operator status (Gossip key line, on each node)\n", resp.GetGeneration())
			return err
		},
	}
	cmd.Flags().StringVar(&reqID, "request-id", "", "idempotency key (default: a fresh one)")
	return cmd
}

// gossipKeyLine is operator status's view of this node's gossip key.
func gossipKeyLine(st *cabinetpb.StatusResponse) string {
	line := gossipKeyState(st)
	switch {
	case !st.GetGossipKeyRotationDue():
	case st.GetClusterFeatureLevel() < st.GetFeatureLevel():
		line += "; replacement due (a member was removed or a snapshot restored): the leader replaces it once every node is on this release"
	default:
		line += "; replacement due (a member was removed or a snapshot restored): the leader replaces it within seconds; if this persists, see the leader's log (gossip must be enabled there)"
	}
	return line
}

func gossipKeyState(st *cabinetpb.StatusResponse) string {
	switch {
	case st.GetGossipKeyGeneration() == 0:
		return "none yet"
	case st.GetGossipKeyInUse() == 0:
		return fmt.Sprintf("generation %d; this node does not gossip (yet)", st.GetGossipKeyGeneration())
	case st.GetGossipKeyInUse() != st.GetGossipKeyGeneration() || st.GetGossipKeysHeld() > 1:
		return fmt.Sprintf("generation %d; this node encrypts with %d and holds %d keys (rotation under way)",
			st.GetGossipKeyGeneration(), st.GetGossipKeyInUse(), st.GetGossipKeysHeld())
	default:
		return fmt.Sprintf("generation %d, in use", st.GetGossipKeyGeneration())
	}
}
