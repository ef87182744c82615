#!/usr/bin/env python
"""Differentially private training (DP-SGD, Opacus) of an rnn_ext.RNN sequence classifier.

Task (generated, no download): a sequence of T symbols from an alphabet of K; the label says
whether symbol 0 occurs more often than symbol 1 (ties: no).  Model: one-hot -> rnn_ext.RNN
-> linear head on h_n.  Opacus' PrivacyEngine clips every sample's gradient and adds noise;
rnn_ext.RNN's per-sample gradients come from its fused per-sample backward (nothing to
register: importing opacus is enough).

    python examples/dp_train.py                       # ~15 s on 2 CPU threads
    python examples/dp_train.py --epochs 10 --noise 0.8 --out dp_loss.png

Shows a tqdm progress bar with the loss and the privacy budget spent so far (epsilon at
--delta), writes a loss-curve PNG and the numbers as JSON next to it.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import rnn_ext


def make_data(n, T, K, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, K, (n, T), generator=g)
    labels = ((tokens == 0).sum(1) > (tokens == 1).sum(1)).long()
    return F.one_hot(tokens, K).float(), labels


class Classifier(torch.nn.Module):
    def __init__(self, K, hidden, layers):
        super().__init__()
        self.rnn = rnn_ext.RNN(K, hidden, num_layers=layers, batch_first=True)
        self.head = torch.nn.Linear(hidden, 2)

    def forward(self, x):
        _out, h_n = self.rnn(x)
        return self.head(h_n[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--train", type=int, default=4096, help="training sequences")
    ap.add_argument("--test", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--symbols", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64, help="expected (Poisson) batch size")
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--noise", type=float, default=0.7, help="noise multiplier")
    ap.add_argument("--clip", type=float, default=1.0, help="per-sample gradient norm bound")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eps-every", type=int, default=16,
                    help="steps between two privacy accountings (each costs ~30 ms, several "
                         "training steps)")
    ap.add_argument("--out", default="dp_loss.png")
    args = ap.parse_args(argv)

    from opacus import PrivacyEngine
    from tqdm import tqdm

    # (Opacus' hooks on the linear head: its input needs no gradient, which torch points out)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y = make_data(args.train, args.seq, args.symbols, args.seed)
    xt, yt = make_data(args.test, args.seq, args.symbols, args.seed + 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=args.batch)
    model = Classifier(args.symbols, args.hidden, args.layers)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                            noise_multiplier=args.noise,
                                            max_grad_norm=args.clip)

    def accuracy():
        model.eval()
        with torch.no_grad():
            acc = (model(xt).argmax(1) == yt).float().mean().item()
        model.train()
        return acc

    losses, eps_curve, accs = [], [], [accuracy()]
    t0 = time.perf_counter()
    samples = 0
    eps = 0.0
    for epoch in range(args.epochs):
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}")
        for step, (xb, yb) in enumerate(bar):
            if len(yb) > 0:  # (Poisson sampling may draw an empty batch)
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                samples += len(yb)
                losses.append(loss.item())
            # the privacy spent so far (the accountant's query is slow: every few steps)
            if step % args.eps_every == 0 or step == len(loader) - 1:
                eps = engine.get_epsilon(args.delta)
            if len(yb) > 0:
                eps_curve.append(eps)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", eps=f"{eps:.2f}")
        eps_curve[-1] = eps = engine.get_epsilon(args.delta)
        accs.append(accuracy())
        print(f"epoch {epoch + 1}: test accuracy {accs[-1]:.3f}, "
              f"epsilon {eps_curve[-1]:.2f} (delta {args.delta:g})", flush=True)
    elapsed = time.perf_counter() - t0
    print(f"DP-SGD: {samples / elapsed:.0f} samples/s, final epsilon {eps_curve[-1]:.2f}, "
          f"test accuracy {accs[0]:.3f} -> {accs[-1]:.3f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(
        args=vars(args), losses=losses, epsilon=eps_curve, test_accuracy=accs,
        samples_per_s=samples / elapsed), indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(losses, lw=1, label="training loss (per step)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax2 = ax.twinx()
    ax2.plot(eps_curve, color="tab:red", lw=1, label="epsilon spent")
    ax2.set_ylabel(f"epsilon (delta={args.delta:g})")
    ax.set_title(f"DP-SGD with rnn_ext.RNN (noise {args.noise}, clip {args.clip})")
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print("wrote", out, out.with_suffix(".json"))


if __name__ == "__main__":
    main()
