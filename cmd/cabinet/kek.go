package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// kekCmd is `cabinet operator kek rotate|status`.
func kekCmd(f *clientFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "kek",
		Short: "Rotate the cluster's key-encryption key (KEK) and follow the rotation",
		Long: `The KEK is the AES-256 key inside every node's HSM under which all key material, the cluster
CA key, the gossip key and import tokens are sealed. Rotating it:

  1. generates KEK version current+1 inside the HSM of the node you talk to;
  2. delivers it to every other node wrapped under that node's HSM identity key (as joins do);
  3. once every node holds it, makes it current: new material is sealed under it;
  4. re-wraps every blob sealed under the old version in bounded batches while the cluster serves;
  5. retires the old version, and every node destroys it in its HSM.

Steps 2-5 run by themselves (also across leader changes and restarts); 'kek status' shows where
they are. A node that is down holds step 3 until it is back or removed. After a rotation, export a
new recovery bundle ('cabinet operator recovery export'): older bundles and snapshots only hold the
old KEK, which no HSM keeps any more.`,
	}
	cmd.AddCommand(kekRotateCmd(f), kekStatusCmd(f))
	return cmd
}

func kekRotateCmd(f *clientFlags) *cobra.Command {
	var reqID string
	var wait bool
	var waitTimeout time.Duration
	cmd := &cobra.Command{
		Use:   "rotate",
		Short: "Start a KEK rotation (admin); with --wait, follow it until the old version is destroyed",
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
			resp, err := cabinetpb.NewOperatorServiceClient(conn).RotateKEK(ctx, &cabinetpb.RotateKEKRequest{RequestId: reqID})
			if err != nil {
				return rpcError(err)
			}
			if !wait {
				if f.output == "json" {
					return printJSON(cmd.OutOrStdout(), resp)
				}
				_, err := fmt.Fprintf(cmd.OutOrStdout(), "KEK rotation started.\n%s\nFollow it with: cabinet operator kek status\n", resp.GetSummary())
				return err
			}
			final, err := followKEK(cmd.Context(), conn, cmd.ErrOrStderr(), f.timeout, waitTimeout)
			if err != nil {
				return err
			}
			if f.output == "json" {
				return printJSON(cmd.OutOrStdout(), final)
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "KEK rotation done: version %d is current and the old version is destroyed in every HSM.\n"+
				"Export a new recovery bundle now: cabinet operator recovery export --recovery-pubkey FILE --out FILE\n", final.GetCurrentVersion())
			return err
		},
	}
	cmd.Flags().StringVar(&reqID, "request-id", "", "idempotency key (default: a fresh one)")
	cmd.Flags().BoolVar(&wait, "wait", false, "follow the rotation and print its progress until it is done")
	cmd.Flags().DurationVar(&waitTimeout, "wait-timeout", 30*time.Minute, "with --wait: give up following after this long (the rotation itself continues)")
	return cmd
}

// followKEK polls KEKStatus until the rotation is done, printing each new
// summary on w.
func followKEK(parent context.Context, conn grpc.ClientConnInterface, w io.Writer, callTimeout, total time.Duration) (*cabinetpb.KEKStatusResponse, error) {
	ctx, cancel := context.WithTimeout(parent, total)
	defer cancel()
	client := cabinetpb.NewOperatorServiceClient(conn)
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	last := ""
	for {
		cctx, ccancel := context.WithTimeout(ctx, callTimeout)
		st, err := client.KEKStatus(cctx, &cabinetpb.KEKStatusRequest{})
		ccancel()
		switch {
		case err != nil && ctx.Err() == nil:
			fmt.Fprintf(w, "  (status: %v; retrying)\n", rpcError(err))
		case err == nil:
			if st.GetSummary() != last {
				last = st.GetSummary()
				fmt.Fprintf(w, "  %s  %s\n", time.Now().Format("15:04:05"), last)
			}
			if st.GetDone() {
				return st, nil
			}
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("stopped following after %v; the rotation continues in the cluster (last: %s); check with `cabinet operator kek status`", total, last)
		case <-tick.C:
		}
	}
}

func kekStatusCmd(f *clientFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show the KEK versions, their states and the progress of a rotation",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			st, err := cabinetpb.NewOperatorServiceClient(conn).KEKStatus(ctx, &cabinetpb.KEKStatusRequest{})
			if err != nil {
				return rpcError(err)
			}
			if f.output == "json" {
				return printJSON(cmd.OutOrStdout(), st)
			}
			return printKEKStatus(cmd.OutOrStdout(), st)
		},
	}
}

func printKEKStatus(w io.Writer, st *cabinetpb.KEKStatusResponse) error {
	fmt.Fprintf(w, "Current KEK version: %d   phase: %s\n%s\n\n", st.GetCurrentVersion(), st.GetPhase(), st.GetSummary())
	t := newTable(w)
	fmt.Fprintln(t, "VERSION\tSTATE\tCHECK VALUE\tSEALED BLOBS\tINSTALLED ON\tREMOVED FROM\tWAITING FOR\tCREATED")
	dash := func(s []string) string {
		if len(s) == 0 {
			return "-"
		}
		return strings.Join(s, ",")
	}
	for _, v := range st.GetVersions() {
		created := "-"
		if v.GetCreated() != nil {
			created = v.GetCreated().AsTime().UTC().Format(time.RFC3339)
		}
		fmt.Fprintf(t, "%d\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", v.GetVersion(), v.GetState(), v.GetCheckValue(), v.GetSealedBlobs(),
			dash(v.GetInstalledOn()), dash(v.GetRemovedFrom()), dash(v.GetWaitingFor()), created)
	}
	return t.Flush()
}
