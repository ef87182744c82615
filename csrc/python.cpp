// The Python module rnn_ext._C.  Importing it loads this library, which registers the ops
// (csrc/ops.cpp).  It also holds the eager fast path of rnn_ext.ops.rnn: a plain CPython call
// into csrc/autograd.cpp.  Calling an op through torch.ops costs ~20 us of argument parsing
// (more when its Python autograd registration is on the way) on a small CPU, more than the
// whole kernel at small sizes; this entry costs ~1 us.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <utility>

#include "autograd.h"

namespace rnn_ext {
namespace {

const at::Tensor& tensor_arg(PyObject* obj, const char* name) {
  if (!THPVariable_Check(obj)) {
    throw torch::TypeError(
        c10::str("rnn_ext._C.rnn: ", name, " must be a Tensor, not ", Py_TYPE(obj)->tp_name));
  }
  return THPVariable_Unpack(obj);
}

bool bool_arg(PyObject* obj, const char* name) {
  if (!PyBool_Check(obj)) {
    throw torch::TypeError(
        c10::str("rnn_ext._C.rnn: ", name, " must be a bool, not ", Py_TYPE(obj)->tp_name));
  }
  return obj == Py_True;
}

PyObject* wrap_or_none(const at::Tensor& t) {
  if (!t.defined()) Py_RETURN_NONE;
  return THPVariable_Wrap(t);
}

// A Python object owned from C++: released with the GIL held (autograd may free its node on
// another thread), not at all once the interpreter is gone.
std::shared_ptr<PyObject> own(PyObject* obj) {
  Py_INCREF(obj);
  return std::shared_ptr<PyObject>(obj, [](PyObject* o) {
#if PY_VERSION_HEX >= 0x030D0000
    const bool finalizing = Py_IsFinalizing();
#else
    const bool finalizing = _Py_IsFinalizing();
#endif
    if (Py_IsInitialized() && !finalizing) {  // (at shutdown: left to the OS)
      pybind11::gil_scoped_acquire gil;
      Py_DECREF(o);
    }
  });
}

// Calls fn(args...) with the GIL held; a Python exception becomes a C++ python_error.
template <typename... Args>
pybind11::object call_python(PyObject* fn, Args&&... args) {
  try {
    return pybind11::reinterpret_borrow<pybind11::object>(fn)(std::forward<Args>(args)...);
  } catch (pybind11::error_already_set& e) {
    e.restore();
    throw python_error();
  }
}

// The per-sample sink of rnn_ext.dp: a callable taking the list of per-sample gradients, with
// an optional grad_scale() (the factor they are wanted times).
std::shared_ptr<PerSampleSink> sink_arg(PyObject* obj) {
  if (obj == Py_None) return nullptr;
  if (!PyCallable_Check(obj)) {
    throw torch::TypeError(c10::str("rnn_ext._C.rnn: per_sample must be callable or None, not ",
                                    Py_TYPE(obj)->tp_name));
  }
  auto fn = own(obj);
  auto sink = std::make_shared<PerSampleSink>();
  sink->scale = [fn]() {
    pybind11::gil_scoped_acquire gil;
    THPObjectPtr scale_fn(PyObject_GetAttrString(fn.get(), "grad_scale"));
    if (!scale_fn) {
      if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw python_error();
      PyErr_Clear();
      return 1.0;
    }
    THPObjectPtr scale(PyObject_CallNoArgs(scale_fn.get()));
    const double value = scale ? PyFloat_AsDouble(scale.get()) : -1.0;
    if (!scale || (value == -1.0 && PyErr_Occurred())) throw python_error();
    return value;
  };
  sink->take = [fn](std::vector<at::Tensor> grads) {
    pybind11::gil_scoped_acquire gil;
    pybind11::list list;
    for (auto& g : grads) list.append(pybind11::reinterpret_steal<pybind11::object>(wrap_or_none(g)));
    call_python(fn.get(), list);
  };
  return sink;
}

// rnn(input, hx, weights, batch_sizes, has_biases, num_layers, bidirectional, relu, dropout,
//     train[, per_sample]) -> (output, h_n)
PyObject* py_rnn(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 10 && nargs != 11) {
    throw torch::TypeError(
        c10::str("rnn_ext._C.rnn takes 10 or 11 positional arguments (", nargs, " given)"));
  }
  const at::Tensor& input = tensor_arg(args[0], "input");
  const at::Tensor& hx = tensor_arg(args[1], "hx");
  const THPObjectPtr seq(
      PySequence_Fast(args[2], "rnn_ext._C.rnn: weights must be a sequence"));
  if (!seq) return nullptr;
  const Py_ssize_t nw = PySequence_Fast_GET_SIZE(seq.get());
  std::vector<at::Tensor> weights;
  weights.reserve(nw);
  for (Py_ssize_t i = 0; i < nw; ++i) {
    weights.push_back(tensor_arg(PySequence_Fast_GET_ITEM(seq.get(), i), "every weight"));
  }
  std::optional<at::Tensor> batch_sizes;
  if (args[3] != Py_None) batch_sizes = tensor_arg(args[3], "batch_sizes");
  const bool has_biases = bool_arg(args[4], "has_biases");
  const int64_t num_layers = PyLong_AsLongLong(args[5]);
  if (num_layers == -1 && PyErr_Occurred()) return nullptr;
  const bool bidirectional = bool_arg(args[6], "bidirectional");
  const bool relu = bool_arg(args[7], "relu");
  const double dropout = PyFloat_AsDouble(args[8]);
  if (dropout == -1.0 && PyErr_Occurred()) return nullptr;
  const bool train = bool_arg(args[9], "train");
  auto per_sample = sink_arg(nargs == 11 ? args[10] : Py_None);

  at::Tensor out, hy;
  {
    pybind11::gil_scoped_release no_gil;
    std::tie(out, hy) = rnn(input, hx, weights, batch_sizes, has_biases, num_layers,
                            bidirectional, relu, dropout, train, std::move(per_sample));
  }
  PyObject* result = PyTuple_New(2);
  if (result == nullptr) return nullptr;
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(out));
  PyTuple_SET_ITEM(result, 1, THPVariable_Wrap(hy));
  return result;
  END_HANDLE_TH_ERRORS
}

// The Python function computing the create_graph=True backward (rnn_ext.ops).
PyObject* g_differentiable_backward = nullptr;

BackwardResult call_differentiable_backward(const std::vector<at::Tensor>& saved,
                                            const Config& c, bool need_input, bool need_hx,
                                            const std::vector<bool>& need_w,
                                            const at::Tensor& grad_output,
                                            const at::Tensor& grad_hy) {
  pybind11::gil_scoped_acquire gil;
  namespace py = pybind11;
  py::list saved_list;
  for (const auto& t : saved) saved_list.append(py::reinterpret_steal<py::object>(wrap_or_none(t)));
  py::list need_w_list;
  for (bool n : need_w) need_w_list.append(py::bool_(n));
  const py::object got = call_python(
      g_differentiable_backward, saved_list,
      py::make_tuple(c.has_biases, c.num_layers, c.bidirectional, c.relu),
      py::make_tuple(need_input, need_hx, need_w_list),
      py::reinterpret_steal<py::object>(wrap_or_none(grad_output)),
      py::reinterpret_steal<py::object>(wrap_or_none(grad_hy)));
  auto as_tensor = [](const py::handle& h) {
    return h.is_none() ? at::Tensor() : THPVariable_Unpack(h.ptr());
  };
  const auto parts = got.cast<py::tuple>();
  std::vector<at::Tensor> grad_w;
  for (const auto& g : parts[2].cast<py::list>()) grad_w.push_back(as_tensor(g));
  return {as_tensor(parts[0]), as_tensor(parts[1]), std::move(grad_w)};
}

// set_differentiable_backward(fn): fn(saved, config, needs, grad_output, grad_hy) ->
// (grad_input, grad_hx, [grad of each weight]), see autograd.h.
PyObject* py_set_differentiable_backward(PyObject* /*self*/, PyObject* fn) {
  HANDLE_TH_ERRORS
  if (!PyCallable_Check(fn)) throw torch::TypeError("set_differentiable_backward: expected a callable");
  Py_INCREF(fn);
  Py_XDECREF(g_differentiable_backward);
  g_differentiable_backward = fn;
  set_differentiable_backward(&call_differentiable_backward);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"rnn", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&py_rnn)),
     METH_FASTCALL,
     "rnn(input, hx, weights, batch_sizes, has_biases, num_layers, bidirectional, relu, "
     "dropout, train[, per_sample]) -> (output, h_n): the whole stack, with one autograd node "
     "when a gradient is needed (see rnn_ext.ops.rnn)"},
    {"set_differentiable_backward", &py_set_differentiable_backward, METH_O,
     "installs the Python function that computes the create_graph=True backward"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace rnn_ext

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          rnn_ext::methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
