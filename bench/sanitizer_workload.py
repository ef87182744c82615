"""A small workload for compute-sanitizer (bench/gpu_check.sh): forward and backward of every
CUDA kernel rnn_ext has -- the per-step kernels and the persistent ones (FMA, tensor cores in
bf16 / fp16 / TF32, the multi-layer wavefront, bidirectional, packed) -- on shapes small enough
for a run under memcheck / racecheck / synccheck / initcheck to take seconds.

    compute-sanitizer --tool memcheck --kernel-name kns=rnn_ext python bench/sanitizer_workload.py

Prints one line per case: the case, the kernel and persistent variant that ran forward and
backward, and the largest difference from a float64 CPU run (a sanity check; the sanitizer's
report is the result).  Exits 1 if a case's numbers are off or a case that should run
persistent did not.  --no-persistent runs the step cases only (gpu_check.sh passes it when a
persistent stage hung); --from N starts at case N; --dtypes runs the cases of those dtypes.  Each case's start is printed first
("case N of M starts: KERNEL"), so a log shows where a crash or hang happened.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_ext
from rnn_ext.cuda import cuda_persistent_variant

# (kernel, dtype, tf32, T, B, I, H, layers, bidirectional, packed lengths or None)
CASES = [
    ("step", torch.float32, False, 5, 3, 24, 40, 2, True, None),
    ("step", torch.bfloat16, False, 5, 3, 24, 40, 1, False, [5, 3, 2]),
    ("persistent", torch.float32, False, 5, 3, 24, 64, 3, False, None),  # FMA, wavefront
    ("persistent", torch.float32, True, 5, 3, 24, 64, 1, True, None),    # TF32 tensor cores
    ("persistent", torch.bfloat16, False, 5, 3, 24, 64, 2, True, None),  # mma, bidirectional
    ("persistent", torch.float16, False, 5, 3, 24, 64, 2, False, None),  # mma, wavefront
    ("persistent_fma", torch.bfloat16, False, 5, 3, 24, 64, 1, False, [5, 5, 5]),
]
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def run_case(kernel, dtype, tf32, T, B, I, H, L, bi, lengths):
    torch.manual_seed(T * 1000 + H + L)
    ext = rnn_ext.RNN(I, H, L, bidirectional=bi, dtype=torch.float64)
    D = 2 if bi else 1
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = 0.5 * torch.randn(L * D, B, H, dtype=torch.float64)

    def run(device, dt):
        # built on the CPU and moved: built on the GPU, RNNBase's constructor copies its
        # uninitialised weights into cuDNN's flat buffer, which initcheck reports (torch's copy)
        m = rnn_ext.RNN(I, H, L, bidirectional=bi, dtype=dt)
        m.load_state_dict(ext.state_dict())
        m = m.to(device)
        xx = x.to(device, dt).requires_grad_()
        h = hx.to(device, dt).requires_grad_()
        inp = xx if lengths is None else pack_padded_sequence(xx, torch.tensor(lengths))
        out, hn = m(inp, h)
        out = out if lengths is None else out.data
        (out.float().square().sum() + hn.float().sum()).backward()
        grads = [xx.grad, h.grad] + [p.grad for p in m.parameters()]
        return [t.detach().double().cpu() for t in [out, hn, *grads]]

    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        rnn_ext.set_cuda_kernel(kernel)
        got = run("cuda", dtype)
        torch.cuda.synchronize()
        used = (rnn_ext.cuda_kernel_used(), rnn_ext.cuda_kernel_used("backward"))
        variant = (cuda_persistent_variant(), cuda_persistent_variant("backward"))
    finally:
        rnn_ext.set_cuda_kernel("step")
        torch.backends.cuda.matmul.fp32_precision = saved
    want = run("cpu", torch.float64)
    err = max(((g - w).abs().max() / w.abs().max().clamp_min(1.0)).item()
              for g, w in zip(got, want))
    tol = 5e-3 if tf32 else TOL[dtype]
    want_used = ("step", "step") if kernel == "step" else ("persistent", "persistent")
    ok = err <= tol * (L + 1) and used == want_used
    name = (f"{kernel} {str(dtype).replace('torch.', '')}{' tf32' if tf32 else ''} T{T} B{B} "
            f"I{I} H{H} L{L} {'bi' if bi else 'uni'}{' packed' if lengths else ''}")
    print(f"{name}: cuda_kernel_used forward={used[0]} backward={used[1]}, variant "
          f"forward={variant[0]} backward={variant[1]}, wavefront "
          f"{rnn_ext.cuda_wavefront_layers()}, max rel err {err:.2e} "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-persistent", action="store_true", help="the step cases only")
    ap.add_argument("--from", dest="first", type=int, default=0,
                    help="start at this case (gpu_check.sh: the cases after one that broke)")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16",
                    help="run only the cases of these dtypes (comma-separated)")
    args = ap.parse_args()
    dtypes = {getattr(torch, d.strip()) for d in args.dtypes.split(",") if d.strip()}
    if not (torch.cuda.is_available() and rnn_ext.backend_info()["cuda"]):
        print("needs a CUDA GPU and a CUDA build of rnn_ext", file=sys.stderr)
        return 2
    ok = True
    for i, case in enumerate(CASES):
        if i < args.first:
            continue
        if args.no_persistent and case[0] != "step":
            print(f"skipped (--no-persistent): {case[0]}")
            continue
        if case[1] not in dtypes:
            print(f"skipped (--dtypes): {case[0]} {str(case[1]).replace('torch.', '')}")
            continue
        # (gpu_check.sh reads this line: which case a crash or a hang happened in)
        print(f"case {i} of {len(CASES)} starts: {case[0]}", flush=True)
        ok &= run_case(*case)
    print("sanitizer workload:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
