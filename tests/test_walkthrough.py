"""The walkthrough the project grew from (../shared/seed/000_476d93cc9475dcf5.txt), reproduced
against rnn_ext.RNN: its sizes, its manual loop, its shapes; and the same comparison with
torch.nn.RNN."""
import torch

import rnn_ext

BATCH_SIZE = 4
SEQUENCE_LENGTH = 5
INPUT_SIZE = 1
HIDDEN_SIZE = 3
NUM_LAYERS = 2


def manual_rnn(rnn, sequence, h_0):
    """The walkthrough's manual loop, verbatim in structure: per time step, per layer."""
    w_ih_l0, b_ih_l0 = rnn.weight_ih_l0, rnn.bias_ih_l0
    w_hh_l0, b_hh_l0 = rnn.weight_hh_l0, rnn.bias_hh_l0
    w_ih_l1, b_ih_l1 = rnn.weight_ih_l1, rnn.bias_ih_l1
    w_hh_l1, b_hh_l1 = rnn.weight_hh_l1, rnn.bias_hh_l1
    hidden = h_0.clone()
    output = torch.zeros(SEQUENCE_LENGTH, BATCH_SIZE, HIDDEN_SIZE, dtype=h_0.dtype)
    with torch.inference_mode():
        for idx, seq in enumerate(sequence):
            for layer in range(NUM_LAYERS):
                if layer == 0:
                    hidden[0] = torch.tanh(seq @ w_ih_l0.T + b_ih_l0 + hidden[0] @ w_hh_l0.T
                                           + b_hh_l0)
                elif layer == 1:
                    hidden[1] = torch.tanh(hidden[0] @ w_ih_l1.T + b_ih_l1
                                           + hidden[1] @ w_hh_l1.T + b_hh_l1)
                    output[idx] = hidden[1]
    return output, hidden


def test_walkthrough_float32():
    torch.manual_seed(0)
    rnn = rnn_ext.RNN(input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYERS)
    sequence = torch.randn(SEQUENCE_LENGTH, BATCH_SIZE, INPUT_SIZE)
    h_0 = torch.zeros(NUM_LAYERS, BATCH_SIZE, HIDDEN_SIZE)
    with torch.inference_mode():
        output, h_n = rnn(sequence, h_0)
    assert output.shape == torch.Size([5, 4, 3])
    assert h_n.shape == torch.Size([2, 4, 3])
    manual_output, manual_h_n = manual_rnn(rnn, sequence, h_0)
    torch.testing.assert_close(output, manual_output, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h_n, manual_h_n, atol=1e-6, rtol=1e-5)
    # the last layer's h_n is the output's last step
    assert torch.equal(h_n[-1], output[-1])


def test_walkthrough_float64_tight():
    torch.manual_seed(1)
    rnn = rnn_ext.RNN(INPUT_SIZE, HIDDEN_SIZE, NUM_LAYERS, dtype=torch.float64)
    sequence = torch.randn(SEQUENCE_LENGTH, BATCH_SIZE, INPUT_SIZE, dtype=torch.float64)
    h_0 = torch.randn(NUM_LAYERS, BATCH_SIZE, HIDDEN_SIZE, dtype=torch.float64)
    output, h_n = rnn(sequence, h_0)
    manual_output, manual_h_n = manual_rnn(rnn, sequence, h_0)
    torch.testing.assert_close(output.detach(), manual_output, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h_n.detach(), manual_h_n, atol=1e-12, rtol=1e-12)


def test_walkthrough_same_as_torch_nn_rnn():
    """Same seed: rnn_ext.RNN is initialised exactly as torch.nn.RNN, so the walkthrough gives the
    same numbers with either module."""
    torch.manual_seed(42)
    ref = torch.nn.RNN(input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYERS)
    torch.manual_seed(42)
    ext = rnn_ext.RNN(input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYERS)
    for p, q in zip(ref.parameters(), ext.parameters()):
        assert torch.equal(p, q)
    sequence = torch.randn(SEQUENCE_LENGTH, BATCH_SIZE, INPUT_SIZE)
    h_0 = torch.zeros(NUM_LAYERS, BATCH_SIZE, HIDDEN_SIZE)
    with torch.inference_mode():
        ro, rh = ref(sequence, h_0)
        eo, eh = ext(sequence, h_0)
    torch.testing.assert_close(eo, ro, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(eh, rh, atol=1e-6, rtol=1e-5)


def test_walkthrough_convert_rnns():
    torch.manual_seed(3)
    rnn = torch.nn.RNN(input_size=INPUT_SIZE, hidden_size=HIDDEN_SIZE, num_layers=NUM_LAYERS)
    sequence = torch.randn(SEQUENCE_LENGTH, BATCH_SIZE, INPUT_SIZE)
    h_0 = torch.zeros(NUM_LAYERS, BATCH_SIZE, HIDDEN_SIZE)
    ext = rnn_ext.convert_rnns(rnn)
    manual_output, manual_h_n = manual_rnn(rnn, sequence, h_0)
    with torch.inference_mode():
        output, h_n = ext(sequence, h_0)
    torch.testing.assert_close(output, manual_output, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h_n, manual_h_n, atol=1e-6, rtol=1e-5)
