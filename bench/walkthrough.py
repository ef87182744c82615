#!/usr/bin/env python
"""The walkthrough's comparison (shared/seed): torch.nn.RNN, rnn_ext.RNN and the walkthrough's
manual loop on the same weights and input, at its sizes, showing that they agree.

    python bench/walkthrough.py
"""
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
import rnn_ext  # noqa: E402

BATCH_SIZE = 4
SEQUENCE_LENGTH = 5
INPUT_SIZE = 1
HIDDEN_SIZE = 3
NUM_LAYERS = 2


def main() -> int:
    torch.manual_seed(0)
    rnn = torch.nn.RNN(input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYERS)
    ext = rnn_ext.RNN(input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYERS)
    ext.load_state_dict(rnn.state_dict())  # the same weights

    w_ih_l0, b_ih_l0 = rnn.weight_ih_l0, rnn.bias_ih_l0
    w_hh_l0, b_hh_l0 = rnn.weight_hh_l0, rnn.bias_hh_l0
    w_ih_l1, b_ih_l1 = rnn.weight_ih_l1, rnn.bias_ih_l1
    w_hh_l1, b_hh_l1 = rnn.weight_hh_l1, rnn.bias_hh_l1

    sequence = torch.randn(SEQUENCE_LENGTH, BATCH_SIZE, INPUT_SIZE)
    h_0 = torch.zeros(NUM_LAYERS, BATCH_SIZE, HIDDEN_SIZE)

    with torch.inference_mode():
        output, h_n = rnn(sequence, h_0)
        ext_output, ext_h_n = ext(sequence, h_0)

    def manual_rnn():  # the walkthrough's loop, as written there
        hidden = h_0.clone()
        out = torch.zeros(SEQUENCE_LENGTH, BATCH_SIZE, HIDDEN_SIZE)
        with torch.inference_mode():
            for idx, seq in enumerate(sequence):
                for layer in range(NUM_LAYERS):
                    if layer == 0:
                        hidden[0] = torch.tanh(seq @ w_ih_l0.T + b_ih_l0 + hidden[0] @ w_hh_l0.T + b_hh_l0)
                    elif layer == 1:
                        hidden[1] = torch.tanh(hidden[0] @ w_ih_l1.T + b_ih_l1 + hidden[1] @ w_hh_l1.T + b_hh_l1)
                        out[idx] = hidden[1]
        return out, hidden

    manual_output, manual_h_n = manual_rnn()

    torch.set_printoptions(precision=4, sci_mode=False)
    print(f"walkthrough sizes: BATCH_SIZE={BATCH_SIZE} SEQUENCE_LENGTH={SEQUENCE_LENGTH} "
          f"INPUT_SIZE={INPUT_SIZE} HIDDEN_SIZE={HIDDEN_SIZE} NUM_LAYERS={NUM_LAYERS}")
    print(f"output {tuple(output.shape)}, h_n {tuple(h_n.shape)}")
    print("torch.nn.RNN output[-1] (last step, top layer):\n", output[-1])
    print("rnn_ext.RNN  output[-1]:\n", ext_output[-1])
    print("manual loop  output[-1]:\n", manual_output[-1])
    print("h_n (torch.nn.RNN):\n", h_n)
    ok = True
    for name, (o, h) in (("rnn_ext.RNN", (ext_output, ext_h_n)),
                         ("manual loop", (manual_output, manual_h_n))):
        do = (o - output).abs().max().item()
        dh = (h - h_n).abs().max().item()
        agree = torch.allclose(o, output, atol=1e-6, rtol=1e-5) and torch.allclose(h, h_n, atol=1e-6, rtol=1e-5)
        ok &= agree
        print(f"{name:12s} vs torch.nn.RNN: max|d output| = {do:.2e}, max|d h_n| = {dh:.2e}"
              f" -> {'agree' if agree else 'DIFFER'}")
    print("walkthrough check:", "all three agree" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
