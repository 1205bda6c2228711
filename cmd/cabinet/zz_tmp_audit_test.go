package main
import ("os";"testing";"time";"github.com/cabinet-kms/cabinet/transport/cabinetpb";"google.golang.org/protobuf/types/known/timestamppb")
func TestZZAuditTable(t *testing.T) {
	printAuditTable(os.Stdout, []*cabinetpb.AuditRecord{
		{Seq: 1, Time: timestamppb.New(time.Date(2025,1,2,3,4,5,6e6,time.UTC)), Principal: "alice", Operation: "/cabinet.v1.KeyService/Encrypt", KeyId: "k-abc", KeyVersion: 2, Outcome: "OK", RequestId: "r1", ClientAddr: "127.0.0.1:1"},
		{Seq: 2, Time: timestamppb.New(time.Date(2025,1,2,3,4,6,0,time.UTC)), Principal: "bob", Operation: "/cabinet.v1.KeyService/Decrypt", Outcome: "PermissionDenied", RequestId: "evil\x1b[2J\n", ClientAddr: "127.0.0.1:2"},
	})
}
