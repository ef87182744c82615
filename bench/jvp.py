#!/usr/bin/env python
"""Forward-mode AD timing: rnn_ext.RNN forward + jvp (the fused rnn_jvp kernel) against its
forward alone, against the same jvp through rnn_ext.reference (the path where the kernel does
not apply) and against torch.nn.RNN under torch.autograd.forward_ad.

    python bench/jvp.py                                  # default grid, float32, CPU
    python bench/jvp.py --grid "100,16,128,128,2" --tangents all --repeats 9

Contenders, on the same weights, all under torch.no_grad() (forward AD does not need it):
  fwd        rnn_ext.RNN(x): the forward alone
  jvp        rnn_ext.RNN on dual tensors (forward + fused jvp)
  jvp_ref    the same with the jvp taken through rnn_ext.reference (forward-mode autograd of the
             plain-PyTorch loop; skipped above --ref-max-steps layer-steps: it is slow)
  torch_jvp  torch.nn.RNN on the same dual tensors
Tangents (--tangents): `input` (of the input only) or `all` (input, hx and every parameter,
through torch.func.functional_call).  Interleaved samples (A, B, C, A, ...), each at least
--min-sample-ms long; medians of the per-call time.  Writes JSON (machine, date, command) to
--out.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import rnn_ext  # noqa: E402
from rnn_ext import ops  # noqa: E402
from bench import machine_info  # noqa: E402  (bench/bench.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="5,4,1,3,2;100,16,128,128,2;100,64,256,256,2;50,64,512,512,1",
                   help="points T,B,I,H,L separated by ';'")
    p.add_argument("--tangents", choices=["input", "all"], default="input")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=int, default=7, help="interleaved samples per contender")
    p.add_argument("--min-sample-ms", type=float, default=20.0)
    p.add_argument("--ref-max-steps", type=int, default=400,
                   help="largest T*L*D at which jvp_ref runs")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--name", default=None)
    return p.parse_args(argv)


def per_call_ms(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) * 1e3 / n


def calls_for(fn, min_ms):
    n = 1
    while True:
        ms = per_call_ms(fn, n) * n
        if ms >= min_ms or n >= 1 << 16:
            return n
        n *= 2 if ms * 2 >= min_ms else max(2, int(min_ms / max(ms, 1e-3)))


def contenders(T, B, I, H, L, dtype, tangents, with_ref):
    torch.manual_seed(0)
    ref = torch.nn.RNN(I, H, L, dtype=dtype)
    ext = rnn_ext.RNN(I, H, L, dtype=dtype)
    ext.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=dtype)
    hx = torch.randn(L, B, H, dtype=dtype)
    tx, th = torch.randn_like(x), torch.randn_like(hx)
    params = {n: p.detach() for n, p in ext.named_parameters()}
    tp = {n: torch.randn_like(p) for n, p in params.items()}

    def jvp_of(m):
        def call():
            with torch.no_grad(), fwAD.dual_level():
                if tangents == "input":
                    out, h = m(fwAD.make_dual(x, tx), hx)
                else:
                    dual = {n: fwAD.make_dual(p, tp[n]) for n, p in params.items()}
                    out, h = functional_call(m, dual, (fwAD.make_dual(x, tx),
                                                       fwAD.make_dual(hx, th)))
                return fwAD.unpack_dual(out).tangent, fwAD.unpack_dual(h).tangent
        return call

    def fwd():
        with torch.no_grad():
            return ext(x, hx)

    ext_jvp = jvp_of(ext)

    def ext_jvp_ref():
        saved = ops._fused_jvp_applies
        ops._fused_jvp_applies = lambda *a: False
        try:
            return ext_jvp()
        finally:
            ops._fused_jvp_applies = saved

    c = {"fwd": fwd, "jvp": ext_jvp, "torch_jvp": jvp_of(ref)}
    if with_ref:
        c["jvp_ref"] = ext_jvp_ref
    # the contenders compute the same tangents
    a, b = ext_jvp(), c["torch_jvp"]()
    err = max((u - v).abs().max().item() for u, v in zip(a, b))
    return c, err


def main(argv=None):
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}, "
          f"tangents of {args.tangents}")
    print(f"{'T,B,I,H,L':>18} {'fwd ms':>9} {'jvp ms':>9} {'jvp/fwd':>8} {'jvp_ref ms':>11} "
          f"{'torch_jvp ms':>13} {'torch/jvp':>10}")
    for point in args.grid.split(";"):
        T, B, I, H, L = (int(v) for v in point.split(","))
        with_ref = T * L <= args.ref_max_steps
        cs, err = contenders(T, B, I, H, L, dtype, args.tangents, with_ref)
        n = {k: calls_for(f, args.min_sample_ms) for k, f in cs.items()}  # (also warms up)
        samples = {k: [] for k in cs}
        for _ in range(args.repeats):
            for k, f in cs.items():
                samples[k].append(per_call_ms(f, n[k]))
        med = {k: statistics.median(v) for k, v in samples.items()}
        row = dict(T=T, B=B, I=I, H=H, L=L, median_ms=med, samples_ms=samples,
                   max_abs_diff_vs_torch=err, jvp_over_fwd=med["jvp"] / med["fwd"],
                   torch_over_jvp=med["torch_jvp"] / med["jvp"])
        rows.append(row)
        ref_ms = f"{med['jvp_ref']:11.3f}" if "jvp_ref" in med else f"{'-':>11}"
        print(f"{point:>18} {med['fwd']:9.3f} {med['jvp']:9.3f} {row['jvp_over_fwd']:8.2f} "
              f"{ref_ms} {med['torch_jvp']:13.3f} {row['torch_over_jvp']:10.2f}", flush=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    res = dict(date=now.isoformat(timespec="seconds"), command=" ".join([sys.executable] + sys.argv),
               machine=machine_info("cpu"), config=vars(args), rows=rows)
    os.makedirs(args.out, exist_ok=True)
    name = args.name or f"jvp-{now:%Y-%m-%d}-{args.tangents}"
    path = os.path.join(args.out, name + ".json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
