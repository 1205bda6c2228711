package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// progressInterval bounds how often the bar is redrawn (10 times a second).
const progressInterval = 100 * time.Millisecond

// showProgress decides whether to draw a bar: always/never, or auto = a
// terminal and an input of known size of at least progressThreshold.
func showProgress(mode string, w io.Writer, size int64) bool {
	switch mode {
	case "always":
		return true
	case "never":
		return false
	}
	return size >= progressThreshold && isTerminal(w)
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// progressBar draws "verb [####....] done / total (pct%)" on one line,
// redrawn in place at most every progressInterval.
type progressBar struct {
	w     io.Writer
	label string
	total int64 // -1: unknown
	done  int64
	last  time.Time
	now   func() time.Time
	drawn bool
}

func newProgressBar(w io.Writer, label string, total int64) *progressBar {
	return &progressBar{w: w, label: label, total: total, now: time.Now}
}

func (p *progressBar) add(n int) {
	p.done += int64(n)
	if t := p.now(); t.Sub(p.last) >= progressInterval {
		p.last = t
		p.draw()
	}
}

func (p *progressBar) draw() {
	p.drawn = true
	if p.total <= 0 {
		fmt.Fprintf(p.w, "\r%s %s", p.label, humanBytes(p.done))
		return
	}
	const width = 30
	frac := min(1, float64(p.done)/float64(p.total))
	fill := int(frac * width)
	fmt.Fprintf(p.w, "\r%s [%s%s] %s / %s (%3.0f%%)", p.label,
		strings.Repeat("#", fill), strings.Repeat(".", width-fill), humanBytes(p.done), humanBytes(p.total), frac*100)
}

// finish draws the final state and ends the line.
func (p *progressBar) finish(ok bool) {
	p.draw()
	if ok {
		fmt.Fprintln(p.w, " done")
	} else {
		fmt.Fprintln(p.w, " failed")
	}
}

// countingReader counts the bytes read, feeds the progress bar, and stops
// reading once ctx is cancelled (Ctrl-C) so a large file is abandoned
// promptly and its temporary output removed.
type countingReader struct {
	r   io.Reader
	ctx context.Context
	bar *progressBar
	n   int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	n, err := c.r.Read(p)
	c.n += int64(n)
	if c.bar != nil && n > 0 {
		c.bar.add(n)
	}
	return n, err
}

// humanBytes formats a byte count with binary units.
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
