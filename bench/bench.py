#!/usr/bin/env python
"""rnn_ext's benchmark suite: rnn_ext.RNN against torch.nn.RNN (cuDNN on a GPU) and against
torch.compile of the plain-PyTorch reference (rnn_ext.reference.rnn).

    python bench/bench.py                       # default grid of this device (CUDA if present)
    python bench/bench.py --quick               # tiny grid, well under a minute
    python bench/bench.py --grid "100,16,128,128,2;50,64,512,512,2" --modes fwd --repeats 15
    python bench/bench.py --device cpu --dtypes float32 --contenders rnn_ext,torch

For each point (T, B, I, H, L, dtype) and mode it builds one torch.nn.RNN, loads its state_dict
into an rnn_ext.RNN (same weights for every contender), warms every contender up, then takes
*interleaved* samples (A, B, C, A, B, C, ...).  Each sample runs an adaptive number of calls
so that it lasts at least --min-sample-ms (20 ms on the CPU); CPU samples are timed with
time.perf_counter, CUDA samples with CUDA events after a synchronize.  Reported: medians,
IQR and min/max of the per-call time, speedups of rnn_ext, GFLOP/s and the fraction of the
"floor" (the same FLOPs run as a large square matrix product on this machine, measured in
the same run).

Modes
  fwd    forward under torch.inference_mode()
  train  forward + backward of out.sum() + h_n.sum() via torch.autograd.grad with respect to
         the input and every parameter (so nothing accumulates between calls)

FLOPs: a layer-direction with input width I_l does 2*T*B*(I_l + H)*H flops forward
(I_l = I for layer 0, D*H above); training counts 3x forward (forward, dgrad, wgrad).

compiled_reference: on a CPU, compiling the whole unrolled loop costs minutes per shape (it
took 85 s forward and 240 s training at T=100, L=2 on a 2-core machine), so by default
(--compile-scope auto) the whole function is compiled only when T*L*D <= --compile-full-max-steps,
otherwise torch.compile is applied to the reference's per-step cell (rnn_ext.reference._cell),
and the reference loop runs on the compiled cell.  A compile is done once per point and mode,
inside a time limit (--compile-timeout); a failure or a timeout is recorded in the row and the
run goes on.

Outputs under --out (default bench/out/): <stem>.json (machine, versions, threads, command,
rows, summary), on CUDA also <stem>.cudnn.json (issue 5's format), and the plots
<stem>_speedup_vs_B.png, <stem>_speedup_vs_H.png.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, REPO)

import rnn_ext  # noqa: E402
import rnn_ext.reference as reference  # noqa: E402

# (T, B, I, H, L): issue 3's CPU grid (the first point is the walkthrough's sizes).
CPU_GRID = [
    (5, 4, 1, 3, 2),
    (100, 1, 64, 64, 1),
    (100, 16, 128, 128, 2),
    (200, 8, 32, 256, 1),
    (100, 64, 256, 256, 2),
    (50, 64, 512, 512, 2),
]
# issue 5's GPU grid: T = 512, L = 2, I = H, B in {1, 8, 32, 128}, H in {256, 512, 1024}.
GPU_GRID = [(512, B, H, H, 2) for H in (256, 512, 1024) for B in (1, 8, 32, 128)]
QUICK_GRID = [(5, 4, 1, 3, 2), (32, 8, 32, 32, 2)]

ALL_CONTENDERS = ("rnn_ext", "torch", "compiled_reference")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# ----------------------------------------------------------------------------- arguments
def parse_grid(text: str):
    grid = []
    for part in text.replace(" ", "").split(";"):
        if not part:
            continue
        vals = [int(v) for v in part.split(",")]
        if len(vals) != 5:
            raise argparse.ArgumentTypeError(f"grid point {part!r}: expected T,B,I,H,L")
        grid.append(tuple(vals))
    if not grid:
        raise argparse.ArgumentTypeError("empty grid")
    return grid


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny grid, few repeats (< 1 min)")
    p.add_argument("--grid", type=parse_grid, default=None,
                   help='points "T,B,I,H,L;T,B,I,H,L;..." (default: the device\'s issue grid)')
    p.add_argument("--dtypes", default=None,
                   help="comma list (default: float32 on CPU, float32,bfloat16 on CUDA)")
    p.add_argument("--modes", default="fwd,train", help="comma list of fwd,train")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda if available else cpu")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved samples per contender (default 11, --quick 5)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per contender")
    p.add_argument("--min-sample-ms", type=float, default=None,
                   help="each sample lasts at least this long (default 20 on CPU, 10 on CUDA)")
    p.add_argument("--contenders", default=",".join(ALL_CONTENDERS),
                   help=f"comma list of {','.join(ALL_CONTENDERS)}")
    p.add_argument("--bidirectional", action="store_true", help="bidirectional RNNs")
    p.add_argument("--nonlinearity", default="tanh", choices=["tanh", "relu"])
    p.add_argument("--cuda-kernel", default=None, choices=list(rnn_ext.cuda.KERNELS),
                   help="rnn_ext's CUDA recurrence kernels (rnn_ext.set_cuda_kernel; default: "
                        "RNN_EXT_CUDA_KERNEL, else 'step')")
    p.add_argument("--cuda-wavefront", type=int, default=None,
                   help="most layers per persistent forward launch (rnn_ext.set_cuda_wavefront)")
    p.add_argument("--tf32", default="default", choices=["default", "on", "off"],
                   help="CUDA float32: 'on'/'off' set torch.backends.cuda.matmul.allow_tf32 "
                        "(which rnn_ext follows) and torch.backends.cudnn.allow_tf32 (cuDNN) "
                        "both; 'default' leaves torch's defaults (matmul off, cuDNN on)")
    p.add_argument("--compile-scope", default="auto", choices=["auto", "full", "cell"],
                   help="what torch.compile wraps for compiled_reference (see the module doc)")
    p.add_argument("--compile-full-max-steps", type=int, default=None,
                   help="auto scope: compile the whole loop up to this many layer-steps "
                        "(default 16 on CPU, 0 on CUDA)")
    p.add_argument("--compile-timeout", type=float, default=None,
                   help="seconds allowed per compile (first call incl. backward) before "
                        "compiled_reference is skipped for that row (default 180 CPU, 300 CUDA)")
    p.add_argument("--floor-size", type=int, default=None,
                   help="square matmul size for the floor (default 1024 CPU, 4096 CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "out"), help="output folder")
    p.add_argument("--name", default=None, help="file stem (default bench-<device>-<time>)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    cuda = args.device == "cuda"
    if args.grid is None:
        args.grid = QUICK_GRID if args.quick else (GPU_GRID if cuda else CPU_GRID)
    if args.dtypes is None:
        args.dtypes = "float32" if (args.quick or not cuda) else "float32,bfloat16"
    try:
        args.dtypes = [DTYPES[d.strip().lower()] for d in args.dtypes.split(",") if d.strip()]
    except KeyError as e:
        p.error(f"unknown dtype {e}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.modes:
        if m not in ("fwd", "train"):
            p.error(f"unknown mode {m!r}")
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for c in args.contenders:
        if c not in ALL_CONTENDERS:
            p.error(f"unknown contender {c!r}")
    if "rnn_ext" not in args.contenders:
        args.contenders.insert(0, "rnn_ext")
    if args.repeats is None:
        args.repeats = 5 if args.quick else 11
    if args.min_sample_ms is None:
        args.min_sample_ms = 10.0 if cuda else 20.0
    if args.compile_full_max_steps is None:
        args.compile_full_max_steps = 0 if cuda else 16
    if args.compile_timeout is None:
        args.compile_timeout = 300.0 if cuda else 180.0
    if args.floor_size is None:
        args.floor_size = 4096 if cuda else 1024
    return args


# ----------------------------------------------------------------------------- machine info
def machine_info(device: str) -> dict:
    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": None,
        "cpu_flags_avx512f": None,
        "logical_cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "rnn_ext": rnn_ext.__version__,
        "rnn_ext_backend": rnn_ext.backend_info(),
        "device": device,
        "gpu": None,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "git_commit": None,
        "git_dirty": None,
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and info["cpu_model"] is None:
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                if line.startswith("flags") and info["cpu_flags_avx512f"] is None:
                    info["cpu_flags_avx512f"] = "avx512f" in line.split()
    except OSError:
        pass
    if info["cpu_model"] is None:
        info["cpu_model"] = platform.processor() or None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_capability"] = list(torch.cuda.get_device_capability(0))
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        info["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["allow_tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
        st = subprocess.run(["git", "status", "--porcelain", "--", "csrc", "rnn_ext", "setup.py"],
                            cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        info["git_dirty"] = bool(st.strip())
    except Exception:  # noqa: BLE001 (no git: fine)
        pass
    return info


# ----------------------------------------------------------------------------- timing
class Timer:
    """Times `fn` called `n` times; returns ms per call."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def per_call_ms(self, fn, n: int) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / n
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) * 1e3 / n


def stats(samples):
    s = sorted(samples)
    if len(s) >= 2:
        q = statistics.quantiles(s, n=4, method="inclusive")
        q1, q3 = q[0], q[2]
    else:
        q1 = q3 = s[0]
    return {
        "median_ms": statistics.median(s),
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "min_ms": s[0],
        "max_ms": s[-1],
        "samples_ms": samples,
    }


def gemm_gflops(device: str, dtype: torch.dtype, n: int, timer: Timer, min_ms: float, reps=5):
    """GFLOP/s of an n x n x n torch.mm in this dtype: the machine's large-GEMM rate."""
    g = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def fn():
        torch.mm(a, b, out=c)

    for _ in range(3):
        fn()
    timer.sync()
    one = timer.per_call_ms(fn, 1)
    inner = max(1, math.ceil(min_ms / max(one, 1e-4)))
    samples = [timer.per_call_ms(fn, inner) for _ in range(reps)]
    ms = statistics.median(samples)
    return {"n": n, "median_ms": ms, "gflops": 2.0 * n ** 3 / (ms * 1e-3) / 1e9,
            "best_gflops": 2.0 * n ** 3 / (min(samples) * 1e-3) / 1e9}


def rnn_flops(T, B, I, H, L, D, mode):
    f = 0
    for layer in range(L):
        i_l = I if layer == 0 else D * H
        f += D * 2 * T * B * (i_l + H) * H
    return 3 * f if mode == "train" else f


# ----------------------------------------------------------------------------- contenders
class CompileTimeout(BaseException):
    """Not an Exception: raised by SIGALRM wherever the compile happens to be, it must not be
    caught by torch's own `except Exception` handlers (Dynamo wraps it, or falls back and
    finishes the compile; seen in CI)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises CompileTimeout in the main thread after `seconds` (SIGALRM; no-op elsewhere)."""
    use = (seconds and seconds > 0 and hasattr(signal, "setitimer")
           and threading_main())
    if not use:
        yield
        return

    def handler(signum, frame):
        raise CompileTimeout(f"compile exceeded {seconds:g} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def threading_main():
    import threading

    return threading.current_thread() is threading.main_thread()


def make_call(kind, module_or_fn, x, h0, mode, grad_inputs):
    """A zero-argument callable running one forward (fwd) or one forward+backward (train)."""
    if mode == "fwd":
        def call():
            with torch.inference_mode():
                return module_or_fn(x, h0)
    else:
        def call():
            out, h_n = module_or_fn(x, h0)
            return torch.autograd.grad(out.sum() + h_n.sum(), grad_inputs)
    return call


def build_compiled_reference(args, weights, L, D, relu, steps):
    """Returns (fn(x, h0) -> (out, h_n), scope)."""
    scope = args.compile_scope
    if scope == "auto":
        scope = "full" if steps <= args.compile_full_max_steps else "cell"
    kw = dict(num_layers=L, bidirectional=D == 2, relu=relu)
    if scope == "full":
        def ref_fn(x, h0, *w):
            return reference.rnn(x, h0, w, **kw)

        compiled = torch.compile(ref_fn, dynamic=False)

        def fn(x, h0):
            return compiled(x, h0, *weights)
    else:
        compiled_cell = torch.compile(reference._cell, dynamic=False)
        plain_cell = reference._cell

        def fn(x, h0):
            reference._cell = compiled_cell  # the reference loop on the compiled cell
            try:
                return reference.rnn(x, h0, weights, **kw)
            finally:
                reference._cell = plain_cell
    return fn, scope


def max_diff(a, b):
    if isinstance(a, (tuple, list)):
        return max(max_diff(x, y) for x, y in zip(a, b))
    return float((a.detach().float() - b.detach().float()).abs().max()) if a.numel() else 0.0


def bench_point(args, point, dtype, mode, timer, floor):
    T, B, I, H, L = point
    D = 2 if args.bidirectional else 1
    dev = args.device
    row = {
        "mode": mode, "dtype": dtype_name(dtype), "T": T, "B": B, "I": I, "H": H, "L": L,
        "bidirectional": bool(args.bidirectional), "nonlinearity": args.nonlinearity,
        "flops": rnn_flops(T, B, I, H, L, D, mode),
        "contenders": {},
    }
    torch.manual_seed(args.seed)
    ref = torch.nn.RNN(I, H, L, nonlinearity=args.nonlinearity, bidirectional=args.bidirectional)
    ref = ref.to(device=dev, dtype=dtype)
    ext = rnn_ext.RNN(I, H, L, nonlinearity=args.nonlinearity, bidirectional=args.bidirectional)
    ext = ext.to(device=dev, dtype=dtype)
    ext.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, device=dev, dtype=dtype)
    h0 = 0.1 * torch.randn(L * D, B, H, device=dev, dtype=dtype)
    if mode == "train":
        x.requires_grad_(True)
        ref.train(), ext.train()
    else:
        ref.eval(), ext.eval()

    calls = {}
    if mode == "train":
        calls["rnn_ext"] = make_call("rnn_ext", ext, x, h0, mode, [x] + list(ext.parameters()))
        calls["torch"] = make_call("torch", ref, x, h0, mode, [x] + list(ref.parameters()))
    else:
        calls["rnn_ext"] = make_call("rnn_ext", ext, x, h0, mode, None)
        calls["torch"] = make_call("torch", ref, x, h0, mode, None)
    order = [c for c in args.contenders if c in ("rnn_ext", "torch")]

    if "compiled_reference" in args.contenders:
        entry = row["contenders"]["compiled_reference"] = {}
        weights = list(ref._flat_weights)  # same tensors as torch's parameters
        try:
            # Import the compiler stack outside the time limit (an alarm inside an import
            # would leave a half-initialised module behind).
            importlib.import_module("torch._dynamo")
            importlib.import_module("torch._inductor.compile_fx")

            torch._dynamo.reset()
            fn, scope = build_compiled_reference(
                args, weights, L, D, args.nonlinearity == "relu", T * L * D
            )
            entry["scope"] = scope
            call = make_call("compiled_reference", fn, x, h0, mode, [x] + weights)
            t0 = time.perf_counter()
            with time_limit(args.compile_timeout):
                first_result = call()  # compiles (forward, and backward in train mode)
                timer.sync()
            entry["compile_s"] = time.perf_counter() - t0
            if entry["compile_s"] > args.compile_timeout:  # the alarm was swallowed somewhere
                raise CompileTimeout(f"compile exceeded {args.compile_timeout:g} s "
                                     f"({entry.pop('compile_s'):.1f} s)")
            calls["compiled_reference"] = call
            order.append("compiled_reference")
        except CompileTimeout as e:
            entry["skipped"] = str(e)
            torch._dynamo.reset()
        except Exception as e:  # noqa: BLE001 (a failed compile is recorded, not fatal)
            cause = e.__cause__ or e.__context__
            if isinstance(cause, CompileTimeout):  # the alarm, wrapped by Dynamo
                entry["skipped"] = str(cause)
            else:
                entry["skipped"] = f"compile failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                entry["traceback_tail"] = traceback.format_exc().splitlines()[-6:]
            torch._dynamo.reset()

    # Agreement with torch.nn.RNN, in this mode (fwd: out and h_n; train: the gradients).
    # Not a test: recorded so that a wrong result is visible next to its timing.
    results = {c: calls[c]() for c in order if c != "compiled_reference"}
    if dev == "cuda" and "rnn_ext" in results:
        # which CUDA kernels rnn_ext's call ran (rnn_ext.set_cuda_kernel / RNN_EXT_CUDA_KERNEL)
        setting = rnn_ext.set_cuda_kernel("step")  # read the switch: set, then restore
        rnn_ext.set_cuda_kernel(setting)
        row["cuda_kernels"] = {
            "setting": setting,
            "forward": rnn_ext.cuda_kernel_used(),
            "forward_variant": rnn_ext.cuda.cuda_persistent_variant(),
            "wavefront_layers": rnn_ext.cuda_wavefront_layers(),
        }
        if mode == "train":
            row["cuda_kernels"]["backward"] = rnn_ext.cuda_kernel_used("backward")
            row["cuda_kernels"]["backward_variant"] = rnn_ext.cuda.cuda_persistent_variant(
                "backward")
    if "compiled_reference" in calls:
        results["compiled_reference"] = first_result
    for c in order:
        if c == "torch" or "torch" not in results:
            continue
        try:
            row["contenders"].setdefault(c, {})["max_abs_diff_vs_torch"] = max_diff(
                results[c], results["torch"])
        except Exception as e:  # noqa: BLE001
            row["contenders"].setdefault(c, {})["max_abs_diff_vs_torch"] = None
            row["contenders"][c]["check_error"] = repr(e)
    del results

    # Warm-up, then the inner-loop count of each contender.
    inner = {}
    for c in order:
        for _ in range(args.warmup):
            calls[c]()
        timer.sync()
        one = min(timer.per_call_ms(calls[c], 1) for _ in range(2))
        inner[c] = max(1, math.ceil(args.min_sample_ms / max(one, 1e-4)))

    # Interleaved samples: A, B, C, A, B, C, ...
    samples = {c: [] for c in order}
    for _ in range(args.repeats):
        for c in order:
            samples[c].append(timer.per_call_ms(calls[c], inner[c]))

    for c in order:
        e = row["contenders"].setdefault(c, {})
        e.update(stats(samples[c]))
        e["inner_calls"] = inner[c]
        e["gflops"] = row["flops"] / (e["median_ms"] * 1e-3) / 1e9
    for c in ALL_CONTENDERS:
        if c in args.contenders and c not in order:
            row["contenders"].setdefault(c, {}).setdefault("skipped", "not run")

    ext_ms = row["contenders"]["rnn_ext"]["median_ms"]
    row["rnn_ext_ms"] = ext_ms
    row["torch_ms"] = row["contenders"].get("torch", {}).get("median_ms")
    row["compiled_reference_ms"] = row["contenders"].get("compiled_reference", {}).get("median_ms")
    row["speedup_vs_torch"] = row["torch_ms"] / ext_ms if row["torch_ms"] else None
    row["speedup_vs_compiled_reference"] = (
        row["compiled_reference_ms"] / ext_ms if row["compiled_reference_ms"] else None
    )
    row["rnn_ext_gflops"] = row["contenders"]["rnn_ext"]["gflops"]
    row["floor_gemm_gflops"] = floor["gflops"]
    row["floor_ms"] = row["flops"] / (floor["gflops"] * 1e9) * 1e3
    row["frac_of_floor"] = ext_ms / row["floor_ms"]
    torch._dynamo.reset()
    return row


# ----------------------------------------------------------------------------- reporting
def fmt_ms(v):
    if v is None:
        return "-"
    if v < 0.01:
        return f"{v:.2e}"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def fmt_g(v):
    return "-" if v is None else f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def fmt_x(v):
    return "-" if v is None else f"{v:.2f}x"


def spread_pct(e):
    if not e or "median_ms" not in e:
        return "-"
    return f"{100 * e['iqr_ms'] / e['median_ms']:.0f}%"


def table(rows, contenders):
    head = ["mode", "dtype", "T", "B", "I", "H", "L"]
    for c in contenders:
        short = {"rnn_ext": "ext", "torch": "torch", "compiled_reference": "comp"}[c]
        head += [f"{short} ms", "iqr"]
    head += ["x torch", "x comp", "ext GF/s", "floor ms", "/floor"]
    lines = []
    for r in rows:
        cells = [r["mode"], r["dtype"].replace("float", "f").replace("bf16", "bf16"),
                 r["T"], r["B"], r["I"], r["H"], r["L"]]
        for c in contenders:
            e = r["contenders"].get(c, {})
            cells += [fmt_ms(e.get("median_ms")) if "median_ms" in e else "skip", spread_pct(e)]
        cells += [fmt_x(r["speedup_vs_torch"]), fmt_x(r["speedup_vs_compiled_reference"]),
                  fmt_g(r["rnn_ext_gflops"]), fmt_ms(r["floor_ms"]), fmt_g(r["frac_of_floor"])]
        lines.append([str(c) for c in cells])
    widths = [max(len(str(h)), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    out = ["  ".join(str(h).rjust(w) for h, w in zip(head, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.rjust(w) for c, w in zip(l, widths)) for l in lines]
    return "\n".join(out)


def geomean(vals):
    vals = [v for v in vals if v]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def summarize(rows):
    s = {}
    for mode in ("fwd", "train"):
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            continue
        m = {
            "geomean_speedup_vs_torch": geomean([r["speedup_vs_torch"] for r in rs]),
            "geomean_speedup_vs_compiled_reference": geomean(
                [r["speedup_vs_compiled_reference"] for r in rs]),
        }
        with_t = [r for r in rs if r["speedup_vs_torch"]]
        if with_t:
            worst = min(with_t, key=lambda r: r["speedup_vs_torch"])
            m["slowest_point"] = {k: worst[k] for k in ("dtype", "T", "B", "I", "H", "L")}
            m["slowest_point"]["speedup_vs_torch"] = worst["speedup_vs_torch"]
        largest = sorted(rs, key=lambda r: r["flops"], reverse=True)[:2]
        m["largest_points_frac_of_floor"] = [
            {**{k: r[k] for k in ("dtype", "T", "B", "I", "H", "L")},
             "frac_of_floor": r["frac_of_floor"]} for r in largest
        ]
        s[mode] = m
    return s


def summary_lines(summary):
    out = []
    for mode, m in summary.items():
        g = m["geomean_speedup_vs_torch"]
        gc = m["geomean_speedup_vs_compiled_reference"]
        out.append(f"[{mode}] geomean speedup of rnn_ext over torch.nn.RNN: {fmt_x(g)}"
                   f"   over compiled reference: {fmt_x(gc)}")
        if "slowest_point" in m:
            p = m["slowest_point"]
            out.append(f"[{mode}] slowest point: T={p['T']} B={p['B']} I={p['I']} H={p['H']} "
                       f"L={p['L']} {p['dtype']}: {fmt_x(p['speedup_vs_torch'])} vs torch")
        for p in m["largest_points_frac_of_floor"]:
            out.append(f"[{mode}] fraction of floor at T={p['T']} B={p['B']} I={p['I']} "
                       f"H={p['H']} L={p['L']} {p['dtype']}: {fmt_g(p['frac_of_floor'])} "
                       f"(rnn_ext time / floor time)")
    return out


def plots(rows, contenders, stem):
    """speedup of rnn_ext over each other contender, against B and against H."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [c for c in contenders if c != "rnn_ext"]
    colors = {"torch": "tab:blue", "compiled_reference": "tab:orange"}
    labels = {"torch": "over torch.nn.RNN" + (" (cuDNN)" if rows and rows[0].get("device") == "cuda" else ""),
              "compiled_reference": "over torch.compile(reference)"}
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
    modes = [m for m in ("fwd", "train") if any(r["mode"] == m for r in rows)]
    dtypes = sorted({r["dtype"] for r in rows})
    paths = []
    for xkey, others_keys, xlabel in (
        ("B", ("T", "I", "H", "L"), "batch size B"),
        ("H", ("T", "B", "I", "L"), "hidden size H"),
    ):
        fig, axes = plt.subplots(len(dtypes), len(modes), squeeze=False,
                                 figsize=(6.2 * len(modes), 4.4 * len(dtypes)))
        for i, dt in enumerate(dtypes):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                rs = [r for r in rows if r["mode"] == mode and r["dtype"] == dt]
                groups = {}
                for r in rs:
                    gk = tuple(r[k] for k in others_keys)
                    if xkey == "H" and r["I"] == r["H"]:
                        gk = tuple("H" if k == "I" else r[k] for k in others_keys)
                    groups.setdefault(gk, []).append(r)
                ys = []
                ordered = sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))
                # Label groups only by the sizes that differ between them in this panel.
                vary = [k for n, k in enumerate(others_keys)
                        if len({gk[n] for gk, _ in ordered}) > 1]

                def glabel(gk):
                    return " ".join(f"{k}={v}" for k, v in zip(others_keys, gk) if k in vary)

                for c in others:
                    labelled = False
                    for gi, (gk, grs) in enumerate(ordered):
                        pts = sorted((r[xkey], r[f"speedup_vs_{c}"]) for r in grs
                                     if r.get(f"speedup_vs_{c}"))
                        if not pts:
                            continue
                        xs, yv = zip(*pts)
                        ys += yv
                        ax.plot(xs, yv, marker=markers[gi % len(markers)], color=colors[c],
                                linestyle="-" if len(pts) > 1 else "none", markersize=6,
                                label=None if labelled else labels[c])
                        labelled = True
                        # Lines: label every line; lone points (an irregular grid): label
                        # them once, the marker shape identifies the point for every contender.
                        if vary and (len(pts) > 1 or c == others[0]):
                            ax.annotate(glabel(gk), (xs[-1], yv[-1]), textcoords="offset points",
                                        xytext=(5, 3), fontsize=7, color=colors[c])
                xvals = sorted({r[xkey] for r in rs})
                if xvals:
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(xvals)
                    ax.set_xticklabels([str(v) for v in xvals])
                    ax.minorticks_off()
                    lo, hi = xvals[0], xvals[-1]
                    ax.set_xlim(lo / 1.4, hi * 2.2)  # room for the labels on the right
                ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
                if ys and max(ys) / max(min(ys), 1e-9) > 8:
                    ax.set_yscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel("speedup of rnn_ext (x)")
                ax.set_title(f"{mode} {dt}: speedup of rnn_ext vs {xkey}")
                ax.grid(True, which="both", alpha=0.3)
                if ax.lines:
                    ax.legend(fontsize=7, loc="best")
        fig.suptitle("rnn_ext speedup (contender median / rnn_ext median; >1 = rnn_ext faster;"
                     " same marker = same point)",
                     fontsize=10)
        fig.tight_layout()
        path = f"{stem}_speedup_vs_{xkey}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    if args.cuda_kernel is not None:
        rnn_ext.set_cuda_kernel(args.cuda_kernel)
    if args.cuda_wavefront is not None:
        rnn_ext.set_cuda_wavefront(args.cuda_wavefront)
    if args.tf32 != "default":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
        torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = Timer(args.device)
    now = _dt.datetime.now().astimezone()
    stem_name = args.name or f"bench-{args.device}-{now.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, stem_name)
    info = machine_info(args.device)

    print(f"rnn_ext bench: device={args.device} "
          f"({info['gpu'] or info['cpu_model']}), torch {info['torch']}, "
          f"threads {info['torch_threads']}, {len(args.grid)} points x "
          f"{len(args.dtypes)} dtypes x {len(args.modes)} modes, repeats {args.repeats}",
          flush=True)

    floors = {}
    for dt in args.dtypes:
        floors[dtype_name(dt)] = gemm_gflops(args.device, dt, args.floor_size, timer,
                                             args.min_sample_ms)
        print(f"floor: {args.floor_size}^3 torch.mm {dtype_name(dt)}: "
              f"{floors[dtype_name(dt)]['gflops']:.1f} GFLOP/s", flush=True)

    jobs = [(p, dt, m) for dt in args.dtypes for p in args.grid for m in args.modes]
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), file=sys.stderr, disable=args.no_progress,
                   desc="bench", unit="pt", dynamic_ncols=True)
    except ImportError:  # tqdm is optional
        bar = None
    rows = []
    t_start = time.perf_counter()
    for p, dt, m in jobs:
        if bar is not None:
            bar.set_postfix_str(f"{m} {dtype_name(dt)} T,B,I,H,L={','.join(map(str, p))}")
        try:
            row = bench_point(args, p, dt, m, timer, floors[dtype_name(dt)])
        except Exception as e:  # noqa: BLE001 (e.g. a dtype a contender refuses): recorded
            row = {"mode": m, "dtype": dtype_name(dt), **dict(zip("TBIHL", p)),
                   "error": f"{type(e).__name__}: {e}",
                   "traceback_tail": traceback.format_exc().splitlines()[-8:]}
            msg = f"point {m} {dtype_name(dt)} {p} failed: {row['error']}"
            (bar.write(msg, file=sys.stderr) if bar is not None else print(msg, file=sys.stderr))
            torch._dynamo.reset()
        row["device"] = args.device
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    # The floor again at the end, recorded (load on a shared machine shows up here).
    floors_end = {dtype_name(dt): gemm_gflops(args.device, dt, args.floor_size, timer,
                                              args.min_sample_ms) for dt in args.dtypes}

    # The floor rate is the machine's large-GEMM rate in this run: the higher of the two
    # measurements (a VM's first seconds, or a noisy neighbour, can halve one of them; taking
    # the higher makes the floor time shorter, never flattering rnn_ext).
    for r in rows:
        if "error" in r:
            continue
        rate = max(floors[r["dtype"]]["gflops"], floors_end[r["dtype"]]["gflops"])
        r["floor_gemm_gflops"] = rate
        r["floor_ms"] = r["flops"] / (rate * 1e9) * 1e3
        r["frac_of_floor"] = r["rnn_ext_ms"] / r["floor_ms"]
    print("floor rate used: max(start, end) = "
          + ", ".join(f"{k}: {max(floors[k]['gflops'], floors_end[k]['gflops']):.1f} GFLOP/s"
                      for k in floors))
    ok_rows = [r for r in rows if "error" not in r]
    failed = [r for r in rows if "error" in r]
    summary = summarize(ok_rows)
    print()
    print(table(ok_rows, args.contenders))
    for r in failed:
        print(f"FAILED {r['mode']} {r['dtype']} T={r['T']} B={r['B']} I={r['I']} H={r['H']} "
              f"L={r['L']}: {r['error']}")
    print()
    for line in summary_lines(summary):
        print(line)

    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "schema": "rnn_ext-bench/1",
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "bench.py"]
                            + (sys.argv[1:] if argv is None else list(argv))),
        "machine": info,
        "config": {
            "device": args.device, "grid": [list(p) for p in args.grid],
            "dtypes": [dtype_name(d) for d in args.dtypes], "modes": args.modes,
            "contenders": args.contenders, "repeats": args.repeats, "warmup": args.warmup,
            "min_sample_ms": args.min_sample_ms, "compile_scope": args.compile_scope,
            "compile_full_max_steps": args.compile_full_max_steps,
            "compile_timeout_s": args.compile_timeout, "bidirectional": args.bidirectional,
            "nonlinearity": args.nonlinearity, "seed": args.seed, "tf32": args.tf32,
            "cuda_kernel": args.cuda_kernel, "cuda_wavefront": args.cuda_wavefront,
            "train_grads": "input and all parameters (torch.autograd.grad of out.sum()+h_n.sum())",
            "flops": "2*T*B*(I_l+H)*H per layer-direction forward; train = 3x forward",
            "timer": "cuda events" if args.device == "cuda" else "time.perf_counter",
        },
        "floor": {"start": floors, "end": floors_end},
        "wall_s": time.perf_counter() - t_start,
        "rows": rows,
        "summary": summary,
    }
    json_path = stem + ".json"
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    written = [json_path]
    if args.device == "cuda":
        issue5 = {
            "device": info["gpu"], "torch": torch.__version__, "cudnn": info["cudnn"],
            "date": result["date"], "command": result["command"],
            "rows": [{k: r[k] for k in ("mode", "dtype", "T", "B", "I", "H", "L")}
                     | {"rnn_ext_ms": r["rnn_ext_ms"], "cudnn_ms": r["torch_ms"]}
                     for r in ok_rows],
        }
        with open(stem + ".cudnn.json", "w") as f:
            json.dump(issue5, f, indent=1)
        written.append(stem + ".cudnn.json")
    if not args.no_plots:
        try:
            written += plots(ok_rows, args.contenders, stem)
        except Exception as e:  # noqa: BLE001 (plots are not worth losing the JSON over)
            print(f"plots failed: {e!r}", file=sys.stderr)
    print()
    for w in written:
        print("wrote", os.path.relpath(w, os.getcwd()))
    return result


if __name__ == "__main__":
    main()
