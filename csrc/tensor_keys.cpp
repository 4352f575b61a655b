// lookahead_fused._tensor_keys: the layout key of a list of tensors, and their gradients,
// read in C++.
//
// The front-end checks every parameter and gradient before a kernel sees an address, and
// re-runs the checks only when something moved: it compares, at every step, a key of every
// tensor's address, shape, strides and dtype with the last one (lookahead_fused/_buckets.py,
// `layout_key`). Read through torch's Python accessors that key costs about 0.1 us a tensor
// and accessor, the larger part of the host's time per step. Here the same fields are read
// from the at::Tensor behind each Python tensor and packed into one bytes object: equal
// bytes mean equal sequences of (address, dtype, sizes, strides), or None at the same places.
//
// Unlike _C, this module is built against torch's C++ headers and libraries (CMakeLists.txt
// builds it only when the building Python imports torch), so it is bound to the torch it was
// built with: the module's init refuses any other torch version with an ImportError, and
// the front-end then keeps the Python key (lookahead_fused/_extension.py).
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>
#include <string>

#ifndef LAF_TORCH_VERSION
#error "CMakeLists.txt defines LAF_TORCH_VERSION, the torch.__version__ this module is built against"
#endif

namespace {

// Record layout, one per entry: tag (0 None, 1 tensor); for a tensor then address, dtype,
// dim, sizes[dim], strides[dim], each as int64. `dim` makes the record length explicit, so
// two equal byte strings are two equal sequences of records.
void put(std::string& out, int64_t v) { out.append(reinterpret_cast<const char*>(&v), sizeof v); }

PyObject* layout_key(PyObject* /*module*/, PyObject* seq) {
  PyObject* fast = PySequence_Fast(seq, "layout_key() takes a list or tuple of tensors (or None)");
  if (fast == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  PyObject** items = PySequence_Fast_ITEMS(fast);
  std::string out;
  out.reserve(static_cast<size_t>(n) * 8 * 12);
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = items[i];
      if (item == Py_None) {
        put(out, 0);
        continue;
      }
      if (!THPVariable_Check(item)) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_TypeError, "layout_key(): entry %zd is a %s, not a tensor", i, Py_TYPE(item)->tp_name);
        return nullptr;
      }
      const at::Tensor& t = THPVariable_Unpack(item);
      if (t.layout() != c10::kStrided) {
        // What Tensor.data_ptr() raises for these too: the caller runs the full checks.
        Py_DECREF(fast);
        PyErr_Format(PyExc_RuntimeError, "layout_key(): entry %zd has no strided storage", i);
        return nullptr;
      }
      put(out, 1);
      put(out, static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())));
      put(out, static_cast<int64_t>(t.scalar_type()));
      const auto sizes = t.sizes();
      const auto strides = t.strides();
      put(out, static_cast<int64_t>(sizes.size()));
      for (const int64_t s : sizes) put(out, s);
      for (const int64_t s : strides) put(out, s);
    }
  } catch (const std::exception& e) {  // c10::Error: no storage (a fake tensor), symbolic sizes
    Py_DECREF(fast);
    PyErr_Format(PyExc_RuntimeError, "layout_key(): %s", e.what());
    return nullptr;
  }
  Py_DECREF(fast);
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

// [p.grad for p in params], reading each gradient from the at::Tensor (the Python getter
// pays for an attribute lookup through torch.Tensor's class dict first). The same object the
// getter returns: THPVariable_Wrap hands back a tensor's existing Python object. Tensor
// subclasses other than Parameter may override `grad` in Python: theirs is asked for.
PyObject* grads(PyObject* /*module*/, PyObject* seq) {
  PyObject* fast = PySequence_Fast(seq, "grads() takes a list or tuple of tensors");
  if (fast == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  PyObject** items = PySequence_Fast_ITEMS(fast);
  PyObject* out = PyList_New(n);
  if (out == nullptr) {
    Py_DECREF(fast);
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = items[i];
    PyObject* grad = nullptr;
    if (THPVariable_CheckExact(item)) {
      try {
        const at::Tensor& g = THPVariable_Unpack(item).grad();
        grad = g.defined() ? THPVariable_Wrap(g) : Py_NewRef(Py_None);
      } catch (const std::exception& e) {
        PyErr_Format(PyExc_RuntimeError, "grads(): %s", e.what());
      }
    } else {
      grad = PyObject_GetAttrString(item, "grad");
    }
    if (grad == nullptr) {
      Py_DECREF(out);
      Py_DECREF(fast);
      return nullptr;
    }
    PyList_SET_ITEM(out, i, grad);
  }
  Py_DECREF(fast);
  return out;
}

PyMethodDef methods[] = {
    {"grads", grads, METH_O, "grads(tensors) -> list: [t.grad for t in tensors], read in C++."},
    {"layout_key", layout_key, METH_O,
     "layout_key(tensors) -> bytes: address, dtype, sizes and strides of every tensor (None allowed), "
     "packed; equal bytes mean equal layouts."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_tensor_keys", "Layout keys of tensor lists, read in C++.", -1,
                          methods};

// ImportError unless the torch imported in this process is the one this module was built for.
bool same_torch() {
  PyObject* torch = PyImport_ImportModule("torch");
  if (torch == nullptr) return false;
  PyObject* version = PyObject_GetAttrString(torch, "__version__");
  Py_DECREF(torch);
  if (version == nullptr) return false;
  PyObject* text = PyObject_Str(version);  // torch.__version__ is a TorchVersion (a str subclass)
  Py_DECREF(version);
  if (text == nullptr) return false;
  const char* runtime = PyUnicode_AsUTF8(text);
  const bool same = runtime != nullptr && std::strcmp(runtime, LAF_TORCH_VERSION) == 0;
  if (runtime != nullptr && !same)
    PyErr_Format(PyExc_ImportError, "lookahead_fused._tensor_keys was built for torch %s, this is torch %s",
                 LAF_TORCH_VERSION, runtime);
  Py_DECREF(text);
  return same;
}

}  // namespace

PyMODINIT_FUNC PyInit__tensor_keys() {
  if (!same_torch()) return nullptr;
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "torch_version", LAF_TORCH_VERSION) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
