"""Build checks: every CUDA kernel file compiles with plain nvcc for sm_80 and sm_90 (no
torch needed, so this runs on CPU-only machines), the package works without its compiled
extension, and `python -m rmkernels.info` says what was built."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def test_there_are_cuda_kernels():
    assert CU_FILES, "no csrc/cuda/*.cu found"


# (architecture, C++ standard): setup.py names no -std, so the build gets torch's (C++17 in older
# torch, C++20 in recent); each architecture compiles once, under one of the two
NVCC_TARGETS = [(80, "c++17"), (90, "c++20")]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA compile check needs the CUDA toolkit")
@pytest.mark.parametrize("arch,std", NVCC_TARGETS, ids=[f"sm_{a}-{s}" for a, s in NVCC_TARGETS])
@pytest.mark.parametrize("cu", CU_FILES, ids=[os.path.basename(p) for p in CU_FILES])
def test_cuda_kernels_compile_with_plain_nvcc(cu, arch, std, tmp_path):
    """The .cu files are torch-free: nvcc compiles them for Ampere and Hopper with no torch
    headers on the include path, as C++17 and as C++20 (whichever torch's build gives them)."""
    # setup.py's nvcc flags (no --use_fast_math: the kernels are exact) and torch's -std.
    cmd = [NVCC, f"-std={std}", "-O3", "-lineinfo", "-I", os.path.join(ROOT, "csrc", "include"),
           f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Werror=all-warnings", "-c", cu, "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed on {os.path.basename(cu)}:\n{proc.stderr[-4000:]}"


def test_cuda_layer_is_torch_free():
    for path in CU_FILES + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")):
        text = open(path).read()
        for banned in ("<torch/", "<ATen/", "<c10/"):
            assert banned not in text, (f"{os.path.basename(path)} includes {banned}: the kernel layer must stay "
                                        "torch-free")


def _run_py(code, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)


def test_imports_and_works_without_compiled_extension():
    """A failed load of _C: one clear warning, and the reference backend still works."""
    code = r"""
import sys, warnings
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "rmkernels._C":
            raise ImportError("simulated: no compiler on this machine")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import torch, rmkernels as rmk
msgs = [str(x.message) for x in w if "rmkernels" in str(x.message)]
assert len(msgs) == 1 and "could not be loaded" in msgs[0] and "simulated" in msgs[0], msgs
h, wt = torch.randn(2, 3, 4), torch.randn(1, 4)
r = rmk.last_token_reward(h, wt, lengths=torch.tensor([3, 1]))
assert r.shape == (2, 1)
try:
    rmk.last_token_reward(h, wt, lengths=torch.tensor([3, 1]), backend="cpu")
    raise SystemExit("cpu backend should be unavailable")
except RuntimeError as e:
    assert "not loaded" in str(e) and "Available: reference" in str(e), e
print("ok", rmk.available_backends("cpu"))
"""
    proc = _run_py(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok ['reference']" in proc.stdout


def test_info_reports_build():
    proc = subprocess.run([sys.executable, "-m", "rmkernels.info"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "extension _C loaded: True" in out, out  # CI builds the extension: it must load
    assert "backends for cpu tensors (fastest first): cpu, reference" in out, out
    assert "torch " in out and "triton " in out


def test_extension_error_messages_keep_their_numbers():
    """A kernel op's check formats the sizes it names (c10::str inside rmkernels._C). Built by
    a g++ that links libstdc++ statically, the extension has its own iostreams: the message
    stopped at its first integer here, and the process crashed on an H200 (2026-11-30)."""
    import torch

    import rmkernels  # noqa: F401  (registers the ops)

    if not hasattr(torch.ops.rmkernels, "gae_kernel"):
        pytest.fail("rmkernels._C did not load: CI builds it")
    x, m = torch.randn(3, 8), torch.ones(3, 8, dtype=torch.bool)
    with pytest.raises(ValueError) as err:  # TORCH_CHECK_VALUE
        torch.ops.rmkernels.gae_kernel(torch.randn(3, 9), x, m, 1.0, 0.95, True)
    assert "rewards must be [B, T] = [3, 8], got [3, 9]" in str(err.value), str(err.value)


LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="ELF shared libraries and /proc/self/maps: Linux builds only")
# A library that formats an integer into a stream and reads a file through one: the two uses of
# the iostreams that crashed on the H200 (c10::str in a TORCH_CHECK message, std::ifstream in
# rmkernels._C.huge_pages) when the extension carried its own static libstdc++.
_STREAMS_CPP = """#include <cstring>
#include <fstream>
#include <sstream>
extern "C" int rmk_format(long x, char* out) {
  std::ostringstream s;
  s << x;
  std::ifstream f("/proc/self/stat");
  std::strcpy(out, s.str().c_str());
  return f.good();
}
"""
# A g++ like that image's /opt/gcc/bin/g++: libstdc++ linked statically (its specs), and no
# shared libstdc++ for -lstdc++ to find (setup.py's earlier fix, "-lstdc++" first, did not take
# there; that this is why is an inference, not inspected on the machine).
_STATIC_ONLY_GXX = """#!/bin/bash
args=()
for a in "$@"; do [ "$a" = "-lstdc++" ] && a="-l:libstdc++.a"; args+=("$a"); done
exec g++ "${args[@]}" -static-libstdc++
"""


def _gxx():
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.fail("g++ not found: the extension's own build needs it (CI has it)")
    return gxx


def _shared_lib(tmp_path, name, compiler, *link):
    src = tmp_path / "streams.cpp"
    src.write_text(_STREAMS_CPP)
    out = tmp_path / name
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", str(src), "-o", str(out), *link], check=True,
                   capture_output=True, text=True)
    return str(out)


@LINUX_ONLY
def test_extension_has_no_libstdcxx_of_its_own():
    """rmkernels._C takes libstdc++ from the shared library torch loads: it defines none of the
    symbols only libstdc++ defines (setup.py refuses a build that does)."""
    import rmkernels._C as ext
    from rmkernels._libstdcxx import own_copy

    assert own_copy(ext.__file__) == [], f"{ext.__file__} carries its own libstdc++"


@LINUX_ONLY
def test_own_copy_finds_a_statically_linked_libstdcxx(tmp_path):
    """The check setup.py makes after linking can fail: a library linked with -static-libstdc++
    defines std::locale::classic and ostream::_M_insert<long>; the same code linked the usual
    way defines neither."""
    from rmkernels._libstdcxx import SENTINELS, own_copy

    gxx = _gxx()
    assert own_copy(_shared_lib(tmp_path, "static.so", gxx, "-static-libstdc++")) == sorted(SENTINELS)
    assert own_copy(_shared_lib(tmp_path, "shared.so", gxx)) == []
    assert own_copy(__file__) == []  # not ELF


@LINUX_ONLY
def test_link_args_bind_torch_libstdcxx_under_a_static_only_compiler(tmp_path):
    """setup.py's link arguments (rmkernels._libstdcxx.link_args: the path of the libstdc++ this
    process loaded, torch's) under a g++ that links libstdc++ statically and has no shared one:
    the library defines no libstdc++ of its own and works in this process; "-lstdc++" there gives
    the static copy (what happened on the H200)."""
    import ctypes

    import torch  # noqa: F401  (maps torch's libstdc++ into the process)

    from rmkernels._libstdcxx import link_args, loaded_libstdcxx, own_copy

    _gxx()
    assert loaded_libstdcxx() is not None, "torch is imported, yet no libstdc++ is mapped"
    gxx = tmp_path / "static-only-g++"
    gxx.write_text(_STATIC_ONLY_GXX)
    gxx.chmod(0o755)
    assert own_copy(_shared_lib(tmp_path, "plain.so", str(gxx), "-lstdc++")) != []
    lib = _shared_lib(tmp_path, "bound.so", str(gxx), *link_args())
    assert own_copy(lib) == []
    buf = ctypes.create_string_buffer(32)
    assert ctypes.CDLL(lib).rmk_format(ctypes.c_long(-1234567890123), buf) == 1
    assert buf.value == b"-1234567890123"


def test_cpu_math_is_inlined_into_the_loops():
    """The float exp / log1p of cpu_vec_math.h and the formulas of scalar_math.h are always
    inlined (RMK_ALWAYS_INLINE): one left out of line (GCC 12 at -O3 left exp_core so in the token
    log-probs forward, 6x slower) runs its `#pragma omp simd` loop one element at a time. An
    out-of-line copy leaves its mangled name (namespaces rmkernels::vecmath / rmkernels::math)
    in the library's symbol table, which no inlined one does."""
    try:
        import rmkernels._C as ext
    except ImportError:
        pytest.fail("rmkernels._C did not load: CI builds it")
    with open(ext.__file__, "rb") as f:
        data = f.read()
    for prefix in (b"_ZN9rmkernels7vecmath", b"_ZN9rmkernels4math"):
        at = data.find(prefix)
        assert at < 0, f"{ext.__file__} holds an out-of-line {data[at:at + 80].split(bytes(1))[0]!r}"


def test_version():
    import rmkernels

    assert rmkernels.__version__.count(".") == 2


def test_nvcc_flags_are_exact():
    """setup.py builds the CUDA kernels without fast-math approximations (the README promises
    exact kernels): no --use_fast_math, -ftz=true, -prec-div=false or -prec-sqrt=false."""
    text = open(os.path.join(ROOT, "setup.py")).read()
    for flag in ("--use_fast_math", "-use_fast_math", "-ftz=true", "-prec-div=false", "-prec-sqrt=false"):
        assert f'"{flag}"' not in text, f"setup.py passes {flag} to nvcc"


def test_build_leaves_the_cxx_standard_to_torch():
    """setup.py names no C++ standard (-std=, /std:) for the host compiler or nvcc: torch's
    BuildExtension then adds the one its headers need (C++20 in recent torch, whose headers
    refuse C++17; a pinned -std=c++17 overrode it)."""
    import ast

    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    named = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and n.value.lstrip("-/").startswith("std")]
    assert not named, f"setup.py passes a C++ standard to the compilers: {named}"


def _tracked_files():
    proc = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        pytest.skip(f"not a git checkout ({proc.stderr.strip()[:200]}): the sdist check lists the tracked files")
    return [f for f in proc.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


def test_sdist_holds_what_a_build_from_it_needs(tmp_path):
    """The source distribution (MANIFEST.in) holds every tracked file under csrc/ (the headers
    and the CUDA sources: without them an install from the sdist failed on
    `rmkernels/codes.h: No such file`), tests/ (their helpers too), benchmarks/ and scripts/
    (the tests import them and read benchmarks/results: without them pytest in the unpacked
    sdist stopped at collection, `No module named 'benchmarks'`) and docs/, the package's
    Python files, the license and the README, whatever the build configuration of the machine
    that makes it (here RMKERNELS_BUILD_EXT=0, which used to leave out all of csrc/). A build
    config left in the tree by an earlier build is not shipped: an install writes its own."""
    import tarfile

    tracked = _tracked_files()
    src = tmp_path / "src"
    for f in tracked:
        os.makedirs(src / os.path.dirname(f), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), src / f)
    (src / "rmkernels" / "_build_config.py").write_text("BUILD_CONFIG = {'cpp': True}\n")  # a stale one
    env = {**os.environ, "RMKERNELS_BUILD_EXT": "0"}
    code = "from setuptools import build_meta; print(build_meta.build_sdist('dist'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=src, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    name = proc.stdout.strip().splitlines()[-1]
    with tarfile.open(src / "dist" / name) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    want = [f for f in tracked
            if f.startswith(("csrc/", "tests/", "benchmarks/", "scripts/", "docs/", "rmkernels/", "python/"))
            and not f.startswith("rmkernels/_build_config")]
    want += ["LICENSE", "README.md", "setup.py", "pyproject.toml", "MANIFEST.in", "requirements-test.txt"]
    missing = sorted(set(want) - members)
    assert not missing, f"{len(missing)} files not in the sdist: {missing[:20]}"
    assert not [m for m in members if m.endswith((".so", ".o", ".pyc"))]
    assert "rmkernels/_build_config.py" not in members


def test_sdist_and_metadata_need_no_torch(tmp_path):
    """setup.py defines the extension only for a command that builds it: the sdist and the
    metadata steps of a PEP 517 build (egg_info, dist_info: pip runs them before build_wheel)
    import no torch, so `python -m build --sdist` works in its isolated environment (it stopped
    with "building the extension needs torch installed"). A wheel build still asks for torch."""
    tracked = _tracked_files()
    src = tmp_path / "src"
    for f in tracked:
        if f.startswith(("rmkernels/", "python/", "csrc/")) or "/" not in f:
            os.makedirs(src / os.path.dirname(f), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), src / f)
    # torch cannot be imported in the build process (as in an isolated build environment)
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "torch.py").write_text("raise ImportError('No module named torch (hidden)')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hide")}
    env.pop("RMKERNELS_BUILD_EXT", None)
    (src / "meta").mkdir()
    code = ("import sys; from setuptools import build_meta as b; hook = sys.argv[1]\n"
            "print(b.get_requires_for_build_wheel() if hook == 'requires' else\n"
            "      b.prepare_metadata_for_build_wheel('meta') if hook == 'metadata' else\n"
            "      b.build_sdist('dist') if hook == 'sdist' else b.build_wheel('dist'))")
    for hook in ("requires", "metadata", "sdist"):
        proc = subprocess.run([sys.executable, "-c", code, hook], capture_output=True, text=True, cwd=src,
                              env=env, timeout=300)
        assert proc.returncode == 0, hook + ":\n" + proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "needs torch" not in proc.stdout + proc.stderr, hook
    assert not (src / "rmkernels" / "_build_config.py").exists()  # no build, no build config
    proc = subprocess.run([sys.executable, "-c", code, "wheel"], capture_output=True, text=True, cwd=src, env=env,
                          timeout=300)
    assert proc.returncode != 0
    msg = proc.stdout + proc.stderr
    assert "needs torch" in msg and "--no-build-isolation" in msg and "RMKERNELS_BUILD_EXT=0" in msg, msg[-3000:]


def test_no_torch_message_names_build_isolation():
    """`pip install .` without --no-build-isolation, torch installed: pip's isolated build
    environment cannot see it. The message says so (it said "Install torch first")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rmkernels_setup", os.path.join(ROOT, "setup.py"))
    text = open(os.path.join(ROOT, "setup.py")).read()
    # setup.py's functions without its setup() call
    ns = {"__file__": spec.origin, "__name__": "rmkernels_setup"}
    head, sep, _ = text.partition("\nif _extension_requested(")
    assert sep, "setup.py no longer calls setup() under `if _extension_requested(...)`: update this test"
    exec(compile(head, spec.origin, "exec"), ns)
    err = ImportError("No module named 'torch'")
    old_path, old_prefix = list(sys.path), sys.prefix
    try:
        sys.path[:] = ["/tmp/pip-build-env-abc123/overlay/lib/python3.11/site-packages"] + old_path
        assert ns["_isolated_build_env"]()
        msg = ns["_no_torch_message"](err)
        assert "isolated build environment" in msg and "cannot see" in msg and "--no-build-isolation" in msg, msg
        assert "RMKERNELS_BUILD_EXT=0" in msg and "No module named 'torch'" in msg
        assert not msg.startswith("rmkernels: building the extension needs torch installed"), msg
    finally:
        sys.path[:] = old_path
    sys.prefix = "/tmp/build-env-xyz"
    try:
        assert ns["_isolated_build_env"]()
    finally:
        sys.prefix = old_prefix
    if not ns["_isolated_build_env"]():  # a plain environment: both causes are named
        msg = ns["_no_torch_message"](err)
        assert "install torch first" in msg and "--no-build-isolation" in msg and "isolated" in msg, msg
    # the commands that build the extension, and those that do not
    requested = ns["_extension_requested"]
    for argv in (["bdist_wheel", "--dist-dir", "/tmp/x"], ["build_ext", "--inplace"], ["editable_wheel"],
                 ["develop"], ["install"], ["egg_info", "build_ext"]):
        assert requested(argv), argv
    for argv in (["egg_info"], ["dist_info", "--output-dir", "/tmp/m", "--keep-egg-info"],
                 ["sdist", "--formats", "gztar", "--dist-dir", "/tmp/d"], ["--version"], []):
        assert not requested(argv), argv


def test_info_says_when_installed_without_the_extension(tmp_path):
    """A package installed with RMKERNELS_BUILD_EXT=0 has no _C file: the one warning says so
    (it said Python's "cannot import name '_C' from partially initialized module ... circular
    import"), and names triton as working only where it is installed."""
    pkg = tmp_path / "rmkernels"
    shutil.copytree(os.path.join(ROOT, "rmkernels"), pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (pkg / "_build_config.py").write_text("BUILD_CONFIG = {'cpp': False, 'cuda': False, 'archs': ''}\n")
    code = r"""
import warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import rmkernels
msgs = [str(x.message) for x in w if "rmkernels" in str(x.message)]
print(len(msgs)); print(msgs[0])
"""
    import sysconfig

    # -S: no .pth files, so an editable install's import hook does not map `rmkernels` to the
    # checkout (which has its _C); site-packages stay importable through PYTHONPATH.
    paths = [str(tmp_path), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    count, msg = proc.stdout.split("\n", 1)
    assert count == "1", proc.stdout
    assert "installed without it (RMKERNELS_BUILD_EXT=0)" in msg and "circular" not in msg, msg
    import importlib.util

    has_triton = importlib.util.find_spec("triton") is not None
    assert ("'reference' and 'triton' backends work" in msg) == has_triton, msg


def test_triton_interpreter_needs_numpy_below_2_4(monkeypatch):
    """triton 3.6's interpreter fails on every kernel with numpy >= 2.4: the backend is then
    not available on CPU tensors, with the reason (it was listed as available)."""
    from importlib import metadata

    from rmkernels import _backend

    versions = {"triton": "3.6.0", "numpy": "2.4.6"}
    monkeypatch.setattr(metadata, "version", lambda name: versions[name])
    assert "needs numpy < 2.4, numpy 2.4.6 is installed" in _backend._interpreter_problem.__wrapped__()
    versions["numpy"] = "2.3.5"
    assert _backend._interpreter_problem.__wrapped__() is None
    versions.update(triton="3.7.0", numpy="2.4.6")
    assert _backend._interpreter_problem.__wrapped__() is None


def _fake_checkout_and_install(tmp_path, installed_has_c=True):
    """A source checkout whose rmkernels/ has no _C (what a non-editable `pip install .` leaves:
    the built _C went to site-packages) and, in another folder, an installed copy."""
    co = tmp_path / "checkout"
    shutil.copytree(os.path.join(ROOT, "rmkernels"), co / "rmkernels",
                    ignore=shutil.ignore_patterns("_C.*", "*.so", "__pycache__"))
    (co / "rmkernels" / "_build_config.py").write_text("BUILD_CONFIG = {'cpp': True, 'cuda': False, 'archs': ''}\n")
    (co / "setup.py").write_text("# the checkout's setup.py\n")
    (co / "csrc").mkdir()
    site = tmp_path / "site"
    (site / "rmkernels").mkdir(parents=True)
    (site / "rmkernels" / "__init__.py").write_text("")
    if installed_has_c:
        import importlib.machinery

        (site / "rmkernels" / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"")
    return co, site


@pytest.mark.parametrize("installed_has_c", [True, False])
def test_checkout_without_c_reason_names_the_shadowed_install(tmp_path, installed_has_c):
    """The reason for a missing _C in a source checkout: the checkout is what was imported, it
    shadows the installed copy, and the fix is -e / build_ext --inplace or another directory
    (not "no _C is installed next to the package ... Rebuild", which the user just did)."""
    from rmkernels import _ext

    co, site = _fake_checkout_and_install(tmp_path, installed_has_c)
    pkg = str(co / "rmkernels")
    assert _ext._source_checkout(pkg) == str(co)
    assert _ext._source_checkout(str(site / "rmkernels")) is None
    other_checkout = tmp_path / "other"  # another checkout without _C is no installed copy
    (other_checkout / "rmkernels").mkdir(parents=True)
    (other_checkout / "rmkernels" / "__init__.py").write_text("")
    (other_checkout / "setup.py").write_text("")
    (other_checkout / "csrc").mkdir()
    why, todo = _ext._checkout_reason(str(co), pkg, [str(co), str(other_checkout), str(site)])
    assert f"imported from the source checkout {pkg}, where no rmkernels._C is built" in why, why
    assert f"it shadows the rmkernels installed in {site}" in why, why
    assert ("which has its _C" in why) == installed_has_c, why
    assert "pip install --no-build-isolation -e ." in todo and "build_ext --inplace" in todo, todo
    assert "another directory" in todo, todo
    why, todo = _ext._checkout_reason(str(co), pkg, [str(co)])  # nothing installed elsewhere
    assert "shadows" not in why and "another directory" not in todo and "-e ." in todo, (why, todo)


def test_info_in_a_checkout_without_c_says_it_shadows_the_install(tmp_path):
    """After a non-editable install, `python -m rmkernels.info` run in the checkout imports the
    checkout's rmkernels/, which has no _C. The one warning and info say so (they said "no
    rmkernels._C file is installed next to the package ... Rebuild", and info printed the
    checkout's build config {'cpp': True} beside "_C loaded: False" with no word why)."""
    import sysconfig

    co, site = _fake_checkout_and_install(tmp_path)
    code = r"""
import warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    from rmkernels import info
msgs = [str(x.message) for x in w if "rmkernels" in str(x.message)]
print(len(msgs)); print(msgs[0]); print(info.info())
"""
    # -S: no .pth files (an editable install's import hook would map `rmkernels` to this
    # checkout); -c puts the current directory, the fake checkout, first on sys.path.
    paths = [str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=co, env=env)
    assert proc.returncode == 0, proc.stderr
    count, msg, out = proc.stdout.split("\n", 2)
    assert count == "1", proc.stdout
    pkg = os.path.join(str(co), "rmkernels")
    assert f"imported from the source checkout {pkg}, where no rmkernels._C is built" in msg, msg
    assert f"it shadows the rmkernels installed in {site}, which has its _C" in msg, msg
    assert "pip install --no-build-isolation -e ." in msg and "another directory" in msg, msg
    assert "installed next to the package" not in msg and "Rebuild" not in msg, msg
    assert f"imported from: {pkg} (a source checkout)" in out, out
    assert "extension _C loaded: False (rmkernels was imported from the source checkout" in out, out
    assert "setup.py's last build from this checkout; its _C is not here" in out, out
    assert out.count("where no rmkernels._C is built") == 1, out  # the reason once, not on every backend line
    assert "  cpu: unavailable: the C++ extension is not loaded (why: above)" in out, out
