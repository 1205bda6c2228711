package fsm

import (
	"fmt"
	"testing"

	"github.com/hashicorp/raft"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// Issue 7: the follower-side cost of a CREATE_KEY (as `cabinet bench`
// proposes it: a 60-byte sealed AES-256 blob, an auto request id) against
// the NOOP ceiling of the same encoded size (no request id).

func benchCreateKeyLogs(b *testing.B, a *applier, index uint64, n int) ([]*raft.Log, int) {
	logs := make([]*raft.Log, n)
	size := 0
	for i := range logs {
		index++
		id := fmt.Sprintf("k-%026d", 2_000_000+i)
		p := &fsmpb.CreateKey{KeyId: id, Spec: fsmpb.KeySpec_KEY_SPEC_AES_256,
			Description: "cabinet-bench 0123456789ab",
			Material:    &fsmpb.WrappedBlob{KekVersion: 1, Blob: make([]byte, 60)}}
		logs[i] = logOf(b, index, a.command(typCreate, p, env{requestID: "auto-" + id, principal: "admin:bench"}))
		size = len(logs[i].Data)
	}
	return logs, size
}

func BenchmarkApplyCreateKeyBench(b *testing.B) {
	f, a, index := benchFSM(b, 10_000)
	logs, _ := benchCreateKeyLogs(b, a, index, b.N)
	b.ReportAllocs()
	b.ResetTimer()
	for _, l := range logs {
		f.ApplyBatch([]*raft.Log{l})
	}
}

func BenchmarkApplyNoopBench(b *testing.B) {
	f, a, index := benchFSM(b, 10_000)
	_, size := benchCreateKeyLogs(b, a, index, 1)
	logs := make([]*raft.Log, b.N)
	for i := range logs {
		index++
		cmd := a.command(fsmpb.CommandType_COMMAND_TYPE_NOOP, &fsmpb.Noop{Padding: make([]byte, size-40)}, env{principal: "admin:bench"})
		logs[i] = logOf(b, index, cmd)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for _, l := range logs {
		f.ApplyBatch([]*raft.Log{l})
	}
}
