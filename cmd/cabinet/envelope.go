package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/cabinet-kms/cabinet/client"
)

// envelopeCmds are `cabinet encrypt-file` and `cabinet decrypt-file`:
// envelope encryption of files of any size with the Go client library
// (client.Envelope; format in client/DESIGN.md).
func envelopeCmds() []*cobra.Command {
	return []*cobra.Command{encryptFileCmd(), decryptFileCmd()}
}

// fileFlags are the flags both file commands share.
type fileFlags struct {
	conn     clientFlags
	contexts []string
	force    bool
	progress string
}

func addFileFlags(cmd *cobra.Command, f *fileFlags) {
	addClientFlags(cmd, &f.conn)
	// These commands use the client library: several endpoints fail over,
	// and the timeout applies per call, not to the whole file.
	cmd.PersistentFlags().Lookup("addr").Usage = "Cabinet node addresses, comma-separated, tried in order (env CABINET_ADDR)"
	cmd.PersistentFlags().Lookup("timeout").Usage = "deadline for each call to Cabinet (not for the whole file)"
	cmd.Flags().StringArrayVar(&f.contexts, "context", nil, "encryption context pair k=v (repeatable); decrypt-file needs the same pairs")
	cmd.Flags().BoolVarP(&f.force, "force", "f", false, "overwrite OUT if it exists")
	cmd.Flags().StringVar(&f.progress, "progress", "auto", "progress bar on stderr: auto (a terminal and a file of 8 MiB or more), always or never")
}

func encryptFileCmd() *cobra.Command {
	f := &fileFlags{}
	var keyID string
	cmd := &cobra.Command{
		Use:   "encrypt-file --key K IN OUT",
		Short: "Encrypt a file of any size under a fresh data key from key K (envelope encryption)",
		Long: `encrypt-file asks Cabinet for one fresh AES-256 data key under --key (GenerateDataKey,
bound to the --context pairs), encrypts IN locally in authenticated 64 KiB chunks, and writes
OUT: a header holding the wrapped data key, then the chunks (format: client/DESIGN.md). The
plaintext never leaves this machine. OUT is written to a temporary file in its directory and
renamed into place when complete (mode 0600); an existing OUT is refused unless --force. IN or
OUT may be - for stdin or stdout.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if keyID == "" {
				return errors.New("--key is required: the key id or alias whose data key seals the file")
			}
			return runFileCmd(cmd, f, args[0], args[1], "encrypt", func(env *client.Envelope, w io.Writer, r io.Reader, encCtx map[string]string) error {
				return env.EncryptStream(cmd.Context(), w, r, keyID, encCtx)
			})
		},
	}
	addFileFlags(cmd, f)
	cmd.Flags().StringVarP(&keyID, "key", "k", "", "key id or alias (AES_256)")
	return cmd
}

func decryptFileCmd() *cobra.Command {
	f := &fileFlags{}
	cmd := &cobra.Command{
		Use:   "decrypt-file IN OUT",
		Short: "Decrypt a file made by encrypt-file",
		Long: `decrypt-file reads the wrapped data key from IN's header, has Cabinet decrypt it once
(with the --context pairs used to encrypt), and decrypts and authenticates every chunk locally.
A tampered, truncated, reordered or extended file fails, and then OUT is not created: the
plaintext goes to a temporary file that is renamed into place only when the whole file
authenticated (mode 0600). An existing OUT is refused unless --force. With OUT = - plaintext is
streamed to stdout as it authenticates: do not trust it unless the command succeeds.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runFileCmd(cmd, f, args[0], args[1], "decrypt", func(env *client.Envelope, w io.Writer, r io.Reader, encCtx map[string]string) error {
				return env.DecryptStream(cmd.Context(), w, r, encCtx)
			})
		},
	}
	addFileFlags(cmd, f)
	return cmd
}

// progressThreshold is the input size from which --progress auto shows a bar.
const progressThreshold = 8 << 20

type streamFunc func(env *client.Envelope, w io.Writer, r io.Reader, encCtx map[string]string) error

func runFileCmd(cmd *cobra.Command, f *fileFlags, in, out, verb string, run streamFunc) error {
	if f.progress != "auto" && f.progress != "always" && f.progress != "never" {
		return fmt.Errorf("--progress must be auto, always or never, not %q", f.progress)
	}
	if f.conn.output != "table" && f.conn.output != "json" {
		return fmt.Errorf("--output must be table or json, not %q", f.conn.output)
	}
	encCtx, err := parseContext(f.contexts)
	if err != nil {
		return err
	}
	if out != "-" && !f.force {
		if _, err := os.Lstat(out); err == nil {
			return fmt.Errorf("%s exists: use --force to overwrite it", out)
		}
	}
	src, size, err := openInput(cmd, in)
	if err != nil {
		return err
	}
	defer src.Close()

	c, err := newLibraryClient(&f.conn)
	if err != nil {
		return err
	}
	defer c.Close()
	env := client.NewEnvelope(c)

	var bar *progressBar
	if showProgress(f.progress, cmd.ErrOrStderr(), size) {
		bar = newProgressBar(cmd.ErrOrStderr(), verb+"ing", size)
	}
	r := &countingReader{r: src, ctx: cmd.Context(), bar: bar}
	err = writeOutput(cmd.OutOrStdout(), out, f.force, func(w io.Writer) error {
		return run(env, w, r, encCtx)
	})
	if bar != nil {
		bar.finish(err == nil)
	}
	if err != nil {
		return fmt.Errorf("%s %s: %w", verb, in, rpcError(err))
	}
	if out == "-" {
		return nil
	}
	if f.conn.output == "json" {
		return printAnyJSON(cmd.OutOrStdout(), map[string]any{"operation": verb, "in": in, "out": out, "bytes_read": r.n})
	}
	_, err = fmt.Fprintf(cmd.OutOrStdout(), "%sed %s (%s) to %s\n", verb, in, humanBytes(r.n), out)
	return err
}

// newLibraryClient builds a client.Client from the connection flags:
// --addr may list several endpoints (comma-separated) for failover;
// --timeout bounds each call to Cabinet, not the whole file.
func newLibraryClient(f *clientFlags) (*client.Client, error) {
	cfg, err := f.tlsConfig()
	if err != nil {
		return nil, err
	}
	return client.New(client.SplitEndpoints(f.addr), client.WithTLSConfig(cfg), client.WithCallTimeout(f.timeout))
}

// openInput opens IN (- is stdin) and returns its size (-1 if unknown).
func openInput(cmd *cobra.Command, in string) (io.ReadCloser, int64, error) {
	if in == "-" {
		return io.NopCloser(cmd.InOrStdin()), -1, nil
	}
	fh, err := os.Open(in)
	if err != nil {
		return nil, 0, err
	}
	st, err := fh.Stat()
	if err != nil {
		fh.Close()
		return nil, 0, err
	}
	if st.IsDir() {
		fh.Close()
		return nil, 0, fmt.Errorf("%s is a directory", in)
	}
	if !st.Mode().IsRegular() {
		return fh, -1, nil
	}
	return fh, st.Size(), nil
}

// writeOutput runs write into a temporary file next to out and moves it
// into place only if write succeeded: an existing out is replaced only
// with force (and never by a partial file). out = - writes to stdout.
func writeOutput(stdout io.Writer, out string, force bool, write func(io.Writer) error) (err error) {
	if out == "-" {
		bw := bufio.NewWriterSize(stdout, 256<<10)
		if err := write(bw); err != nil {
			return err
		}
		return bw.Flush()
	}
	dir, base := filepath.Split(out)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp-*") // mode 0600
	if err != nil {
		return err
	}
	committed := false
	defer func() {
		if !committed {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	bw := bufio.NewWriterSize(tmp, 256<<10)
	if err := write(bw); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if force {
		err = os.Rename(tmp.Name(), out)
	} else {
		// A hard link fails if out appeared meanwhile: no overwrite race.
		if err = os.Link(tmp.Name(), out); err == nil {
			os.Remove(tmp.Name())
		} else if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%s exists: use --force to overwrite it", out)
		} else if _, serr := os.Lstat(out); errors.Is(serr, fs.ErrNotExist) {
			err = os.Rename(tmp.Name(), out) // file systems without hard links
		}
	}
	if err != nil {
		return err
	}
	committed = true
	if d, err := os.Open(dir); err == nil { // persist the rename
		_ = d.Sync()
		d.Close()
	}
	return nil
}
