package main

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/cabinet-kms/cabinet/cluster"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// `cabinet operator snapshot save|inspect|restore`. The file format is
// cluster's backup format (cluster.ReadBackup): a header with the index,
// term and cluster, the Raft snapshot bytes, and a SHA-256 of everything.

func snapshotCmd(f *clientFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "snapshot",
		Short: "Save, inspect and restore snapshots of the cluster's state",
		Long: `A snapshot is the whole replicated state at one Raft index: keys (their material only
sealed under the cluster KEK), versions, aliases, grants, the deny list, nodes and the cluster
CA (its key sealed too). It is useless without the KEK: keep a recovery bundle
('cabinet operator recovery export') next to it for disaster recovery. See docs/DR.md.`,
	}
	cmd.AddCommand(snapshotSaveCmd(f), snapshotInspectCmd(f), snapshotRestoreCmd(f))
	return cmd
}

func snapshotSaveCmd(f *clientFlags) *cobra.Command {
	var progress string
	var force bool
	cmd := &cobra.Command{
		Use:   "save FILE",
		Short: "Stream a consistent snapshot from the leader (through any node) into FILE (admin)",
		Long: `save asks the node at --addr for a snapshot; the leader takes a fresh Raft snapshot that
covers every committed write and streams it (a follower relays it). The stream's SHA-256 is
checked, the file gets its own checksum, and the written file is read back and validated
before save reports success. A progress bar goes to stderr (--progress).`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			path := args[0]
			if !force {
				if _, err := os.Stat(path); err == nil {
					return fmt.Errorf("%s exists; choose another name or pass --force", path)
				}
			}
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			stream, err := cabinetpb.NewOperatorServiceClient(conn).SnapshotSave(ctx, &cabinetpb.SnapshotSaveRequest{})
			if err != nil {
				return rpcError(err)
			}
			first, err := stream.Recv()
			if err != nil {
				return rpcError(err)
			}
			meta := first.GetMeta()
			if meta == nil {
				return errors.New("the server's snapshot stream did not start with metadata")
			}
			tmp := path + ".partial"
			out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
			if err != nil {
				return err
			}
			ok := false
			defer func() {
				if !ok {
					out.Close()
					os.Remove(tmp)
				}
			}()
			bw, err := cluster.NewBackupWriter(out, cluster.BackupHeader{
				ClusterID: meta.GetClusterId(), Index: meta.GetIndex(), Term: meta.GetTerm(),
				TakenAt: meta.GetTakenAt().AsTime().UTC(), Size: int64(meta.GetSize()),
			})
			if err != nil {
				return err
			}
			stderr := cmd.ErrOrStderr()
			var bar *progressBar
			if showProgress(progress, stderr, int64(meta.GetSize())) {
				bar = newProgressBar(stderr, "snapshot", int64(meta.GetSize()))
			}
			h := sha256.New()
			var sum string
			for chunk := first; ; {
				if sum != "" && len(chunk.GetData()) > 0 {
					return errors.New("snapshot stream: data after the checksum")
				}
				if _, err := bw.Write(chunk.GetData()); err != nil {
					return err
				}
				h.Write(chunk.GetData())
				if bar != nil {
					bar.add(len(chunk.GetData()))
				}
				if chunk.GetSha256() != "" {
					sum = chunk.GetSha256()
				}
				chunk, err = stream.Recv()
				if err == io.EOF {
					break
				}
				if err != nil {
					if bar != nil {
						bar.finish(false)
					}
					return fmt.Errorf("snapshot stream broke off: %w", rpcError(err))
				}
			}
			got := hex.EncodeToString(h.Sum(nil))
			if sum == "" || subtle.ConstantTimeCompare([]byte(got), []byte(sum)) != 1 {
				if bar != nil {
					bar.finish(false)
				}
				return fmt.Errorf("snapshot stream checksum mismatch: the server sent %q, the received data hashes to %s; nothing saved", sum, got)
			}
			if err := bw.Close(); err != nil {
				return err
			}
			if err := out.Sync(); err != nil {
				return err
			}
			if err := out.Close(); err != nil {
				return err
			}
			if bar != nil {
				bar.finish(true)
			}
			b, err := readBackupFile(tmp)
			if err != nil {
				return fmt.Errorf("the saved file does not read back: %w", err)
			}
			if err := os.Rename(tmp, path); err != nil {
				return err
			}
			ok = true
			if dir, err := os.Open(filepath.Dir(path)); err == nil {
				_ = dir.Sync()
				dir.Close()
			}
			if f.output == "json" {
				return printAnyJSON(cmd.OutOrStdout(), inspectReport(path, b))
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Saved snapshot of cluster %s at index %d, term %d to %s (%s, %d keys, sha256 %s).\n",
				b.Header.ClusterID, b.Header.Index, b.Header.Term, path, humanBytes(b.Header.Size), len(b.State.GetKeys()), b.Checksum)
			return nil
		},
	}
	cmd.Flags().StringVar(&progress, "progress", "auto", "progress bar on stderr: auto (a terminal), always or never")
	cmd.Flags().BoolVar(&force, "force", false, "overwrite FILE if it exists")
	return cmd
}

func readBackupFile(path string) (*cluster.Backup, error) {
	in, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer in.Close()
	b, err := cluster.ReadBackup(in)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return b, nil
}

type snapshotReport struct {
	File        string               `json:"file"`
	ClusterID   string               `json:"cluster_id"`
	Index       uint64               `json:"index"`
	Term        uint64               `json:"term"`
	TakenAt     time.Time            `json:"taken_at"`
	Size        int64                `json:"size"`
	Checksum    string               `json:"sha256"`
	StateDigest string               `json:"state_digest"`
	Summary     cluster.StateSummary `json:"state"`
}

func inspectReport(path string, b *cluster.Backup) snapshotReport {
	return snapshotReport{File: path, ClusterID: b.Header.ClusterID, Index: b.Header.Index, Term: b.Header.Term,
		TakenAt: b.Header.TakenAt, Size: b.Header.Size, Checksum: b.Checksum, StateDigest: b.StateDigest(),
		Summary: cluster.Summarize(b.State)}
}

func countsLine(m map[string]int) string {
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	sort.Strings(names)
	var parts []string
	for _, n := range names {
		parts = append(parts, fmt.Sprintf("%s %d", n, m[n]))
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ", ")
}

func snapshotInspectCmd(f *clientFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "inspect FILE",
		Short: "Validate a snapshot file and show what it holds, without restoring it (offline)",
		Long: `inspect checks the file's checksum, the snapshot's own checksum and the state's consistency
(exactly what a restore checks), then prints the index, term, key counts by state and spec,
KEK versions and nodes. It needs no cluster and no credentials. Exit status 1 if the file is
damaged.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			b, err := readBackupFile(args[0])
			if err != nil {
				return err
			}
			r := inspectReport(args[0], b)
			if f.output == "json" {
				return printAnyJSON(cmd.OutOrStdout(), r)
			}
			s := r.Summary
			t := newTable(cmd.OutOrStdout())
			fmt.Fprintf(t, "File\t%s (valid)\n", r.File)
			fmt.Fprintf(t, "Cluster\t%s\n", r.ClusterID)
			fmt.Fprintf(t, "Index\t%d\n", r.Index)
			fmt.Fprintf(t, "Term\t%d\n", r.Term)
			fmt.Fprintf(t, "Taken at\t%s\n", r.TakenAt.Format(time.RFC3339))
			fmt.Fprintf(t, "Size\t%s (%d bytes)\n", humanBytes(r.Size), r.Size)
			fmt.Fprintf(t, "SHA-256\t%s\n", r.Checksum)
			fmt.Fprintf(t, "State digest\t%s\n", r.StateDigest)
			fmt.Fprintf(t, "Keys\t%d (%d versions)\n", s.Keys, s.Versions)
			fmt.Fprintf(t, "  by state\t%s\n", countsLine(s.ByState))
			fmt.Fprintf(t, "  by spec\t%s\n", countsLine(s.BySpec))
			for _, k := range s.KEKs {
				cur := ""
				if k.Version == s.CurrentKEK {
					cur = ", current"
				}
				fmt.Fprintf(t, "KEK v%d\t%s%s, check value %s, %d key versions sealed under it\n", k.Version, k.State, cur, k.CheckValue, k.Keys)
			}
			fmt.Fprintf(t, "Nodes\t%s\n", strings.Join(s.Nodes, ", "))
			fmt.Fprintf(t, "Grants\t%d\n", s.Grants)
			fmt.Fprintf(t, "Denied principals\t%d\n", s.Denied)
			return t.Flush()
		},
	}
}

func snapshotRestoreCmd(f *clientFlags) *cobra.Command {
	var yes bool
	cmd := &cobra.Command{
		Use:   "restore FILE --yes",
		Short: "Replace the running cluster's state with a snapshot (admin; destructive)",
		Long: `restore validates FILE locally, streams it to the node at --addr, which relays it to the
leader; the leader checks it again, checks that the snapshot is of this cluster and that this
cluster's HSMs hold its KEK versions, and makes it the state of every node (Raft restore).
Everything written after the snapshot was taken is lost: keys created since disappear, keys
destroyed since come back (their material included). The cluster's current members stay.
To build a new cluster from a snapshot (new HSMs), use 'cabinet operator recovery restore'.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			b, err := readBackupFile(args[0])
			if err != nil {
				return fmt.Errorf("refusing to restore: %w", err)
			}
			if !yes {
				return fmt.Errorf("restoring replaces ALL of the cluster's state with the snapshot of cluster %s at index %d (taken %s, %d keys): every write made since is lost; re-run with --yes to do it",
					b.Header.ClusterID, b.Header.Index, b.Header.TakenAt.Format(time.RFC3339), len(b.State.GetKeys()))
			}
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			stream, err := cabinetpb.NewOperatorServiceClient(conn).SnapshotRestore(ctx)
			if err != nil {
				return rpcError(err)
			}
			meta := &cabinetpb.SnapshotMeta{Index: b.Header.Index, Term: b.Header.Term, Size: uint64(len(b.Data)), ClusterId: b.Header.ClusterID}
			sum := sha256.Sum256(b.Data)
			const chunkSize = 256 << 10
			for off := 0; ; off += chunkSize {
				end := min(off+chunkSize, len(b.Data))
				chunk := &cabinetpb.SnapshotChunk{Data: b.Data[off:end]}
				if off == 0 {
					chunk.Meta = meta
				}
				if end == len(b.Data) {
					chunk.Sha256 = hex.EncodeToString(sum[:])
				}
				if err := stream.Send(chunk); err != nil {
					break // the server's status comes with CloseAndRecv
				}
				if end == len(b.Data) {
					break
				}
			}
			resp, err := stream.CloseAndRecv()
			if err != nil {
				return rpcError(err)
			}
			if f.output == "json" {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "Restored the snapshot of index %d (%d keys) into cluster %s; the cluster continues from index %d.\n",
				b.Header.Index, resp.GetKeys(), b.Header.ClusterID, resp.GetIndex())
			return nil
		},
	}
	cmd.Flags().BoolVar(&yes, "yes", false, "confirm: replace the whole cluster state with the snapshot")
	return cmd
}
