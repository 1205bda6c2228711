package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"unicode"

	"github.com/spf13/cobra"

	"github.com/cabinet-kms/cabinet/transport/audit"
	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// auditCmd is `cabinet operator audit`: verify a node's hash-chained audit
// log (remotely or a local file) and show its latest records.
func auditCmd(f *clientFlags) *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "Inspect and verify a node's hash-chained audit log"}
	cmd.AddCommand(auditVerifyCmd(f), auditTailCmd(f))
	return cmd
}

func auditVerifyCmd(f *clientFlags) *cobra.Command {
	var file string
	cmd := &cobra.Command{
		Use:   "verify",
		Short: "Check the audit hash chain of the node at --addr, or of a local file with --file",
		Long: `verify reads an audit log from its first record to its last and checks that each
record parses, carries the next sequence number, links to the previous record's hash and
hashes to its own. Without --file it asks the node at --addr to check its own log (operator
or admin). With --file it checks a local file, which needs no running node (use it when a
node refuses to start because its audit log's tail is damaged).

The exit status is 1 when the chain is broken; the output names the first bad record's
sequence number and what is wrong with it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var resp *cabinetpb.AuditVerifyResponse
			line := 0
			if file != "" {
				if f.output != "table" && f.output != "json" {
					return fmt.Errorf("--output must be table or json, not %q", f.output)
				}
				rep, err := audit.Verify(file)
				if err != nil {
					return err
				}
				resp = &cabinetpb.AuditVerifyResponse{Ok: rep.OK, Records: rep.Records, FirstBadSeq: rep.FirstBadSeq, Problem: rep.Problem, File: file}
				line = rep.Line
			} else {
				conn, ctx, done, err := f.connect(cmd.Context())
				if err != nil {
					return err
				}
				defer done()
				resp, err = cabinetpb.NewOperatorServiceClient(conn).AuditVerify(ctx, &cabinetpb.AuditVerifyRequest{})
				if err != nil {
					return rpcError(err)
				}
				line = int(resp.GetFirstBadSeq())
			}
			if err := printVerify(cmd.OutOrStdout(), f.output, resp, line); err != nil {
				return err
			}
			if !resp.GetOk() {
				return fmt.Errorf("audit chain broken at record %d: %s", resp.GetFirstBadSeq(), resp.GetProblem())
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&file, "file", "", "verify this local audit log file instead of asking --addr")
	return cmd
}

func printVerify(w io.Writer, output string, resp *cabinetpb.AuditVerifyResponse, line int) error {
	if output == "json" {
		return printJSON(w, resp)
	}
	t := newTable(w)
	fmt.Fprintf(t, "File\t%s\n", resp.GetFile())
	if resp.GetOk() {
		fmt.Fprintf(t, "Chain\tOK\n")
		fmt.Fprintf(t, "Records\t%d\n", resp.GetRecords())
		return t.Flush()
	}
	fmt.Fprintf(t, "Chain\tBROKEN\n")
	fmt.Fprintf(t, "Good records\t%d (seq 1..%d)\n", resp.GetRecords(), resp.GetRecords())
	if line > 0 {
		fmt.Fprintf(t, "First bad record\tseq %d (line %d)\n", resp.GetFirstBadSeq(), line)
	} else {
		fmt.Fprintf(t, "First bad record\tseq %d\n", resp.GetFirstBadSeq())
	}
	fmt.Fprintf(t, "Problem\t%s\n", resp.GetProblem())
	return t.Flush()
}

func auditTailCmd(f *clientFlags) *cobra.Command {
	var count int
	cmd := &cobra.Command{
		Use:   "tail",
		Short: "Show the most recent audit records of the node at --addr",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if count < 1 || count > audit.MaxTail {
				return fmt.Errorf("-n must be 1..%d, not %d", audit.MaxTail, count)
			}
			conn, ctx, done, err := f.connect(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			resp, err := cabinetpb.NewOperatorServiceClient(conn).AuditTail(ctx, &cabinetpb.AuditTailRequest{Count: int32(count)})
			if err != nil {
				return rpcError(err)
			}
			if f.output == "json" {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			return printAuditTable(cmd.OutOrStdout(), resp.GetRecords())
		},
	}
	cmd.Flags().IntVarP(&count, "count", "n", 20, fmt.Sprintf("number of records (1..%d)", audit.MaxTail))
	return cmd
}

func printAuditTable(w io.Writer, recs []*cabinetpb.AuditRecord) error {
	if len(recs) == 0 {
		_, err := fmt.Fprintln(w, "No audit records.")
		return err
	}
	t := newTable(w)
	fmt.Fprintln(t, "TIME\tPRINCIPAL\tOPERATION\tKEY\tVERSION\tOUTCOME\tREQUEST ID\tCLIENT")
	for _, r := range recs {
		version := "-"
		if r.GetKeyVersion() != 0 {
			version = fmt.Sprint(r.GetKeyVersion())
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n",
			r.GetTime().AsTime().UTC().Format("2006-01-02T15:04:05.000Z07:00"),
			orDash(r.GetPrincipal()), orDash(strings.TrimPrefix(r.GetOperation(), "/cabinet.v1.")), orDash(r.GetKeyId()),
			version, orDash(r.GetOutcome()), orDash(r.GetRequestId()), orDash(r.GetClientAddr()))
	}
	return t.Flush()
}

// orDash prepares a field for the table: "-" when empty, quoted when it
// holds anything unprintable (a client-chosen request id must not move the
// operator's cursor or break the columns).
func orDash(s string) string {
	if s == "" {
		return "-"
	}
	if strings.IndexFunc(s, func(r rune) bool { return !unicode.IsPrint(r) }) >= 0 {
		return strconv.Quote(s)
	}
	return s
}
