// rmkernels._C.group_ids_from_objects(uids) -> bytearray of int64 ids: the fast path of
// rmk.group_ids (rmkernels/ops/group_adv.py) for a 1-D numpy object array, verl's uid column.
//
// Labels get ids 0, 1, ... in the order they first appear, with Python dict semantics: two
// labels are the same key when they are the same object, or have equal hashes and compare
// equal (so the ids equal those of the pure-Python dict pass, the fallback and the reference of
// the tests). verl repeats the same str object for the G responses of a prompt (np.repeat of an
// object array), so each label is compared with its neighbour first, by pointer: a run of
// equal neighbours costs one pointer comparison per label and one hash-table lookup per run.
// The table is open addressing over (hash, label, id), keyed like a dict (labels whose hash or
// == raises propagate that error: unhashable labels give Python's TypeError). Arrays of 2^19
// labels and more are read with prefetching (below).
//
// The array (exactly numpy.ndarray: a subclass's __array_interface__ could describe other memory)
// has its element pointers read through __array_interface__ (typestr "|O", 1-D, any stride). The
// pass takes labels whose hash and == are C code and run no Python: exact str, int, float, bool
// and None (verl's uids are exact str; bytes are left out: == with a str may warn, in Python).
// At the first label of another type it stops and returns None, and rmk.group_ids takes its
// Python pass over a copy of the array: a label's __eq__ is Python code, which may resize or
// free the array this pass reads by raw pointer.
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Prefetching (assign_ids<true>): at scale each new label's object and its table slot are a
// cache miss (1M verl uids: ~130k str objects and a table of several MiB), and memory latency,
// not work, is the cost. verl's default balance_batch reorders the batch, so a prompt's uids
// are seldom side by side there. The distances are in labels. Measured against the loop without
// prefetching on the 2-core AMD EPYC dev machine (2026-12-01; thread CPU time, medians of 7;
// uuid4 strings, 8 a prompt; one process per variant, two or three rounds):
//   - shuffled: 1M 48-50 -> 34-35 ms, 2M 129-144 -> 79-82 ms, 524,288 16-19 -> 14-16 ms;
//   - side by side (runs): 1M 14.1-14.4 -> 14.8-15.1 ms, 524,288 6.0-6.5 -> 6.8-7.3 ms (the
//     lookahead's per-label compares, with little latency left to hide).
// Below kPrefetchMinLabels the labels mostly fit the caches and the loop does not prefetch
// (65,536: 0.23-0.25 ms in runs, 0.90-0.92 shuffled, either way; benchmarks/NOTES.md).
constexpr Py_ssize_t kObjectAhead = 24;  // a label's object (its reference count is written)
constexpr Py_ssize_t kSlotAhead = 12;    // an exact str's hash is taken and its table slot fetched
constexpr size_t kReleaseAhead = 16;     // the table's keys, released at the end
constexpr Py_ssize_t kRing = 16;         // the hashes taken ahead, by index mod kRing (> kSlotAhead)
constexpr Py_ssize_t kPrefetchMinLabels = Py_ssize_t(1) << 19;
static_assert(kRing > kSlotAhead && (kRing & (kRing - 1)) == 0, "kRing: a power of two above kSlotAhead");

struct Entry {
  Py_hash_t hash;
  PyObject* key;  // a new reference, or nullptr (empty slot)
  int64_t id;
};

// First-seen ids of labels: a hash table with Python dict's key equality. kPrefetch: the keys
// are released with prefetching (they lie anywhere in memory: a cache miss each at scale).
template <bool kPrefetch>
class IdTable {
 public:
  ~IdTable() {
    const size_t n = slots_.size();
    for (size_t i = 0; i < n; ++i) {
      if (kPrefetch && i + kReleaseAhead < n && slots_[i + kReleaseAhead].key != nullptr) {
        __builtin_prefetch(slots_[i + kReleaseAhead].key, 1);
      }
      Py_XDECREF(slots_[i].key);
    }
  }

  // The id of `key` (hash `h`), a new one when it is not there yet; -1 with a Python error set.
  int64_t id_of(PyObject* key, Py_hash_t h) {
    if (2 * (count_ + 1) > static_cast<int64_t>(slots_.size())) grow();
    const size_t mask = slots_.size() - 1;
    for (size_t i = static_cast<size_t>(h) & mask;; i = (i + 1) & mask) {
      Entry& e = slots_[i];
      if (e.key == nullptr) {
        Py_INCREF(key);
        e = Entry{h, key, count_};
        return count_++;
      }
      if (e.key == key) return e.id;
      if (e.hash == h) {
        const int eq = PyObject_RichCompareBool(e.key, key, Py_EQ);
        if (eq < 0) return -1;
        if (eq) return e.id;
      }
    }
  }

  // Prefetch the slot where a lookup of hash `h` starts (the table may grow before that lookup:
  // then the prefetch was wasted, nothing else).
  void prefetch(Py_hash_t h) const {
    if (!slots_.empty()) __builtin_prefetch(&slots_[static_cast<size_t>(h) & (slots_.size() - 1)]);
  }

 private:
  void grow() {
    std::vector<Entry> old(slots_.size() < 1024 ? 1024 : 2 * slots_.size(), Entry{0, nullptr, 0});
    old.swap(slots_);
    const size_t mask = slots_.size() - 1;
    for (const Entry& e : old) {
      if (e.key == nullptr) continue;
      size_t i = static_cast<size_t>(e.hash) & mask;
      while (slots_[i].key != nullptr) i = (i + 1) & mask;
      slots_[i] = e;
    }
  }

  std::vector<Entry> slots_;
  int64_t count_ = 0;
};

// (data pointer, length, stride in bytes) of a 1-D object array from its __array_interface__;
// false with a TypeError set otherwise.
bool object_array_view(PyObject* arr, PyObject* iface, char** data, Py_ssize_t* n, Py_ssize_t* stride) {
  if (std::strcmp(Py_TYPE(arr)->tp_name, "numpy.ndarray") != 0) {
    PyErr_Format(PyExc_TypeError, "group_ids_from_objects: expected a numpy.ndarray (not a subclass), got %R",
                 reinterpret_cast<PyObject*>(Py_TYPE(arr)));
    return false;
  }
  PyObject* typestr = PyDict_GetItemString(iface, "typestr");
  PyObject* shape = PyDict_GetItemString(iface, "shape");
  PyObject* strides = PyDict_GetItemString(iface, "strides");
  PyObject* ptr = PyDict_GetItemString(iface, "data");
  if (typestr == nullptr || !PyUnicode_Check(typestr) || PyUnicode_CompareWithASCIIString(typestr, "|O") != 0 ||
      shape == nullptr || !PyTuple_Check(shape) || PyTuple_GET_SIZE(shape) != 1 || ptr == nullptr ||
      !PyTuple_Check(ptr) || PyTuple_GET_SIZE(ptr) < 1) {
    PyErr_Format(PyExc_TypeError, "group_ids_from_objects: expected a 1-D numpy object array, got %R", arr);
    return false;
  }
  *n = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, 0));
  *stride = static_cast<Py_ssize_t>(sizeof(PyObject*));
  if (strides != nullptr && strides != Py_None) {
    if (!PyTuple_Check(strides) || PyTuple_GET_SIZE(strides) != 1) {
      PyErr_SetString(PyExc_TypeError, "group_ids_from_objects: malformed strides");
      return false;
    }
    *stride = PyLong_AsSsize_t(PyTuple_GET_ITEM(strides, 0));
  }
  *data = static_cast<char*>(PyLong_AsVoidPtr(PyTuple_GET_ITEM(ptr, 0)));
  return !PyErr_Occurred();
}

// Whether a label's hash and == (with any other such label) are C code, which runs no Python.
inline bool c_label(PyObject* o) {
  return PyUnicode_CheckExact(o) || PyLong_CheckExact(o) || PyFloat_CheckExact(o) || PyBool_Check(o) ||
         o == Py_None;
}

enum class Pass { kDone, kError, kPythonLabel };

// The ids of the n labels at data (stride bytes apart) into ids: kError with a Python error set,
// kPythonLabel (no error) at the first label that is not a c_label.
// kPrefetch (arrays of kPrefetchMinLabels labels and more): the object kObjectAhead labels ahead
// is prefetched; kSlotAhead labels ahead (its object in cache by then) an exact str's hash (pure
// C, cached in the object, so taking it early changes nothing) is taken, kept for its turn, and
// its table slot prefetched; both only for a label that differs from its neighbour (a run's
// first).
template <bool kPrefetch>
Pass assign_ids(const char* data, Py_ssize_t n, Py_ssize_t stride, int64_t* ids) {
  auto at = [&](Py_ssize_t i) { return *reinterpret_cast<PyObject* const*>(data + i * stride); };
  IdTable<kPrefetch> table;
  PyObject* prev = nullptr;  // the previous label (a new reference) and its hash and id
  Py_hash_t prev_hash = 0;
  int64_t prev_id = -1;
  bool ok = true;
  // kPrefetch: the exact str labels whose hashes were taken ahead, by index mod kRing (a label's
  // __eq__ is Python code that may change the array meanwhile: a hash is used only for the
  // object it was taken from).
  struct Ahead {
    PyObject* label;
    Py_hash_t hash;
  };
  Ahead ahead[kRing];
  std::fill(ahead, ahead + kRing, Ahead{nullptr, -1});
  for (Py_ssize_t i = 0; i < n && ok; ++i) {
    if constexpr (kPrefetch) {
      if (i + kObjectAhead < n && at(i + kObjectAhead) != at(i + kObjectAhead - 1)) {
        __builtin_prefetch(at(i + kObjectAhead), 1);  // written: the reference count
      }
      if (i + kSlotAhead < n) {
        PyObject* next = at(i + kSlotAhead);
        Ahead a{nullptr, -1};
        if (next != at(i + kSlotAhead - 1) && PyUnicode_CheckExact(next)) {
          a = Ahead{next, PyObject_Hash(next)};
          table.prefetch(a.hash);
        }
        ahead[(i + kSlotAhead) & (kRing - 1)] = a;
      }
    }
    PyObject* label = at(i);
    if (label == prev) {  // verl's layout: the same object as the neighbour
      ids[i] = prev_id;
      continue;
    }
    if (!c_label(label)) {
      Py_XDECREF(prev);
      return Pass::kPythonLabel;
    }
    Py_INCREF(label);
    Py_hash_t h = -1;
    if (kPrefetch && ahead[i & (kRing - 1)].label == label) h = ahead[i & (kRing - 1)].hash;  // taken ahead
    if (h == -1) h = PyObject_Hash(label);
    int64_t id = -1;
    if (h == -1 && PyErr_Occurred()) {
      ok = false;
    } else {
      int eq = 0;
      if (prev != nullptr && h == prev_hash) {
        eq = PyObject_RichCompareBool(prev, label, Py_EQ);
        ok = eq >= 0;
      }
      if (ok) {
        id = eq ? prev_id : table.id_of(label, h);
        ok = id >= 0;
      }
    }
    Py_XDECREF(prev);
    prev = label;
    prev_hash = h;
    prev_id = id;
    ids[i] = id;
  }
  Py_XDECREF(prev);
  return ok ? Pass::kDone : Pass::kError;
}

}  // namespace

// METH_O: uids -> bytearray of len(uids) int64 ids (native byte order), or None at a label whose
// hash or == may be Python code (c_label).
extern "C" PyObject* rmk_group_ids_from_objects(PyObject* /*self*/, PyObject* arr) {
  PyObject* iface = PyObject_GetAttrString(arr, "__array_interface__");
  if (iface == nullptr || !PyDict_Check(iface)) {
    Py_XDECREF(iface);
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError, "group_ids_from_objects: expected a 1-D numpy object array, got %R", arr);
    return nullptr;
  }
  char* data = nullptr;
  Py_ssize_t n = 0, stride = 0;
  if (!object_array_view(arr, iface, &data, &n, &stride)) {
    Py_DECREF(iface);
    return nullptr;
  }
  PyObject* out = PyByteArray_FromStringAndSize(nullptr, n * static_cast<Py_ssize_t>(sizeof(int64_t)));
  if (out == nullptr) {
    Py_DECREF(iface);
    return nullptr;
  }
  int64_t* ids = reinterpret_cast<int64_t*>(PyByteArray_AS_STRING(out));
  const Pass done =
      n >= kPrefetchMinLabels ? assign_ids<true>(data, n, stride, ids) : assign_ids<false>(data, n, stride, ids);
  Py_DECREF(iface);
  if (done != Pass::kDone) {
    Py_DECREF(out);
    if (done == Pass::kError) return nullptr;
    Py_RETURN_NONE;
  }
  return out;
}
