package audit

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// formatTag opens every record's canonical encoding, so a hash made for this
// format can never be confused with one made by a later format.
const formatTag = "cabinet-audit/v1"

// genesisHash is the prev_hash of a log's first record (32 zero bytes, hex).
var genesisHash = strings.Repeat("0", 2*sha256.Size)

// appendCanonical appends the unambiguous binary encoding of every field of r
// but PrevHash and Hash: fixed-width big-endian integers and uint32
// length-prefixed strings, in a fixed order (DESIGN.md, "Hash").
func appendCanonical(b []byte, r *Record) []byte {
	b = appendString(b, formatTag)
	b = binary.BigEndian.AppendUint64(b, r.Seq)
	b = binary.BigEndian.AppendUint64(b, uint64(r.Time.Unix()))
	b = binary.BigEndian.AppendUint32(b, uint32(r.Time.Nanosecond()))
	b = appendString(b, r.Node)
	b = appendString(b, r.Principal)
	b = appendString(b, r.Role)
	b = appendString(b, r.Operation)
	b = appendString(b, r.KeyID)
	b = binary.BigEndian.AppendUint32(b, r.KeyVersion)
	b = appendString(b, r.Outcome)
	b = appendString(b, r.RequestID)
	b = appendString(b, r.ClientAddr)
	return b
}

func appendString(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// chainHash returns SHA-256(prev || canon). h is reset first; passing one in
// lets Append reuse it.
func chainHash(h hash.Hash, prev *[sha256.Size]byte, canon []byte) [sha256.Size]byte {
	h.Reset()
	h.Write(prev[:])
	h.Write(canon)
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return sum
}

// appendLine appends r as one JSON line in canonical form: fields in
// declaration order, no spaces, time in RFC 3339 UTC with nanoseconds, only
// the escapes JSON requires. Verify re-encodes every parsed record with this
// function and requires the bytes to match, so any edit of a line shows.
func appendLine(b []byte, r *Record) []byte {
	b = append(b, `{"seq":`...)
	b = strconv.AppendUint(b, r.Seq, 10)
	b = append(b, `,"time":"`...)
	b = r.Time.UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","node":`...)
	b = appendJSONString(b, r.Node)
	b = append(b, `,"principal":`...)
	b = appendJSONString(b, r.Principal)
	b = append(b, `,"role":`...)
	b = appendJSONString(b, r.Role)
	b = append(b, `,"operation":`...)
	b = appendJSONString(b, r.Operation)
	b = append(b, `,"key_id":`...)
	b = appendJSONString(b, r.KeyID)
	b = append(b, `,"key_version":`...)
	b = strconv.AppendUint(b, uint64(r.KeyVersion), 10)
	b = append(b, `,"outcome":`...)
	b = appendJSONString(b, r.Outcome)
	b = append(b, `,"request_id":`...)
	b = appendJSONString(b, r.RequestID)
	b = append(b, `,"client_addr":`...)
	b = appendJSONString(b, r.ClientAddr)
	b = append(b, `,"prev_hash":`...)
	b = appendJSONString(b, r.PrevHash)
	b = append(b, `,"hash":`...)
	b = appendJSONString(b, r.Hash)
	return append(b, "}\n"...)
}

const hexDigits = "0123456789abcdef"

// appendJSONString quotes s, which must be valid UTF-8 (sanitize ensures
// it): '"', '\\' and control characters are escaped, everything else is
// copied as is.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' {
			continue
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
		}
		start = i + 1
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// MaxFieldBytes bounds each string field of a record; longer values (a
// hostile request id, say) are cut at a UTF-8 boundary and end in "…".
const MaxFieldBytes = 512

// MaxLineBytes bounds one line of the file, newline included. A record of
// MaxFieldBytes fields, each escaped at worst 6×, stays well below it.
const MaxLineBytes = 64 << 10

// sanitize makes every string field valid UTF-8 of at most MaxFieldBytes,
// so what is hashed is exactly what a JSON decoder reads back.
func sanitize(r *Record) {
	for _, p := range []*string{&r.Principal, &r.Role, &r.Operation, &r.KeyID, &r.Outcome, &r.RequestID, &r.ClientAddr} {
		*p = cleanField(*p)
	}
}

func cleanField(s string) string {
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
	}
	if len(s) <= MaxFieldBytes {
		return s
	}
	const ellipsis = "…"
	cut := MaxFieldBytes - len(ellipsis)
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + ellipsis
}

// checkTime refuses times RFC 3339 cannot carry (four-digit years).
func checkTime(t time.Time) error {
	if y := t.UTC().Year(); y < 0 || y > 9999 {
		return fmt.Errorf("audit: record time %v is outside years 0000-9999", t)
	}
	return nil
}

// parseLine decodes one line (without its newline). It checks only that the
// line is a JSON object of the record's shape; Verify checks the rest.
func parseLine(line []byte) (Record, error) {
	if r, ok := parseCanonical(line); ok {
		return r, nil
	}
	var r Record
	if len(line) == 0 {
		return r, errors.New("empty line")
	}
	if err := json.Unmarshal(line, &r); err != nil {
		return Record{}, err
	}
	return r, nil
}

// decodeHash parses a 64-digit lowercase hex hash.
func decodeHash(s string) ([sha256.Size]byte, bool) {
	var h [sha256.Size]byte
	if len(s) != 2*sha256.Size {
		return h, false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return h, false
		}
	}
	_, err := hex.Decode(h[:], []byte(s))
	return h, err == nil
}

// parseCanonical reads a line laid out exactly as appendLine writes it,
// several times faster than encoding/json. It reports false on any other
// layout; Verify then falls back to parseLine to say what is wrong.
func parseCanonical(line []byte) (Record, bool) {
	c := cursor{b: line, ok: true}
	var r Record
	c.lit(`{"seq":`)
	r.Seq = c.uint(64)
	c.lit(`,"time":`)
	if ts := c.str(); c.ok {
		t, err := time.Parse(time.RFC3339Nano, ts)
		c.ok = err == nil
		r.Time = t
	}
	c.lit(`,"node":`)
	r.Node = c.str()
	c.lit(`,"principal":`)
	r.Principal = c.str()
	c.lit(`,"role":`)
	r.Role = c.str()
	c.lit(`,"operation":`)
	r.Operation = c.str()
	c.lit(`,"key_id":`)
	r.KeyID = c.str()
	c.lit(`,"key_version":`)
	r.KeyVersion = uint32(c.uint(32))
	c.lit(`,"outcome":`)
	r.Outcome = c.str()
	c.lit(`,"request_id":`)
	r.RequestID = c.str()
	c.lit(`,"client_addr":`)
	r.ClientAddr = c.str()
	c.lit(`,"prev_hash":`)
	r.PrevHash = c.str()
	c.lit(`,"hash":`)
	r.Hash = c.str()
	c.lit(`}`)
	return r, c.ok && len(c.b) == 0
}

// cursor consumes a line; the first mismatch clears ok and later calls
// do nothing.
type cursor struct {
	b  []byte
	ok bool
}

func (c *cursor) lit(s string) {
	if c.ok && len(c.b) >= len(s) && string(c.b[:len(s)]) == s {
		c.b = c.b[len(s):]
		return
	}
	c.ok = false
}

// uint reads a decimal integer of at most bits bits, without leading zeros.
func (c *cursor) uint(bits int) uint64 {
	if !c.ok {
		return 0
	}
	var v uint64
	i := 0
	for ; i < len(c.b) && c.b[i] >= '0' && c.b[i] <= '9'; i++ {
		d := uint64(c.b[i] - '0')
		if i > 0 && v == 0 || v > (1<<bits-1-d)/10 {
			c.ok = false // leading zero or overflow
			return 0
		}
		v = v*10 + d
	}
	if i == 0 {
		c.ok = false
		return 0
	}
	c.b = c.b[i:]
	return v
}

// str reads a JSON string of valid UTF-8 using only the escapes
// appendJSONString writes.
func (c *cursor) str() string {
	if !c.ok || len(c.b) == 0 || c.b[0] != '"' {
		c.ok = false
		return ""
	}
	b := c.b[1:]
	end := -1
	escaped := false
	for i, ch := range b {
		if ch == '"' {
			end = i
			break
		}
		if ch == '\\' {
			escaped = true
			break
		}
		if ch < 0x20 {
			c.ok = false
			return ""
		}
	}
	if !escaped && end >= 0 && utf8.Valid(b[:end]) {
		c.b = b[end+1:]
		return string(b[:end])
	}
	var out []byte
	for i := 0; i < len(b); i++ {
		ch := b[i]
		switch {
		case ch == '"':
			if !utf8.Valid(out) {
				c.ok = false
				return ""
			}
			c.b = b[i+1:]
			return string(out)
		case ch < 0x20:
			c.ok = false
			return ""
		case ch != '\\':
			out = append(out, ch)
			continue
		case i+1 >= len(b):
			c.ok = false
			return ""
		}
		i++
		switch b[i] {
		case '"', '\\':
			out = append(out, b[i])
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			if i+4 >= len(b) || b[i+1] != '0' || b[i+2] != '0' || !isHexDigit(b[i+3]) || !isHexDigit(b[i+4]) {
				c.ok = false
				return ""
			}
			out = append(out, unhex(b[i+3])<<4|unhex(b[i+4]))
			i += 4
		default:
			c.ok = false
			return ""
		}
	}
	c.ok = false
	return ""
}

func isHexDigit(c byte) bool { return c >= '0' && c <= '9' || c >= 'a' && c <= 'f' }

func unhex(c byte) byte {
	if c <= '9' {
		return c - '0'
	}
	return c - 'a' + 10
}
