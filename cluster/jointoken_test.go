package cluster

import (
	"bytes"
	"strings"
	"testing"
)

func TestJoinTokenRoundTrip(t *testing.T) {
	tok, err := NewJoinToken("sha256:" + strings.Repeat("ab", 32))
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseJoinToken(tok.String())
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != tok.ID || !bytes.Equal(got.Secret, tok.Secret) || got.CAFingerprint != tok.CAFingerprint {
		t.Fatalf("round trip mismatch: %+v vs %+v", got.ID, tok.ID)
	}
}

func TestParseJoinTokenRejects(t *testing.T) {
	good, _ := NewJoinToken("sha256:" + strings.Repeat("ab", 32))
	parts := strings.Split(good.String(), ".")
	cases := map[string]string{
		"empty":        "",
		"prefix":       "cbj2." + strings.Join(parts[1:], "."),
		"short secret": strings.Join([]string{parts[0], parts[1], "AAAA", parts[3]}, "."),
		"bad fp":       strings.Join([]string{parts[0], parts[1], parts[2], "zz"}, "."),
		"extra part":   good.String() + ".x",
	}
	for name, in := range cases {
		if _, err := ParseJoinToken(in); err == nil {
			t.Errorf("%s: accepted %q", name, in)
		} else if strings.Contains(err.Error(), parts[2]) {
			t.Errorf("%s: error echoes the secret", name)
		}
	}
}

func FuzzParseJoinToken(f *testing.F) {
	good, _ := NewJoinToken("sha256:" + strings.Repeat("ab", 32))
	f.Add(good.String())
	f.Add("cbj1...")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := ParseJoinToken(s)
		if err != nil {
			return
		}
		again, err := ParseJoinToken(tok.String())
		if err != nil || again.ID != tok.ID || !bytes.Equal(again.Secret, tok.Secret) {
			t.Fatalf("re-encode mismatch for %q", s)
		}
	})
}
