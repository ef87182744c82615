#!/usr/bin/env python
"""DP training step (per-sample gradients) with rnn_ext against Opacus' DPRNN, and against
rnn_ext's own plain training step.

Model: RNN (batch_first) -> linear head on the last step -> cross-entropy, (T, B, I, H, L).
Timed per training step (forward + backward, per-sample gradients of every parameter where
asked; no optimizer step), medians in one process over rounds that interleave the contenders
(drift cancels): in each round every contender runs --warm untimed steps, then --block timed
ones, so that a step is timed in the cache and allocator state its own previous step left, as in
a training loop (right after another contender's step, rnn_ext's ~1 ms steps measured up to 1.5x
slower, and by how much depended on which contender came before):

  plain       rnn_ext.RNN, loss.backward() (no per-sample gradients)
  ours_ctx    rnn_ext.RNN under rnn_ext.per_sample_gradients (the RNN's grad_sample only)
  ours_opacus rnn_ext.RNN in Opacus' GradSampleModule (grad_sample of every parameter)
  ours_vmap   rnn_ext.RNN under torch.func.vmap(grad(...)) (per-sample gradients)
  dprnn       opacus.layers.DPRNN in GradSampleModule (Opacus' own per-sample RNN)
  frozen_plain, frozen_opacus
              the model with rnn_ext.RNN's weights frozen and the input requiring a gradient
              (the RNN's backward still runs, for the input's gradient), without and with
              GradSampleModule: their difference (`opacus_own_ms` in each row) is what Opacus
              itself costs a step for the rest of the model (the head's hooks, its grad
              sampler, GradSampleModule's bookkeeping), which every per-sample step through
              Opacus pays whatever the RNN; `ratio_to_plain_net_of_opacus_own` takes it out of
              ours_opacus / plain (diagnostic: not a contender, not plotted)

    python bench/dp.py [--quick] [--threads 2] [--reps 15] [--out bench/results/dp-DATE]
Writes OUT.json and OUT.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
import rnn_ext  # noqa: E402

GRID = [  # (T, B, I, H, L)
    (50, 32, 16, 64, 1),
    (50, 64, 16, 64, 1),
    (100, 32, 32, 128, 1),
    (50, 32, 32, 128, 2),
    (100, 64, 64, 256, 2),
]
QUICK = [(20, 8, 4, 16, 1), (20, 16, 8, 32, 2)]
DIAGNOSTIC = ("frozen_plain", "frozen_opacus")  # kinds that are not contenders


class Clf(torch.nn.Module):
    def __init__(self, rnn, H):
        super().__init__()
        self.rnn, self.head = rnn, torch.nn.Linear(H, 10)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def make(kind, T, B, I, H, L):
    torch.manual_seed(0)
    if kind == "dprnn":
        from opacus.layers import DPRNN
        rnn = DPRNN(I, H, num_layers=L, batch_first=True)
    else:
        rnn = rnn_ext.RNN(I, H, num_layers=L, batch_first=True)
    model = Clf(rnn, H)
    x = torch.randn(B, T, I)
    y = torch.randint(0, 10, (B,))
    F = torch.nn.functional
    if kind == "plain":
        def step():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        return step
    if kind == "ours_ctx":
        def step():
            model.zero_grad(set_to_none=True)
            for p in model.rnn.parameters():
                p.grad_sample = None
            with rnn_ext.per_sample_gradients(model):
                F.cross_entropy(model(x), y).backward()
        return step
    if kind in ("ours_opacus", "dprnn"):
        from opacus import GradSampleModule
        gsm = GradSampleModule(model)

        def step():
            gsm.zero_grad(set_to_none=True)  # also clears grad_sample
            F.cross_entropy(gsm(x), y).backward()
        return step
    if kind in DIAGNOSTIC:
        for p in model.rnn.parameters():
            p.requires_grad_(False)
        x.requires_grad_(True)
        run = model
        if kind == "frozen_opacus":
            from opacus import GradSampleModule
            run = GradSampleModule(model)

        def step():
            run.zero_grad(set_to_none=True)
            x.grad = None
            F.cross_entropy(run(x), y).backward()
        return step
    if kind == "ours_vmap":
        from torch.func import functional_call, grad, vmap
        params = {n: p.detach() for n, p in model.named_parameters()}

        def loss(p, xb, yb):
            return F.cross_entropy(functional_call(model, p, (xb[None],)), yb[None])

        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
        return lambda: per_sample(params, x, y)
    raise ValueError(kind)


def check_same(T, B, I, H, L):
    """Sanity: the Opacus and vmap paths give the same per-sample gradients."""
    from opacus import GradSampleModule
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(0)
    model = Clf(rnn_ext.RNN(I, H, num_layers=L, batch_first=True), H)
    x, y = torch.randn(B, T, I), torch.randint(0, 10, (B,))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    F = torch.nn.functional
    v = vmap(grad(lambda p, xb, yb: F.cross_entropy(functional_call(model, p, (xb[None],)),
                                                    yb[None])), in_dims=(None, 0, 0))(params, x, y)
    gsm = GradSampleModule(model)
    F.cross_entropy(gsm(x), y).backward()
    err = max((p.grad_sample - v[n]).abs().max().item() for n, p in model.named_parameters())
    return err


def plot(res, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = res["rows"]
    kinds = [k for k in res["config"]["kinds"] if k not in DIAGNOSTIC]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [f"T{r['T']} B{r['B']}\nI{r['I']} H{r['H']} L{r['L']}" for r in rows]
    width = 0.8 / len(kinds)
    for j, k in enumerate(kinds):
        ax.bar([i + j * width for i in range(len(rows))], [r["ms"][k] for r in rows], width,
               label=k)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per training step (median)")
    ax.set_title(f"DP training step, CPU, {res['config']['threads']} threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warm", type=int, default=2,
                    help="untimed steps of a contender at the start of each of its blocks")
    ap.add_argument("--block", type=int, default=5,
                    help="timed steps of a contender per round (after its --warm steps)")
    ap.add_argument("--kinds", default="plain,ours_ctx,ours_opacus,ours_vmap,dprnn,"
                                       "frozen_plain,frozen_opacus")
    ap.add_argument("--out", default=os.path.join(
        REPO, "bench", "results", f"dp-{datetime.date.today().isoformat()}"))
    ap.add_argument("--plot", metavar="JSON", help="only plot a results JSON (to JSON's .png)")
    args = ap.parse_args()
    if args.plot:
        with open(args.plot) as f:
            plot(json.load(f), args.plot[:-len(".json")] + ".png")
        return
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(args.threads)
    kinds = args.kinds.split(",")
    grid = QUICK if args.quick else GRID
    rows = []
    res = {}

    def save():  # after every row, so that an interrupted run keeps what it measured
        summary = {}
        if "dprnn" in kinds:
            for k in kinds:
                if k != "dprnn" and k not in DIAGNOSTIC:
                    s = [r["speedup_vs_dprnn"][k] for r in rows]
                    summary[f"geomean_speedup_vs_dprnn_{k}"] = math.exp(
                        sum(map(math.log, s)) / len(s))
        res.update(
            config=dict(threads=args.threads, reps=args.reps, warm=args.warm, block=args.block,
                        kinds=kinds,
                        command=" ".join(sys.argv)),
            machine=dict(platform=platform.platform(), processor=platform.processor(),
                         cpus=os.cpu_count(), torch=torch.__version__,
                         opacus=__import__("opacus").__version__,
                         loadavg_at_end=os.getloadavg()),
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            rows=rows, summary=summary, complete=len(rows) == len(grid))
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(res, f, indent=1)
        return summary

    for T, B, I, H, L in grid:
        steps = {k: make(k, T, B, I, H, L) for k in kinds}
        for k in kinds:  # warm-up
            steps[k]()
        reps = max(3, args.reps // (4 if T * B * H >= 100 * 64 * 256 else 1))
        times = {k: [] for k in kinds}
        for _ in range(reps):  # rounds, the contenders interleaved block by block
            for k in kinds:
                for _ in range(args.warm):
                    steps[k]()
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    steps[k]()
                    times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        row = dict(T=T, B=B, I=I, H=H, L=L, reps=reps, ms=med,
                   max_abs_diff_opacus_vs_vmap=check_same(T, min(B, 8), I, H, L))
        if "dprnn" in med:
            row["speedup_vs_dprnn"] = {k: med["dprnn"] / med[k] for k in kinds
                                      if k != "dprnn" and k not in DIAGNOSTIC}
        if "plain" in med:
            row["ratio_to_plain"] = {k: med[k] / med["plain"] for k in kinds if k != "plain"}
        if {*DIAGNOSTIC, "ours_opacus", "plain"} <= med.keys():
            own = med["frozen_opacus"] - med["frozen_plain"]
            row["opacus_own_ms"] = own
            row["ratio_to_plain_net_of_opacus_own"] = (med["ours_opacus"] - own) / med["plain"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()
    print(json.dumps(res["summary"]))
    plot(res, args.out + ".png")
    print("wrote", args.out + ".json", args.out + ".png")


if __name__ == "__main__":
    main()
