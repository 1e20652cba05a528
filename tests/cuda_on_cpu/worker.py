"""The process that runs emulated launches (started by emu.py, never imported by the tests).

It runs with the sanitizer runtime preloaded (LD_PRELOAD) and imports no torch: only numpy
and ctypes. Each request on stdin is one JSON line naming a directory that holds
``case.json`` (the buffers and the calls) and ``in.npz`` (the input bytes); the worker
allocates every buffer with malloc at its exact size (so AddressSanitizer's redzones sit just
past each one), copies the inputs in, calls the C entry points in order, writes ``out.npz``
and answers one JSON line with each call's return code. A sanitizer report, a divergent
barrier or a crash ends the process; emu.py turns its stderr into the test failure.
"""
import ctypes
import json
import os
import sys

import numpy as np


def main():
    lib = ctypes.CDLL(sys.argv[1])
    libc = ctypes.CDLL(None)  # malloc here is the preloaded sanitizer's
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    fns = {}
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write to the reply channel
    for line in sys.stdin:
        req = json.loads(line)
        d = req["dir"]
        with open(os.path.join(d, "case.json")) as f:
            case = json.load(f)
        data = np.load(os.path.join(d, "in.npz"), allow_pickle=False)
        ptrs, sizes = {}, {}
        for name, spec in case["buffers"].items():
            n = int(spec["nbytes"])
            p = libc.malloc(n)
            if p is None and n > 0:
                raise MemoryError(f"malloc({n}) failed for buffer {name}")
            if spec.get("input"):
                src = np.ascontiguousarray(data[name])
                assert src.nbytes == n, (name, src.nbytes, n)
                if n:
                    ctypes.memmove(p, src.ctypes.data, n)
            elif n:
                libc.memset(p, int(spec.get("fill", 0xFF)), n)
            ptrs[name], sizes[name] = p, n
        # Each program starts with no pending runtime error: a launch error that an earlier
        # program left unconsumed (a selftest's deliberate one) is not this program's.
        lib.cudaGetLastError()
        rcs = []
        for call in case["calls"]:
            fn = fns.get(call["fn"])
            if fn is None:
                fn = getattr(lib, call["fn"])
                fn.restype = ctypes.c_int64
                fns[call["fn"]] = fn
            args = []
            for kind, v in call["args"]:
                if kind == "p":
                    args.append(ctypes.c_void_p(None if v is None else ptrs[v]))
                elif kind == "q":  # a pointer v[1] bytes into buffer v[0]
                    args.append(ctypes.c_void_p(ptrs[v[0]] + v[1]))
                elif kind == "i":
                    args.append(ctypes.c_int64(v))
                elif kind == "f":
                    args.append(ctypes.c_double(v))
                else:
                    raise ValueError(f"unknown argument kind {kind!r}")
            rcs.append(int(fn(*args)))
        results = {}
        for name in case["outputs"]:
            buf = np.empty(sizes[name], dtype=np.uint8)
            if sizes[name]:
                ctypes.memmove(buf.ctypes.data, ptrs[name], sizes[name])
            results[name] = buf
        for p in ptrs.values():
            libc.free(p)
        np.savez(os.path.join(d, "out.npz"), **results)
        out.write(json.dumps({"rcs": rcs}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
