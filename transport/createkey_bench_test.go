package transport

import (
	"testing"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// Issue 7: the CreateKey handler as `cabinet bench` calls it (AES_256, a
// description, no request id) against ApplyNoop with a command of the same
// size, both through the in-process FSM (memory HSM, no gRPC).

func BenchmarkCreateKeyHandler(b *testing.B) {
	e := newBenchEnv(b)
	req := &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, Description: "cabinet-bench 0123456789ab"}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.srv.CreateKey(withNote(e.admin), req); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkApplyNoopHandler(b *testing.B) {
	e := newBenchEnv(b)
	req := &cabinetpb.ApplyNoopRequest{Size: 160}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := e.srv.ApplyNoop(withNote(e.admin), req); err != nil {
			b.Fatal(err)
		}
	}
}
