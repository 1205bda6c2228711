package main

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// TestDocsAreCurrent fails when docs/cli, docs/CONFIG.md or docs/API.md
// differ from what the command tree, the server flags and cabinet.proto
// generate: run `make docs` and commit the result.
func TestDocsAreCurrent(t *testing.T) {
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "CABINET_") {
			t.Setenv(k, "") // flag defaults read some of these
		}
	}
	proto, err := os.ReadFile("../../transport/cabinetpb/cabinet.proto")
	if err != nil {
		t.Fatal(err)
	}
	pages, err := generateDocs(newRootCmd(), proto)
	if err != nil {
		t.Fatal(err)
	}
	if stale := staleDocs("../../docs", pages); len(stale) > 0 {
		t.Fatalf("generated docs are stale; run `make docs`:\n  %s", strings.Join(stale, "\n  "))
	}
}

// TestConfigReferenceListsEveryOption: every server flag appears in
// docs/CONFIG.md with its environment variable (guards the generator too).
func TestConfigReferenceListsEveryOption(t *testing.T) {
	doc, err := os.ReadFile("../../docs/CONFIG.md")
	if err != nil {
		t.Fatal(err)
	}
	fs := newServerCmd().Flags()
	n := 0
	fs.VisitAll(func(fl *pflag.Flag) {
		if configOnlyFlags[fl.Name] {
			return
		}
		n++
		row := "| `" + fl.Name + "` | `--" + fl.Name + "` | `" + configEnvName(fl.Name) + "` |"
		if !strings.Contains(string(doc), row) {
			t.Errorf("docs/CONFIG.md has no row for %s (%s)", fl.Name, configEnvName(fl.Name))
		}
	})
	if n < 15 {
		t.Fatalf("only %d server options found", n)
	}
}

func TestParseProtoRejectsWhatItDoesNotUnderstand(t *testing.T) {
	for _, src := range []string{
		"syntax = \"proto3\";\nmessage A {\n  message B { int32 x = 1; }\n}\n",
		"syntax = \"proto3\";\nservice S {\n  rpc X(A) returns (B) {}\n",
		"syntax = \"proto3\";\nmessage A {\n  int32 x = 1;\n",
	} {
		if _, _, _, err := parseProto([]byte(src)); err == nil {
			t.Errorf("parseProto accepted:\n%s", src)
		}
	}
	_, _, items, err := parseProto([]byte("syntax = \"proto3\";\npackage p;\n// S does things.\nservice S {\n  // X is x.\n  rpc X(A) returns (stream B);\n}\nmessage A { int32 x = 1; }\n// B is b.\nmessage B {\n  map<string, string> m = 1; // the map\n  repeated A as = 2;\n}\nenum E {\n  E_UNSPECIFIED = 0;\n}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(items) != 4 || items[0].members[0].comment != "X is x." || items[0].members[0].resp != "stream B" ||
		items[2].members[0].typ != "map<string, string>" || items[2].members[0].comment != "the map" || items[2].members[1].base != "A" {
		t.Fatalf("parsed %+v", items)
	}
}

// TestDocsLinks: every relative link in docs/ points at a file that exists.
func TestDocsLinks(t *testing.T) {
	link := regexp.MustCompile(`\]\(([^)#\s]+)(?:#[^)]*)?\)`)
	err := filepath.WalkDir("../../docs", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(path, ".md") {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, m := range link.FindAllStringSubmatch(string(b), -1) {
			target := m[1]
			if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue
			}
			if _, err := os.Stat(filepath.Join(filepath.Dir(path), target)); err != nil {
				t.Errorf("%s links to %s, which does not exist", path, target)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
