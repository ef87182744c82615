#!/usr/bin/env python
"""The mutation check (issue 15): plants each bug of tests/mutations/*.patch, one at a time, in a
scratch copy of the working tree, rebuilds incrementally, runs only the tests mapped to that
mutation, and prints whether they caught it.  Exits non-zero if any mutation survives (or a
patch no longer applies, or the unmutated tree fails the mapped tests).

    python tests/mutations/run.py                 # every mutation
    python tests/mutations/run.py m1 k3           # some of them (name prefixes)
    python tests/mutations/run.py --list

The scratch copy lives in $RNN_EXT_MUTATION_DIR (default: <tmp>/rnn_ext_mutations) and is kept
between runs together with its build directory, so that ninja recompiles only what a patch
touches (a C++ mutation costs one compile of that file, and one more to revert it).  The
scratch build is CPU-only (RNN_EXT_NO_CUDA=1): the CUDA mutations are judged by the emulated
tests, which compile the scratch copy's csrc/cuda themselves.  Python-only mutations need no
rebuild.  Run from the repository root with the project's Python (the one that has torch).
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# mutation (patch file stem) -> (what it plants, the tests that must catch it).  Kept short: the
# point is that these few tests fail, in seconds, not that the whole suite does.
MUTATIONS = {
    "m1_inference_scratch_alias": (
        "no-grad forward: every inner layer writes the same scratch slot",
        ["tests/test_inference.py"]),
    "m2_double_backward_packed_ignores_dropout": (
        "create_graph backward drops the dropout masks for packed input",
        ["tests/test_double_backward.py", "-k", "packed"]),
    "m3_double_backward_ignores_dropout": (
        "create_graph backward drops the dropout masks",
        ["tests/test_double_backward.py", "-k", "dropout"]),
    "m4_fp16_weights_through_bf16": (
        "fp16 weights rounded through bf16 before the float32 compute",
        ["tests/test_parity.py", "-k", "half"]),
    "m5_blas_step_skips_nonlinearity": (
        "the multi-threaded BLAS recurrent step skips the nonlinearity",
        ["tests/test_cpu_paths.py", "-k", "blas_step"]),
    "m6_warp_reduce_last_step_dropped": (
        "csrc/cuda/warp_reduce.cuh: the last butterfly step is dropped",
        ["tests/test_cuda_emulated.py", "-k", "float64 or double"]),
    "m7_convert_rnns_drops_hooks": (
        "convert_rnns no longer hands the module's hook dicts to the replacement",
        ["tests/test_module.py", "-k", "convert"]),
    "m8_opacus_handover_replaces_buffer": (
        "Opacus: a per-sample tensor replaces the accumulation buffer Opacus already holds",
        ["tests/test_per_sample.py", "-k", "opacus"]),
    "m10_opacus_lean_ignores_poisson": (
        "Opacus, lean backward hook: accumulation allowed when Poisson sampling forbids it",
        ["tests/test_per_sample.py", "-k", "opacus and forbidden"]),
    "m11_opacus_lean_forward_ignores_disabled_hooks": (
        "Opacus, lean forward hook: records the call with the hooks disabled",
        ["tests/test_per_sample.py", "-k", "opacus and forbidden"]),
    "m12_opacus_lean_keeps_max_batch_len": (
        "Opacus, lean backward hook: the batch size stays after the last call of a batch",
        ["tests/test_per_sample.py", "-k", "opacus"]),
    "m13_opacus_lean_despite_subclass_override": (
        "Opacus: lean hooks for a GradSampleModule subclass that overrides one of them",
        ["tests/test_per_sample.py", "-k", "subclass"]),
    "m14_opacus_tied_weight_counted_twice": (
        "Opacus, lean hooks: a weight tied under two names counts each forward twice",
        ["tests/test_per_sample.py", "-k", "tied"]),
    "m15_fused_jvp_despite_weight_tangent_graph": (
        "forward AD: the fused jvp runs although a weight tangent requires grad (its graph lost)",
        ["tests/test_forward_ad.py", "-k", "requires_grad_keeps"]),
    "m16_partial_weight_grads_dropped": (
        "op autograd (compile, torch.func): no weight gradient unless every weight needs one",
        ["tests/test_compile.py", "-k", "frozen"]),
    "m17_per_sample_block_overwrites": (
        "per_sample_gradients: each call's grad_sample replaces the block's earlier ones",
        ["tests/test_per_sample.py", "-k", "sum_over_calls"]),
    "k8_per_sample_sums_left_scaled": (
        "per-sample op: the summed gradients keep the per-sample scale",
        ["tests/test_per_sample.py"]),
    "k9_per_sample_door_ignores_scale": (
        "C++ per-sample door: the sink's scale (Opacus' mean-loss factor) is never asked for",
        ["tests/test_per_sample.py", "-k", "opacus"]),
    "k10_recycled_block_stays_idle": (
        "CPU buffer recycling: a reused block stays in the idle list (handed out twice)",
        ["tests/test_reliability.py", "-k", "recycl"]),
    "k11_avx512_step_drops_last_k": (
        "AVX-512 step blocks: every sum misses its last product",
        ["tests/test_cpu_paths.py", "-k", "step_kernel"]),
    "k15_outer_chunks_overwrite": (
        "weight-gradient kernel: each 64-row chunk overwrites C instead of adding to it",
        ["tests/test_kernels.py", "-k", "outer"]),
    "k16_reverse_h_prev_not_shifted": (
        "dense dW_hh, reverse direction: H_prev read from the same step instead of the next",
        ["tests/test_cpu_paths.py", "-k", "step_kernel and not isas"]),
    "k17_transposed_product_not_transposed": (
        "weight-gradient kernel: a transposed product (N < 32 <= M) is not transposed back",
        ["tests/test_kernels.py", "-k", "outer"]),
    "k18_tanh16_polynomial_coefficient": (
        "AVX-512 epilogue: tanh16's exp polynomial has 1/5 for 1/6",
        ["tests/test_kernels.py", "-k", "tanh"]),
    "k19_h0_rows_dropped_from_dw_hh": (
        "dense dW_hh, forward direction: the first step's h_0 rows are left out",
        ["tests/test_per_sample.py", "-k", "match_single_sample_loops and dense"]),
    "k20_grad_rows_ignore_step_stride": (
        "CPU backward, grad_output read in place: every step reads the first step's rows",
        ["tests/test_autograd.py", "-k", "any_layout"]),
    "k1_step_kernel_tile_edge": (
        "step kernel: the last column of a partial 16-column block misses its projection",
        ["tests/test_cpu_paths.py", "-k", "step_kernel"]),
    "k2_tanh_saturation": (
        "float32 tanh: saturation cap at |x| = 5 instead of 10",
        ["tests/test_kernels.py", "-k", "saturates"]),
    "k3_team_row_split": (
        "row team: uneven batch slices drop their last rows",
        ["tests/test_cpu_paths.py", "-k", "row_team"]),
    "k4_bptt_dh_accumulates": (
        "BPTT (BLAS path): dh_prev = dh + dz W_hh instead of dz W_hh",
        ["tests/test_parity.py", "-k", "float64"]),
    "k5_projection_bias_fold_drops_b_hh": (
        "input projection folds b_ih twice instead of b_ih + b_hh",
        ["tests/test_parity.py", "-k", "float64"]),
    "k6_packed_continuation_h0_row": (
        "reverse direction, packed: rows starting late take row 0's h0",
        ["tests/test_packed.py"]),
    "m9_device_check_parameters_first": (
        "device checks: parameters before the hidden state (aten checks the hidden state first)",
        ["tests/test_reliability.py", "-k", "meta"]),
    "k12_auto_takes_persistent_to_b128": (
        "CUDA 'auto' kernel choice: persistent up to B = 128 at every H (the H200 measured it slower)",
        ["tests/test_cuda_emulated.py", "-k", "end_to_end and auto"]),
    "k13_row_groups_overlap": (
        "P5 row groups: each group starts one row early per group (overlap, last rows missed)",
        ["tests/test_cuda_emulated.py", "-k", "row_groups or row_split"]),
    "k14_grouped_a_first_fragment_reused": (
        "P3b grouped A loads: every m-tile of a group multiplies the group's first A fragment",
        ["tests/test_cuda_emulated.py", "-k", "grouped"]),
    "k7_persistent_mma_last_k_tile": (
        "persistent kernel, tensor cores: the last k-tile of [x | h] is skipped",
        ["tests/test_cuda_emulated.py", "-k", "test_forward_both_directions"]),
}


def sh(cmd, cwd, env=None, timeout=3600):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def tree_files():
    """The working tree as git sees it: tracked files and untracked ones not ignored."""
    out = sh(["git", "ls-files", "-co", "--exclude-standard", "-z"], ROOT).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def sync(scratch: Path):
    """Copies the working tree into scratch, touching only files whose content differs (so the
    kept build directory stays valid and ninja rebuilds only what changed)."""
    files = set(tree_files())
    for f in files:
        src, dst = ROOT / f, scratch / f
        if not dst.exists() or not filecmp.cmp(src, dst, shallow=False):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    # files deleted from the tree (not build products: those are ignored, never listed)
    for sub in ("csrc", "rnn_ext", "tests"):
        for p in (scratch / sub).rglob("*"):
            rel = p.relative_to(scratch).as_posix()
            if p.is_file() and rel not in files and p.suffix in {".py", ".cpp", ".h", ".cu",
                                                                 ".cuh", ".patch", ".md"}:
                p.unlink()


def build(scratch: Path, env) -> tuple[bool, str]:
    r = sh([sys.executable, "setup.py", "build_ext", "--inplace"], scratch, env)
    return r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def pytest(scratch: Path, args, env, timeout):
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args]
    try:
        r = sh(cmd, scratch, env, timeout)
    except subprocess.TimeoutExpired:
        return None, "timed out"
    tail = (r.stdout + r.stderr).strip().splitlines()
    return r.returncode, tail[-1] if tail else ""


def patch_files(patch: Path):
    return [ln[6:].strip() for ln in patch.read_text().splitlines() if ln.startswith("+++ b/")]


def needs_build(files):
    return any(f.startswith("csrc/") and not f.startswith("csrc/cuda/") for f in files)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("only", nargs="*", help="mutation name prefixes (default: all)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the mapped tests on the unmutated tree first")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per pytest run")
    a = ap.parse_args()

    patches = {p.stem: p for p in sorted(HERE.glob("*.patch"))}
    unmapped = sorted(set(patches) ^ set(MUTATIONS))
    if unmapped:
        sys.exit(f"patches and the mapping disagree: {unmapped}")
    # in the order asked for (e.g. the quick Python-only ones first), else the table's order
    names = list(MUTATIONS) if not a.only else list(dict.fromkeys(
        n for o in a.only for n in MUTATIONS if n.startswith(o)))
    if a.list:
        for n in names:
            print(f"{n:45s} {MUTATIONS[n][0]}\n{'':45s} tests: {' '.join(MUTATIONS[n][1])}")
        return 0

    scratch = Path(os.environ.get("RNN_EXT_MUTATION_DIR",
                                  Path(tempfile.gettempdir()) / "rnn_ext_mutations"))
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, RNN_EXT_NO_CUDA="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    t0 = time.time()
    sync(scratch)
    ok, log = build(scratch, env)
    if not ok:
        sys.exit("the unmutated scratch copy does not build:\n" + log)
    where = sh([sys.executable, "-c", "import rnn_ext, rnn_ext._C as c; print(rnn_ext.__file__);"
                " print(c.__file__)"], scratch, env).stdout.split()
    if len(where) != 2 or not all(Path(w).resolve().is_relative_to(scratch.resolve())
                                  for w in where):
        sys.exit(f"the scratch copy does not import its own rnn_ext: {where}")
    print(f"scratch: {scratch} (synced and built in {time.time() - t0:.0f} s)", flush=True)

    if not a.no_baseline:
        # every mapped test selection must pass on the unmutated tree, or a "kill" means nothing
        for args in sorted({tuple(MUTATIONS[n][1]) for n in names}):
            t1 = time.time()
            rc, last = pytest(scratch, list(args), env, a.timeout)
            print(f"baseline {' '.join(args)}: {'ok' if rc == 0 else 'FAILED'} "
                  f"({time.time() - t1:.0f} s) {last}", flush=True)
            if rc != 0:
                sys.exit("the unmutated tree fails these tests; fix that first")

    rows = []
    for n in names:
        patch, (what, args) = patches[n], MUTATIONS[n]
        files = patch_files(patch)
        t1 = time.time()
        r = sh(["git", "apply", str(patch)], scratch)
        if r.returncode != 0:
            rows.append((n, " ".join(args), "NOT APPLIED", time.time() - t1, r.stderr.strip()))
            continue
        try:
            if needs_build(files):
                ok, log = build(scratch, env)
                if not ok:
                    rows.append((n, " ".join(args), "NO BUILD", time.time() - t1,
                                 log.strip().splitlines()[-1]))
                    continue
            rc, last = pytest(scratch, args, env, a.timeout)
            verdict = {0: "SURVIVED", 5: "NO TESTS"}.get(rc, "killed")
            if rc is None:
                verdict = "TIMEOUT"
            rows.append((n, " ".join(args), verdict, time.time() - t1, last))
        finally:
            r = sh(["git", "apply", "-R", str(patch)], scratch)
            if r.returncode != 0:
                sys.exit(f"could not revert {n} in {scratch}: {r.stderr}")
        print(f"{n}: {rows[-1][2]} ({rows[-1][3]:.0f} s) {rows[-1][4]}", flush=True)
    if any(needs_build(patch_files(patches[n])) for n in names):
        build(scratch, env)  # leave the scratch build unmutated

    w = max(len(r[0]) for r in rows)
    wt = max(len(r[1]) for r in rows)
    print()
    print(f"| {'mutation':{w}s} | {'tests run':{wt}s} | result   | time  |")
    print(f"|{'-' * (w + 2)}|{'-' * (wt + 2)}|----------|-------|")
    for n, t, v, s, _ in rows:
        print(f"| {n:{w}s} | {t:{wt}s} | {v:8s} | {s:4.0f}s |")
    bad = [r for r in rows if r[2] != "killed"]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} killed, {len(bad)} not; "
          f"total {time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
