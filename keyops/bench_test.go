package keyops

import (
	"context"
	"github.com/cabinet-kms/cabinet/fsm/fsmpb"
	"testing"
)

func benchSetup(b *testing.B) (*Engine, *testSealer, func(string) (*fsmpb.KeyRecord, bool), *fsmpb.KeyRecord, []byte) {
	b.Helper()
	e, s := newTestEngine(b, 0)
	key := newTestKey(b, e, 1)
	ct, _, err := e.Encrypt(context.Background(), key, make([]byte, 1024), map[string]string{"tenant": "acme"})
	if err != nil {
		b.Fatal(err)
	}
	return e, s, lookupOf(key), key, ct
}

var benchCtx = map[string]string{"tenant": "acme"}

func BenchmarkEncrypt1KiBWarm(b *testing.B) {
	e, _, _, key, _ := benchSetup(b)
	pt := make([]byte, 1024)
	b.SetBytes(1024)
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := e.Encrypt(context.Background(), key, pt, benchCtx); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecrypt1KiBWarm(b *testing.B) {
	e, _, lookup, _, ct := benchSetup(b)
	b.SetBytes(1024)
	b.ReportAllocs()
	for b.Loop() {
		if _, _, _, err := e.Decrypt(context.Background(), lookup, ct, benchCtx, false); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEncrypt1KiBWarmParallel(b *testing.B) {
	e, _, _, key, _ := benchSetup(b)
	b.SetBytes(1024)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		pt := make([]byte, 1024)
		for pb.Next() {
			if _, _, err := e.Encrypt(context.Background(), key, pt, benchCtx); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// First use: every operation misses the cache and unwraps through the
// (in-memory, software) Sealer. A real HSM adds ~12-22 µs per unwrap.
func BenchmarkEncrypt1KiBFirstUse(b *testing.B) {
	e, _, _, key, _ := benchSetup(b)
	pt := make([]byte, 1024)
	b.SetBytes(1024)
	b.ReportAllocs()
	for b.Loop() {
		e.Forget(key.KeyId)
		if _, _, err := e.Encrypt(context.Background(), key, pt, benchCtx); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecrypt1KiBFirstUse(b *testing.B) {
	e, _, lookup, key, ct := benchSetup(b)
	b.SetBytes(1024)
	b.ReportAllocs()
	for b.Loop() {
		e.Forget(key.KeyId)
		if _, _, _, err := e.Decrypt(context.Background(), lookup, ct, benchCtx, false); err != nil {
			b.Fatal(err)
		}
	}
}

// The cache hit path alone.
func BenchmarkCacheHit(b *testing.B) {
	e, _, _, key, _ := benchSetup(b)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		ent, err := e.material(ctx, key, 1)
		if err != nil {
			b.Fatal(err)
		}
		ent.release()
	}
}

func BenchmarkCacheHitParallel(b *testing.B) {
	e, _, _, key, _ := benchSetup(b)
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			ent, err := e.material(ctx, key, 1)
			if err != nil {
				b.Error(err)
				return
			}
			ent.release()
		}
	})
}

func benchSignKey(b *testing.B, spec fsmpb.KeySpec) (*Engine, *fsmpb.KeyRecord) {
	b.Helper()
	e, _ := newTestEngine(b, 0)
	return e, newSpecKey(b, e, spec, fsmpb.KeyUsage_KEY_USAGE_SIGN_VERIFY, 1)
}

// Warm Sign: the parsed private key comes from the cache.
func BenchmarkSignWarm(b *testing.B) {
	for _, spec := range []fsmpb.KeySpec{fsmpb.KeySpec_KEY_SPEC_EC_P256, fsmpb.KeySpec_KEY_SPEC_ED25519, fsmpb.KeySpec_KEY_SPEC_RSA_2048} {
		b.Run(specName(spec), func(b *testing.B) {
			e, key := benchSignKey(b, spec)
			msg := make([]byte, 1024)
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := e.Sign(context.Background(), key, msg, MessageRaw, firstAlg(spec)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// Verify parses the public key from the state on every call.
func BenchmarkVerify(b *testing.B) {
	for _, spec := range []fsmpb.KeySpec{fsmpb.KeySpec_KEY_SPEC_EC_P256, fsmpb.KeySpec_KEY_SPEC_ED25519, fsmpb.KeySpec_KEY_SPEC_RSA_2048} {
		b.Run(specName(spec), func(b *testing.B) {
			e, key := benchSignKey(b, spec)
			msg := make([]byte, 1024)
			sig, _, _ := e.Sign(context.Background(), key, msg, MessageRaw, firstAlg(spec))
			b.ReportAllocs()
			for b.Loop() {
				if ok, err := e.Verify(context.Background(), key, 0, msg, MessageRaw, firstAlg(spec), sig, false); !ok || err != nil {
					b.Fatal(ok, err)
				}
			}
		})
	}
}

// What a Sign would cost if the cache kept PKCS#8 and parsed it per use.
func BenchmarkParsePKCS8(b *testing.B) {
	for _, spec := range []fsmpb.KeySpec{fsmpb.KeySpec_KEY_SPEC_EC_P256, fsmpb.KeySpec_KEY_SPEC_ED25519, fsmpb.KeySpec_KEY_SPEC_RSA_2048} {
		b.Run(specName(spec), func(b *testing.B) {
			der := testMaterial(b, spec, 0)
			b.ReportAllocs()
			for b.Loop() {
				if _, _, err := parseSecret(spec, der); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkGenerateMacWarm(b *testing.B) {
	e, _ := newTestEngine(b, 0)
	key := newSpecKey(b, e, fsmpb.KeySpec_KEY_SPEC_HMAC_SHA256, fsmpb.KeyUsage_KEY_USAGE_GENERATE_VERIFY_MAC, 1)
	msg := make([]byte, 1024)
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := e.GenerateMac(context.Background(), key, msg); err != nil {
			b.Fatal(err)
		}
	}
}
