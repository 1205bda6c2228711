package client_test

import (
	"flag"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/cabinet-kms/cabinet/internal/testcluster"
)

// shared is the in-process cluster the examples and most tests use; tests
// that stop nodes start their own. TestMain also exports its CABINET_*
// environment, so the examples read like real code (client.FromEnv).
var shared *testcluster.Cluster

func TestMain(m *testing.M) {
	flag.Parse()
	// Fuzz workers run only the fuzz function, which needs no cluster.
	if f := flag.Lookup("test.fuzzworker"); f != nil && f.Value.String() == "true" {
		os.Exit(m.Run())
	}
	tc, err := testcluster.New(testcluster.Config{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "start the test cluster:", err)
		os.Exit(1)
	}
	for _, kv := range tc.Env() {
		k, v, _ := strings.Cut(kv, "=")
		os.Setenv(k, v)
	}
	shared = tc
	code := m.Run()
	tc.Close()
	os.Exit(code)
}
