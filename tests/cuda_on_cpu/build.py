"""Build the CUDA-on-CPU test libraries from the checkout's csrc/cuda.

Every ``csrc/cuda/*.cu`` file is compiled by the host compiler (g++) with
``include/rmk_emu/emu.h`` force-included, together with the scheduler (``runtime.cpp``),
the C entry points of the launchers (``shims/*.cpp``) and the layer's own test kernels
(``selftest.cu``), into one shared library per variant:

- ``asan``: AddressSanitizer (the bounds of global, i.e. malloc'd, and stack memory; not of
  ``__shared__`` arrays, which are ``static thread_local`` here and get no redzones: see
  CONTRIBUTING.md, "What it does not see"; the worker runs with libasan preloaded);
- ``tsan``: ThreadSanitizer, each CUDA thread a TSan fiber and ``__syncthreads`` the only
  ordering inside a block (runtime.cpp), so conflicting accesses between barriers are races.

Builds are cached under ``$RMK_EMU_CACHE`` (default ``~/.cache/rmkernels/cuda_on_cpu``) by a
hash of every source and header they read and of the flags: any edit of a kernel is rebuilt
and tested. Nothing here is part of the package.
"""
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
CXX = os.environ.get("CXX", "g++")

COMMON = ["-std=c++17", "-g", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Werror=return-type",
          "-fno-omit-frame-pointer", "-include", "rmk_emu/emu.h"]
# Per variant: (flags of the kernel files, flags of runtime.cpp, link flags). The runtime of
# the tsan variant is not instrumented: its warp exchange slots are synchronised by the
# scheduler, which TSan cannot see (it sees the barriers through __tsan_acquire/release).
# The asan variant also traps a misaligned access in the kernels (UBSan's alignment check): a GPU
# faults on one (a vector load of a mask word off its boundary), a CPU does not.
_ALIGN = ["-fsanitize=alignment", "-fno-sanitize-recover=alignment"]
VARIANTS = {
    "asan": (["-O1", "-fsanitize=address", "-DRMK_EMU_ASAN"] + _ALIGN, ["-O1", "-fsanitize=address", "-DRMK_EMU_ASAN"],
             ["-fsanitize=address"] + _ALIGN),
    "tsan": (["-O1", "-fsanitize=thread", "-DRMK_EMU_TSAN"], ["-O1", "-DRMK_EMU_TSAN"], ["-fsanitize=thread"]),
}


def cuda_include_dir():
    """The CUDA toolkit's include directory (for cuda_bf16.h / cuda_fp16.h), or None."""
    cands = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(os.path.join(os.environ[env], "include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    cands += ["/usr/local/cuda/include"] + sorted(glob.glob("/usr/local/cuda-*/include"), reverse=True)
    for c in cands:
        if os.path.exists(os.path.join(c, "cuda_bf16.h")) and os.path.exists(os.path.join(c, "nv", "target")):
            return c
    return None


def sanitizer_runtime(variant):
    """Path of the sanitizer's shared runtime, which the worker preloads."""
    name = {"asan": "libasan.so", "tsan": "libtsan.so"}[variant]
    out = subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(out) or not os.path.exists(out):
        raise RuntimeError(f"{CXX} has no {name} ({out!r}): the CUDA-on-CPU layer needs GCC's sanitizer runtimes")
    return os.path.realpath(out)


def kernel_sources():
    return sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))


def shim_sources():
    return sorted(glob.glob(os.path.join(HERE, "shims", "*.cpp")))


def _inputs():
    """Every file a build reads (hashed for the cache key)."""
    files = kernel_sources() + shim_sources() + [os.path.join(HERE, "runtime.cpp"), os.path.join(HERE, "selftest.cu")]
    for pattern in ("cuda/*.cuh", "cuda/*.h", "include/**/*"):
        files += glob.glob(os.path.join(CSRC, pattern), recursive=True)
    files += glob.glob(os.path.join(HERE, "include", "**", "*"), recursive=True)
    return sorted({f for f in files if os.path.isfile(f)})


def _key(variant, cuda_inc):
    h = hashlib.sha256()
    h.update(repr((VARIANTS[variant], COMMON, CXX, cuda_inc, sys.platform)).encode())
    for f in _inputs():
        h.update(os.path.relpath(f, ROOT).encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:20]


def cache_root():
    return os.environ.get("RMK_EMU_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rmkernels", "cuda_on_cpu"))


def build(variant, jobs=None):
    """Path of the variant's shared library for the current sources (built if not cached)."""
    cuda_inc = cuda_include_dir()
    if cuda_inc is None:
        raise FileNotFoundError("CUDA toolkit headers (cuda_bf16.h, nv/target) not found")
    kflags, rflags, lflags = VARIANTS[variant]
    key = _key(variant, cuda_inc)
    out_dir = os.path.join(cache_root(), f"{variant}-{key}")
    lib = os.path.join(out_dir, "librmk_emu.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{variant}-", dir=cache_root())
    inc = ["-I", os.path.join(HERE, "include"), "-I", os.path.join(CSRC, "include"), "-isystem", cuda_inc]
    units = [(src, ["-x", "c++"] + kflags) for src in kernel_sources() + [os.path.join(HERE, "selftest.cu")]]
    units += [(src, kflags) for src in shim_sources()] + [(os.path.join(HERE, "runtime.cpp"), rflags)]

    def compile_one(i_unit):
        i, (src, flags) = i_unit
        obj = os.path.join(tmp, f"{i}_{os.path.basename(src)}.o")
        cmd = [CXX] + COMMON + flags + inc + ["-c", src, "-o", obj]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"CUDA-on-CPU build ({variant}) failed on {os.path.relpath(src, ROOT)}:\n"
                               f"{' '.join(cmd)}\n{proc.stderr[-6000:]}")
        return obj

    try:
        with ThreadPoolExecutor(max_workers=jobs or min(4, os.cpu_count() or 1)) as ex:
            objs = list(ex.map(compile_one, enumerate(units)))
        link = [CXX, "-shared", "-o", os.path.join(tmp, "librmk_emu.so")] + objs + lflags
        proc = subprocess.run(link, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"CUDA-on-CPU link ({variant}) failed:\n{' '.join(link)}\n{proc.stderr[-4000:]}")
        try:
            os.rename(tmp, out_dir)  # atomic: a concurrent build of the same key wins or loses whole
        except OSError:
            if not os.path.exists(lib):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lib


if __name__ == "__main__":
    for v in sys.argv[1:] or list(VARIANTS):
        print(v, build(v))
