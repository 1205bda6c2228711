package fsm

import (
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
)

// fillAll sets every field of m (recursively for messages) to a non-zero
// value derived from seed, so a field added to KeyRecord or KeyVersion and
// not copied by createdKeyView makes the comparison below fail.
func fillAll(m protoreflect.Message, seed int) {
	fields := m.Descriptor().Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		n := seed*100 + i + 1
		switch {
		case fd.IsMap():
			mp := m.Mutable(fd).Map()
			for j := range 3 {
				mp.Set(protoreflect.ValueOfString(string(rune('a'+j))).MapKey(), protoreflect.ValueOfString(string(rune('x'+j))))
			}
		case fd.IsList():
			l := m.Mutable(fd).List()
			for j := range 2 {
				e := l.NewElement()
				fillAll(e.Message(), n*10+j)
				l.Append(e)
			}
		case fd.Kind() == protoreflect.MessageKind:
			fillAll(m.Mutable(fd).Message(), n)
		default:
			m.Set(fd, scalarOf(fd, n))
		}
	}
}

func scalarOf(fd protoreflect.FieldDescriptor, n int) protoreflect.Value {
	switch fd.Kind() {
	case protoreflect.StringKind:
		return protoreflect.ValueOfString("s" + string(rune('A'+n%26)))
	case protoreflect.BytesKind:
		return protoreflect.ValueOfBytes([]byte{byte(n), byte(n >> 8)})
	case protoreflect.BoolKind:
		return protoreflect.ValueOfBool(true)
	case protoreflect.EnumKind:
		vals := fd.Enum().Values()
		return protoreflect.ValueOfEnum(vals.Get(vals.Len() - 1).Number())
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return protoreflect.ValueOfInt32(int32(n))
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return protoreflect.ValueOfInt64(int64(n) << 33)
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return protoreflect.ValueOfUint32(uint32(n))
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return protoreflect.ValueOfUint64(uint64(n) << 33)
	}
	panic("unhandled kind " + fd.Kind().String())
}

func TestCreatedKeyViewMatchesWithoutMaterial(t *testing.T) {
	full := &fsmpb.KeyRecord{}
	fillAll(full.ProtoReflect(), 1)
	for _, rec := range []*fsmpb.KeyRecord{
		full,
		{KeyId: keyID(1), Spec: fsmpb.KeySpec_KEY_SPEC_AES_256, Versions: []*fsmpb.KeyVersion{{Version: 1, Material: &fsmpb.WrappedBlob{KekVersion: 1, Blob: []byte{1}}}}},
		{KeyId: keyID(2)},
	} {
		before := proto.Clone(rec)
		got, want := createdKeyView(rec), withoutMaterial(rec)
		if !proto.Equal(got, want) {
			t.Fatalf("createdKeyView differs from withoutMaterial:\n got %v\nwant %v", got, want)
		}
		if !proto.Equal(rec, before) {
			t.Fatal("createdKeyView changed its input")
		}
		for _, v := range got.GetVersions() {
			if v.GetMaterial() != nil {
				t.Fatal("view carries material")
			}
		}
		// Nothing mutable is shared with the stored record.
		if len(rec.GetTags()) > 0 {
			got.Tags["zz"] = "new"
			if _, ok := rec.GetTags()["zz"]; ok {
				t.Fatal("view shares the tags map with the record")
			}
		}
		for i, v := range got.GetVersions() {
			if pk := v.GetPublicKeyDer(); len(pk) > 0 {
				pk[0] ^= 0xff
				if rec.GetVersions()[i].GetPublicKeyDer()[0] == pk[0] {
					t.Fatal("view shares public key bytes with the record")
				}
			}
		}
	}
	// Both marshal identically (deterministic encoding), as stored results must.
	a, _ := proto.MarshalOptions{Deterministic: true}.Marshal(createdKeyView(full))
	b, _ := proto.MarshalOptions{Deterministic: true}.Marshal(withoutMaterial(full))
	if string(a) != string(b) {
		t.Fatal("encodings differ")
	}
}
