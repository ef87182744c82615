#!/usr/bin/env python
"""Character-level language model: embedding -> RNN -> linear, trained on a text that ships with
Python (the source of a standard-library module, ``textwrap`` by default).

    python examples/char_lm.py                       # rnn_ext.RNN and torch.nn.RNN, same init
    python examples/char_lm.py --impl rnn_ext --steps 500
    python examples/char_lm.py --impl torch --out torch_loss.png

Reports tokens per second for each implementation, writes a loss-curve PNG (and the numbers, as
JSON, next to it) and samples a little text from each trained model.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import rnn_ext

IMPLS = {"rnn_ext": rnn_ext.RNN, "torch": torch.nn.RNN}


def load_corpus(module_name: str) -> str:
    """The source code of a standard-library module: a text every Python install has."""
    return inspect.getsource(importlib.import_module(module_name))


class CharLM(torch.nn.Module):
    def __init__(self, rnn_cls, vocab: int, embed: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, embed)
        self.rnn = rnn_cls(embed, hidden, num_layers=layers, batch_first=True,
                           dropout=dropout if layers > 1 else 0.0)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens, hx=None):
        out, hx = self.rnn(self.embed(tokens), hx)
        return self.head(out), hx


def batches(data: torch.Tensor, batch: int, seq: int, seed: int):
    """Endless random windows of seq+1 characters (inputs and next-character targets)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        window = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def train(name, model, data, args, progress=True):
    from tqdm import tqdm

    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    step_fn = model
    if args.compile:
        step_fn = torch.compile(model, fullgraph=name == "rnn_ext")
    losses = []
    model.train()
    it = batches(data, args.batch, args.seq, args.seed + 1)  # same batches for every impl
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{name:>7}", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        x, y = next(it)
        logits, _ = step_fn(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        tokens += x.numel()
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / elapsed:,.0f}")
    elapsed = time.perf_counter() - start
    return losses, tokens / elapsed, elapsed


@torch.no_grad()
def sample(model, stoi, itos, prompt: str, n: int, temperature: float, seed: int) -> str:
    model.eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([[stoi[c] for c in prompt if c in stoi]])
    logits, hx = model(tokens)
    out = []
    for _ in range(n):
        probs = F.softmax(logits[0, -1] / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=g)
        out.append(itos[nxt.item()])
        logits, hx = model(nxt.view(1, 1), hx)  # one step, carrying the hidden state
    return prompt + "".join(out)


def smooth(xs, k):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot(results, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, r) in enumerate(results.items()):
        k = max(1, len(r["losses"]) // 20)
        style = "-" if i == 0 else "--"  # the curves coincide when both start from one init
        ax.plot(r["losses"], alpha=0.2, linestyle=style)
        ax.plot(smooth(r["losses"], k), color=ax.lines[-1].get_color(), linestyle=style,
                label=f"{name} ({r['tokens_per_s']:,.0f} tok/s)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / char)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--impl", choices=["rnn_ext", "torch", "both"], default="both")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--corpus", default="textwrap",
                   help="standard-library module whose source is the training text")
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile (fullgraph=True for rnn_ext)")
    p.add_argument("--sample-chars", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (these matrices are small: one thread is usually fastest, "
                        "and several are much slower when the cores are busy); 0: torch's default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("char_lm_loss.png"),
                   help="loss-curve PNG; the numbers go to the same name with .json")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    text = load_corpus(args.corpus)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    itos = dict(enumerate(chars))
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    print(f"corpus: source of {args.corpus!r}, {len(text):,} characters, vocabulary {len(chars)}; "
          f"model: embed {args.embed}, RNN hidden {args.hidden} x {args.layers} layers; "
          f"{torch.get_num_threads()} threads")

    # One initialisation, shared by every implementation (their state_dicts are identical).
    torch.manual_seed(args.seed)
    init = CharLM(torch.nn.RNN, len(chars), args.embed, args.hidden, args.layers,
                  args.dropout).state_dict()

    impls = ["rnn_ext", "torch"] if args.impl == "both" else [args.impl]
    results = {}
    for name in impls:
        model = CharLM(IMPLS[name], len(chars), args.embed, args.hidden, args.layers, args.dropout)
        model.load_state_dict(init)
        torch.manual_seed(args.seed + 2)  # same dropout masks stream for each
        losses, tok_s, secs = train(name, model, data, args, progress=not args.no_progress)
        results[name] = dict(losses=losses, tokens_per_s=tok_s, seconds=secs)
        print(f"{name:>7}: loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f} "
              f"(mean of last 10) in {secs:.1f} s, {tok_s:,.0f} tokens/s")
        text_out = sample(model, stoi, itos, "def ", args.sample_chars, args.temperature,
                          args.seed)
        print(f"--- sample ({name}) ---\n{text_out}\n---")
    if len(results) == 2:
        ratio = results["rnn_ext"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
        diff = max(abs(a - b) for a, b in zip(results["rnn_ext"]["losses"],
                                              results["torch"]["losses"]))
        print(f"rnn_ext / torch.nn.RNN throughput: {ratio:.2f}x; "
              f"largest difference between their loss curves: {diff:.2e}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.out, f"char LM on the source of {args.corpus}")
    metrics = args.out.with_suffix(".json")
    metrics.write_text(json.dumps(
        {"corpus": args.corpus, "vocab": len(chars), "steps": args.steps,
         "uniform_loss": math.log(len(chars)), "results": results}, indent=1))
    print(f"loss curve: {args.out}  numbers: {metrics}")


if __name__ == "__main__":
    main()
