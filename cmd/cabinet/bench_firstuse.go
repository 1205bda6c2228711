package main

import (
	"context"
	"fmt"
	"time"

	"github.com/cabinet-kms/cabinet/transport/cabinetpb"
)

// first-use: what the first use of a key version on a node costs (HSM
// unwrap into a cold cache) over a warm use. Keys are created through
// another node than the target when there is one, then made visible on the
// target with DescribeKey (no unwrap), then each is used twice in a row by
// one caller: Encrypt #1 (cold) and Encrypt #2 (warm, its "ceiling").
// Sequential on purpose: this is a latency, not a throughput.

const firstUseMaxKeys = 200

func firstUseKeys(f *benchFlags) int { return min(firstUseMaxKeys, max(20, f.concurrency)) }

func runFirstUse(ctx context.Context, env *benchEnv, prog *benchProgress) benchResult {
	f := env.f
	res := newBenchResult("first-use", "warm-use")
	target := env.targets[0]
	via := target
	for _, n := range env.nodes {
		if n.APIAddr != target.APIAddr && n.Healthy {
			via = n
			break
		}
	}
	vconn, err := benchDial(via.APIAddr, env.tlsCfg)
	if err != nil {
		res.Error = "setup: " + err.Error()
		return res
	}
	defer vconn.Close()
	vkc := cabinetpb.NewKeyServiceClient(vconn)
	tkc := env.kcs[0]
	n := firstUseKeys(f)
	keys := make([]string, 0, n)
	deadline := time.Now().Add(f.duration)
	for i := 0; i < n && ctx.Err() == nil && time.Now().Before(deadline); i++ {
		prog.status(func() string { return fmt.Sprintf("creating keys through %s: %d/%d", via.NodeID, i, n) })
		c, cancel := env.setupCtx(ctx)
		resp, err := vkc.CreateKey(c, &cabinetpb.CreateKeyRequest{Spec: cabinetpb.KeySpec_AES_256, Description: env.description(), RequestId: "bench-fu-" + benchRunID()})
		cancel()
		if err != nil {
			res.Error = fmt.Sprintf("setup: create a key through %s: %v", via.NodeID, rpcError(err))
			return res
		}
		keys = append(keys, resp.GetKey().GetKeyId())
	}
	for _, k := range keys {
		c, cancel := env.setupCtx(ctx)
		_, err := tkc.DescribeKey(c, &cabinetpb.DescribeKeyRequest{KeyId: k})
		cancel()
		if err != nil {
			res.Error = fmt.Sprintf("setup: describe %s on the target: %v", k, rpcError(err))
			return res
		}
	}
	pt := benchRandom(f.payload)
	cold := newPhase("cold", nil, 1, 1)
	warm := newPhase("warm", nil, 1, 1)
	use := func(ph *benchPhase, key string) {
		c := ph.callers[0]
		req := &cabinetpb.EncryptRequest{KeyId: key, Plaintext: pt, Consistency: env.consistency()}
		rctx, cancel := env.setupCtx(ctx)
		defer cancel()
		t0 := time.Now()
		_, err := tkc.Encrypt(rctx, req)
		d := time.Since(t0)
		if ctx.Err() != nil {
			return
		}
		c.requests++
		if err != nil {
			c.errs[benchErrCode(err)]++
			if c.firstErr == "" {
				c.firstErr = benchErrText(err)
			}
			return
		}
		c.ok++
		c.inWindow++
		c.hist.record(d)
		ph.window += d
	}
	for i, k := range keys {
		if ctx.Err() != nil {
			break
		}
		prog.status(func() string {
			return fmt.Sprintf("first and second use on %s: %d/%d keys", target.NodeID, i, len(keys))
		})
		use(cold, k)
		use(warm, k)
	}
	cold.slices, warm.slices = 1, 1
	res.Interrupted = ctx.Err() != nil
	res.Result, res.CeilingResult = cold.stats(), warm.stats()
	res.Result.CPUUSPerOp, res.Result.CPUCores, res.CeilingResult.CPUUSPerOp, res.CeilingResult.CPUCores = nil, nil, nil, nil
	if res.Result.OK == 0 && !res.Interrupted {
		res.Error = fmt.Sprintf("all %d first uses failed: %s", res.Result.Errors, res.Result.FirstError)
	} else if res.CeilingResult.OpsPerSec > 0 {
		res.Ratio = res.Result.OpsPerSec / res.CeilingResult.OpsPerSec
	}
	res.FirstUse = &benchFirstUse{
		Keys:        len(keys),
		CreatedVia:  via.NodeID,
		ExtraP50MS:  res.Result.LatencyMS.P50 - res.CeilingResult.LatencyMS.P50,
		ExtraMeanMS: res.Result.LatencyMS.Mean - res.CeilingResult.LatencyMS.Mean,
	}
	prog.logf("first-use: first use p50 %.2fms, second use p50 %.2fms: +%.2fms (%d keys created via %s)",
		res.Result.LatencyMS.P50, res.CeilingResult.LatencyMS.P50, res.FirstUse.ExtraP50MS, len(keys), via.NodeID)
	return res
}
