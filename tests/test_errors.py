"""Every error (and the constructor warning) of torch.nn.RNN, raised by rnn_ext.RNN with the same
exception type and the same message.  Each case is run against both classes and the two outcomes
are compared; the expected text from the spec (§1.2, §2.3) is also checked, so that a case that
silently stopped raising in both would still fail."""
import re
import warnings

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_ext
from conftest import make_pair


def outcome(fn):
    """(exception type, message) raised by fn(), or None; plus the warnings it gave."""
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        try:
            fn()
            exc = None
        except Exception as e:  # noqa: BLE001
            exc = (type(e), str(e))
    return exc, [(w.category, str(w.message)) for w in ws]


# --- constructor ---------------------------------------------------------------------------

# (args, kwargs, expected exception type, expected message (exact) or None for "same as torch")
CTOR_CASES = [
    ((3, 5), dict(nonlinearity="sigmoid"), ValueError,
     "Unknown nonlinearity 'sigmoid'. Select from 'tanh' or 'relu'."),
    ((3, 5), dict(nonlinearity=None), ValueError,
     "Unknown nonlinearity 'None'. Select from 'tanh' or 'relu'."),
    ((3, 5), dict(nonlinearity="TANH"), ValueError,
     "Unknown nonlinearity 'TANH'. Select from 'tanh' or 'relu'."),
    ((3, 5, 1, "sigmoid"), {}, ValueError,
     "Unknown nonlinearity 'sigmoid'. Select from 'tanh' or 'relu'."),
    ((30, 20, 2), dict(proj_size=10), ValueError,
     "proj_size argument is only supported for LSTM, not RNN or GRU"),
    ((3, 5), dict(proj_size=0), ValueError,
     "proj_size argument is only supported for LSTM, not RNN or GRU"),
    ((3, 5), dict(nonlinearity="sigmoid", proj_size=0), ValueError,  # proj_size checked first
     "proj_size argument is only supported for LSTM, not RNN or GRU"),
]
_DROPOUT_MSG = ("dropout should be a number in range [0, 1] representing the probability of an "
                "element being zeroed")
for _p in (-0.1, 1.5, True, "0.1"):
    CTOR_CASES.append(((3, 5, 2), dict(dropout=_p), ValueError, _DROPOUT_MSG))
for _v, _t in ((0, "int"), (1, "int"), ("True", "str")):
    CTOR_CASES.append(((3, 5), dict(bias=_v), TypeError, f"bias should be of type bool, got: {_t}"))
for _v, _t in ((0, "int"), (1, "int"), ("False", "str")):
    CTOR_CASES.append(((3, 5), dict(batch_first=_v), TypeError,
                       f"batch_first should be of type bool, got: {_t}"))
CTOR_CASES += [
    ((3.0, 5), {}, TypeError, "input_size should be of type int, got: float"),
    (("10", 5), {}, TypeError, "input_size should be of type int, got: str"),
    ((0, 5), {}, ValueError, "input_size must be greater than zero"),
    ((-1, 5), {}, ValueError, "input_size must be greater than zero"),
    ((3, 5.0), {}, TypeError, "hidden_size should be of type int, got: float"),
    ((10, 0, 1), {}, ValueError, "hidden_size must be greater than zero"),
    ((3, -2), {}, ValueError, "hidden_size must be greater than zero"),
    ((10, 10, 0), {}, ValueError, "num_layers must be greater than zero"),
    ((3, 5, -1), {}, ValueError, "num_layers must be greater than zero"),
    ((3, 5, 2.0), {}, TypeError, "'float' object cannot be interpreted as an integer"),
    ((3, 5), dict(dtype=torch.int32), RuntimeError,
     "Only Tensors of floating point and complex dtype can require gradients"),
    ((3, 5, 1, "tanh", True, False, 0.0, False, "cpu"), {}, TypeError,
     "'<' not supported between instances of 'str' and 'int'"),
    ((3, 5, 1, "relu"), dict(nonlinearity="tanh"), TypeError,
     "RNNBase.__init__() got an unexpected keyword argument 'nonlinearity'"),
    ((3, 5), dict(foo=1), TypeError, "RNNBase.__init__() got an unexpected keyword argument 'foo'"),
    ((3,), {}, TypeError, "RNNBase.__init__() missing 1 required positional argument: 'hidden_size'"),
    ((), {}, TypeError,
     "RNNBase.__init__() missing 2 required positional arguments: 'input_size' and 'hidden_size'"),
]


@pytest.mark.parametrize("args,kwargs,etype,msg", CTOR_CASES,
                         ids=[f"{a}-{k}" for a, k, _, _ in CTOR_CASES])
def test_constructor_errors(args, kwargs, etype, msg):
    ref = outcome(lambda: torch.nn.RNN(*args, **dict(kwargs)))
    ext = outcome(lambda: rnn_ext.RNN(*args, **dict(kwargs)))
    assert ref[0] == (etype, msg), "spec and torch disagree: fix the test case"
    assert ext[0] == ref[0]
    assert ext[1] == ref[1]


@pytest.mark.parametrize("args,kwargs", [
    ((3, 5), dict(num_layers=True)), ((True, 5), {}), ((3, 5), dict(bidirectional=1)),
    ((3, 5), dict(bidirectional="x")), ((3, 5, 2), dict(dropout=1)), ((3, 5, 2), dict(dropout=0)),
    ((3, 5, 1, "tanh", True, False, 0.0, False, 0, "cpu", torch.float64), {}),
])
def test_constructor_accepts_what_torch_accepts(args, kwargs):
    ref = outcome(lambda: torch.nn.RNN(*args, **kwargs))
    ext = outcome(lambda: rnn_ext.RNN(*args, **kwargs))
    assert ref[0] is None and ext[0] is None
    assert ext[1] == ref[1]
    assert repr(rnn_ext.RNN(*args, **kwargs)) == repr(torch.nn.RNN(*args, **kwargs))


@pytest.mark.parametrize("p,layers", [(0.5, 1), (0.9, 1), (1, 1), (0.5, 2), (0.0, 1)])
def test_dropout_warning(p, layers):
    ref = outcome(lambda: torch.nn.RNN(3, 5, num_layers=layers, dropout=p))
    ext = outcome(lambda: rnn_ext.RNN(3, 5, num_layers=layers, dropout=p))
    assert ext == ref
    if p > 0 and layers == 1:
        assert ext[1] == [(UserWarning,
                           "dropout option adds dropout after all but last recurrent layer, so "
                           f"non-zero dropout expects num_layers greater than 1, but got "
                           f"dropout={p} and num_layers=1")]
    else:
        assert ext[1] == []


def test_dropout_warning_is_attributed_to_caller_file():
    """torch warns with stacklevel=2 (pointing into torch's own rnn.py, since RNN.__init__ calls
    RNNBase.__init__); rnn_ext's must at least point at a real frame, not at warnings itself."""
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        rnn_ext.RNN(3, 5, dropout=0.5)
    assert len(ws) == 1 and ws[0].category is UserWarning
    assert ws[0].filename.endswith(".py")


# --- forward --------------------------------------------------------------------------------

def _packed(seq_lengths, enforce_sorted, I=3, dtype=torch.float32):
    x = torch.randn(max(seq_lengths), len(seq_lengths), I, dtype=dtype)
    return pack_padded_sequence(x, torch.tensor(seq_lengths), enforce_sorted=enforce_sorted)


def r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


_META = dict(device="meta")

# name: (module kwargs, call args builder, expected type, expected message or None)
# Modules are RNN(3, 5, num_layers=2, **kwargs) unless kwargs has input_size/hidden_size.
FWD_CASES = {
    "input_1d": ({}, lambda: (r(3),), ValueError,
                 "RNN: Expected input to be 2D or 3D, got 1D tensor instead"),
    "input_4d": ({}, lambda: (r(2, 2, 2, 3),), ValueError,
                 "RNN: Expected input to be 2D or 3D, got 4D tensor instead"),
    "input_0d": ({}, lambda: (torch.tensor(1.0),), ValueError,
                 "RNN: Expected input to be 2D or 3D, got 0D tensor instead"),
    "feature_3d": ({}, lambda: (r(4, 2, 6),), RuntimeError,
                   "input.size(-1) must be equal to input_size. Expected 3, got 6"),
    "feature_2d": ({}, lambda: (r(4, 6),), RuntimeError,
                   "input.size(-1) must be equal to input_size. Expected 3, got 6"),
    "feature_batch_first": (dict(batch_first=True), lambda: (r(2, 4, 7),), RuntimeError,
                            "input.size(-1) must be equal to input_size. Expected 3, got 7"),
    "hx_batch": ({}, lambda: (r(7, 4, 3), r(2, 3, 5)), RuntimeError,
                 "Expected hidden size (2, 4, 5), got [2, 3, 5]"),
    "hx_layers": ({}, lambda: (r(7, 4, 3), r(3, 4, 5)), RuntimeError,
                  "Expected hidden size (2, 4, 5), got [3, 4, 5]"),
    "hx_hidden": ({}, lambda: (r(7, 4, 3), r(2, 4, 6)), RuntimeError,
                  "Expected hidden size (2, 4, 5), got [2, 4, 6]"),
    "hx_bidir_one_direction": (dict(bidirectional=True), lambda: (r(7, 4, 3), r(2, 4, 5)),
                               RuntimeError, "Expected hidden size (4, 4, 5), got [2, 4, 5]"),
    "hx_batch_first_not_batch_first": (dict(batch_first=True), lambda: (r(4, 7, 3), r(4, 2, 5)),
                                       RuntimeError,
                                       "Expected hidden size (2, 4, 5), got [4, 2, 5]"),
    "batched_hx_2d": ({}, lambda: (r(7, 4, 3), r(2, 5)), RuntimeError,
                      "For batched 3-D input, hx should also be 3-D but got 2-D tensor"),
    "batched_hx_4d": ({}, lambda: (r(7, 4, 3), r(2, 4, 5, 1)), RuntimeError,
                      "For batched 3-D input, hx should also be 3-D but got 4-D tensor"),
    "unbatched_hx_3d": ({}, lambda: (r(7, 3), r(2, 1, 5)), RuntimeError,
                        "For unbatched 2-D input, hx should also be 2-D but got 3-D tensor"),
    "unbatched_hx_1d": ({}, lambda: (r(7, 3), r(5)), RuntimeError,
                        "For unbatched 2-D input, hx should also be 2-D but got 1-D tensor"),
    "unbatched_hx_layers": ({}, lambda: (r(7, 3), r(3, 5)), RuntimeError,
                            "Expected hidden size (2, 1, 5), got [3, 1, 5]"),
    "unbatched_hx_hidden": ({}, lambda: (r(7, 3), r(2, 4)), RuntimeError,
                            "Expected hidden size (2, 1, 5), got [2, 1, 4]"),
    "dtype_f64": ({}, lambda: (r(4, 2, 3, dtype=torch.float64),), ValueError,
                  "RNN input dtype (torch.float64) does not match weight dtype (torch.float32). "
                  "Convert input: input.to(torch.float32), or convert model: "
                  "model.to(torch.float64)"),
    "dtype_f16": ({}, lambda: (r(4, 2, 3, dtype=torch.float16),), ValueError,
                  "RNN input dtype (torch.float16) does not match weight dtype (torch.float32). "
                  "Convert input: input.to(torch.float32), or convert model: "
                  "model.to(torch.float16)"),
    "dtype_int64": ({}, lambda: (torch.ones(4, 2, 3, dtype=torch.int64),), ValueError,
                    "RNN input dtype (torch.int64) does not match weight dtype (torch.float32). "
                    "Convert input: input.to(torch.float32), or convert model: "
                    "model.to(torch.int64)"),
    "dtype_f32_into_f64": (dict(dtype=torch.float64), lambda: (r(4, 2, 3),), ValueError,
                           "RNN input dtype (torch.float32) does not match weight dtype "
                           "(torch.float64). Convert input: input.to(torch.float64), or convert "
                           "model: model.to(torch.float32)"),
    "dtype_packed": ({}, lambda: (_packed([3, 2], True, dtype=torch.float64),), ValueError,
                     "RNN input dtype (torch.float64) does not match weight dtype "
                     "(torch.float32). Convert input: input.to(torch.float32), or convert model: "
                     "model.to(torch.float64)"),
    "dtype_before_feature": ({}, lambda: (r(4, 2, 9, dtype=torch.float64),), ValueError, None),
    "dim_before_hx": ({}, lambda: (r(3), r(9)), ValueError, None),
    "hx_dtype": ({}, lambda: (r(4, 2, 3), r(2, 2, 5, dtype=torch.float64)), RuntimeError,
                 "mat1 and mat2 must have the same dtype, but got Double and Float"),
    "input_meta": ({}, lambda: (r(4, 2, 3, **_META),), RuntimeError,
                   "Input and parameter tensors are not at the same device, found input tensor "
                   "at meta and parameter tensor at cpu"),
    "hx_meta": ({}, lambda: (r(4, 2, 3), r(2, 2, 5, **_META)), RuntimeError,
                "Input and hidden tensors are not at the same device, found input tensor at cpu "
                "and hidden tensor at meta"),
    "seq_len_0": ({}, lambda: (r(0, 4, 3),), RuntimeError,
                  "Expected sequence length to be larger than 0 in RNN"),
    "seq_len_0_bidir": (dict(bidirectional=True), lambda: (r(0, 4, 3),), RuntimeError,
                        "Expected sequence length to be larger than 0 in RNN"),
    "seq_len_0_batch_first": (dict(batch_first=True), lambda: (r(4, 0, 3),), RuntimeError,
                              "Expected sequence length to be larger than 0 in RNN"),
    "seq_len_0_unbatched": ({}, lambda: (r(0, 3),), RuntimeError,
                            "Expected sequence length to be larger than 0 in RNN"),
    "packed_data_3d": ({}, lambda: (PackedSequence(r(5, 1, 3), torch.tensor([2, 2, 1])),),
                       RuntimeError, "input must have 2 dimensions, got 3"),
    "packed_hx_2d": ({}, lambda: (_packed([3, 3, 1], True), r(2, 3)), RuntimeError,
                     "Expected hidden size (2, 3, 5), got [2, 3]"),
    "packed_unsorted_hx_small": ({}, lambda: (_packed([1, 3, 2], False), r(2, 2, 5)),
                                 RuntimeError,
                                 "INDICES element is out of DATA bounds, id=2 axis_dim=2"),
    "packed_sorted_hx_batch": ({}, lambda: (_packed([3, 2], True), r(2, 3, 5)), RuntimeError,
                               "Expected hidden size (2, 2, 5), got [2, 3, 5]"),
    "packed_feature": ({}, lambda: (_packed([3, 2], True, I=4),), RuntimeError,
                       "input.size(-1) must be equal to input_size. Expected 3, got 4"),
    "hx_tuple": ({}, lambda: (r(4, 2, 3), (r(2, 2, 5),)), AttributeError,
                 "'tuple' object has no attribute 'dim'"),
    "input_list": ({}, lambda: ([1.0, 2.0],), AttributeError,
                   "'list' object has no attribute 'dim'"),
    "input_none": ({}, lambda: (None,), AttributeError,
                   "'NoneType' object has no attribute 'dim'"),
    # test_cudnn_forward_exception (no GPU needed)
    "cudnn_fwd_exc_hx": (dict(input_size=10, hidden_size=20, num_layers=1, batch_first=True),
                         lambda: (r(2, 3, 10), r(1, 2, 19)), RuntimeError, None),
    "cudnn_fwd_exc_input": (dict(input_size=10, hidden_size=20, num_layers=1, batch_first=True),
                            lambda: (r(2, 3, 3),), RuntimeError, None),
    # test_rnn_args_check: RNN(3, 5, 2) with input (7, 4, 3) / hx (2, 4, 5); one bad size each
    "args_check_input_batch": ({}, lambda: (r(7, 5, 3), r(2, 4, 5)), RuntimeError, None),
    "args_check_hx_batch": ({}, lambda: (r(7, 4, 3), r(2, 7, 5)), RuntimeError, None),
    "args_check_input_size": ({}, lambda: (r(7, 4, 7), r(2, 4, 5)), RuntimeError, None),
    "args_check_hidden_size": ({}, lambda: (r(7, 4, 3), r(2, 4, 7)), RuntimeError, None),
    "args_check_layers": ({}, lambda: (r(7, 4, 3), r(7, 4, 5)), RuntimeError, None),
}


@pytest.mark.parametrize("name", list(FWD_CASES))
def test_forward_errors(name):
    kwargs, make_args, etype, msg = FWD_CASES[name]
    kwargs = dict(kwargs)
    I = kwargs.pop("input_size", 3)
    H = kwargs.pop("hidden_size", 5)
    kwargs.setdefault("num_layers", 2)
    ref, ext = make_pair(I, H, **kwargs)
    torch.manual_seed(1)
    args = make_args()
    ref_out = outcome(lambda: ref(*args))
    ext_out = outcome(lambda: ext(*args))
    assert ref_out[0] is not None and ref_out[0][0] is etype, ref_out
    if msg is not None:
        assert ref_out[0][1] == msg, "spec and torch disagree: fix the test case"
    assert ext_out[0] == ref_out[0]


REGEXES = {  # the regexes PyTorch's own tests match
    "hx_batch": "Expected hidden.*size.*got",
    "cudnn_fwd_exc_hx": "Expected hidden.*size.*got",
    "cudnn_fwd_exc_input": re.escape("input.size(-1) must be equal to input_size"),
    "seq_len_0": "Expected sequence length to be larger than 0 in RNN",
    "dtype_f64": (r"RNN input dtype .* does not match weight dtype .* Convert input: "
                  r"input\.to\(.*\), or convert model: model\.to\(.*\)"),
    "input_meta": "Input and parameter tensors are not at the same device",
    "hx_meta": "Input and hidden tensors are not at the same device",
}


@pytest.mark.parametrize("name", list(REGEXES))
def test_forward_error_regexes_of_pytorch_tests(name):
    kwargs, make_args, etype, _ = FWD_CASES[name]
    kwargs = dict(kwargs)
    I = kwargs.pop("input_size", 3)
    H = kwargs.pop("hidden_size", 5)
    kwargs.setdefault("num_layers", 2)
    ext = rnn_ext.RNN(I, H, **kwargs)
    with pytest.raises(etype, match=REGEXES[name]):
        ext(*make_args())


@pytest.mark.parametrize("p", [1.5, -0.5])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
def test_invalid_dropout_set_after_construction(p, training, layers):
    """self.dropout changed after construction bypasses the constructor check; torch then raises
    (from aten) only where it applies dropout.  rnn_ext must behave the same."""
    ref, ext = make_pair(3, 5, num_layers=layers)
    x = r(4, 2, 3)
    results = []
    for m in (ref, ext):
        m.dropout = p
        m.train(training)
        results.append(outcome(lambda: m(x))[0])
    assert results[1] == results[0]


def test_error_leaves_module_usable():
    ref, ext = make_pair(3, 5, num_layers=2)
    with pytest.raises(RuntimeError):
        ext(r(4, 2, 6))
    x = r(4, 2, 3)
    torch.testing.assert_close(ext(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
