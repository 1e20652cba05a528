"""Build rmkernels and its C++/CUDA extension ``rmkernels._C``.

Build against the torch that is already installed (never a second torch in an isolated
build environment)::

    pip install --no-build-isolation .        # or -e .

Environment switches
--------------------
RMKERNELS_BUILD_EXT=0        build no extension at all (reference + triton backends only)
RMKERNELS_SKIP_CUDA_BUILD=1  build the C++ CPU kernels only, even if CUDA is available
RMKERNELS_FORCE_CUDA_BUILD=1 fail the build unless the CUDA kernels are built
RMKERNELS_CUDA_ARCHS="8.0;9.0"  architectures, turned into explicit -gencode flags
                             (default "8.0;9.0"; append "+PTX" to one to embed PTX)
MAX_JOBS                     parallel compile jobs (default: from cores and free memory)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _read_version():
    about = {}
    with open(os.path.join(ROOT, "rmkernels", "_version.py")) as f:
        exec(f.read(), about)
    return about["__version__"]


def _requirements(name):
    """The requirement lines of ``name`` (comments and blank lines dropped): the test extra is
    requirements-test.txt, the one list of what the tests need."""
    with open(os.path.join(ROOT, name)) as f:
        return [line.split("#", 1)[0].strip() for line in f if line.split("#", 1)[0].strip()]


def _env_flag(name, default="0"):
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def _gencode_flags(archs):
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def _default_max_jobs():
    # Each torch translation unit needs ~1.5 GiB of memory to compile.
    cores = os.cpu_count() or 1
    try:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        return str(max(1, min(cores, int(free_gib // 1.5))))
    except (ValueError, OSError, AttributeError):
        return str(cores)


# setup.py commands that build nothing: metadata (pip's and build's PEP 517 hooks run egg_info and
# dist_info before build_wheel / build_editable) and the source distribution. They need neither
# torch nor a compiler. Any other command (bdist_wheel, build_ext, editable_wheel, develop,
# install, ...) builds the extension: one missing here still gets it, not a wheel without _C.
_NO_BUILD_COMMANDS = {"sdist", "egg_info", "dist_info", "check", "clean", "alias", "rotate", "saveopts", "setopt"}


def _extension_requested(argv):
    """Whether the setup.py command line ``argv`` (without the script) builds the extension: it
    names a command other than those of _NO_BUILD_COMMANDS. Option values (paths, 'gztar') are
    not command names."""
    from setuptools.dist import Distribution

    known = {name for name, _ in Distribution().get_command_list()}
    return any(arg in known and arg not in _NO_BUILD_COMMANDS for arg in argv)


def _isolated_build_env():
    """Whether this is a build front end's isolated environment (pip's `pip-build-env-*`, build's
    `build-env-*` virtual environment), which cannot see the user's packages."""
    places = [sys.prefix] + [p for p in sys.path if isinstance(p, str)]
    return any("pip-build-env-" in p or os.path.basename(p.rstrip(os.sep)).startswith("build-env-")
               for p in places)


def _no_torch_message(error):
    head = f"rmkernels: building the extension rmkernels._C needs torch, and this build cannot import it ({error}): "
    if _isolated_build_env():
        return head + ("it runs in an isolated build environment (pip's and build's default), which cannot see the "
                       "torch installed in your environment. Build without isolation: `pip install "
                       "--no-build-isolation .` (or -e .; `python -m build --no-isolation`), after installing torch "
                       "if it is not installed; or set RMKERNELS_BUILD_EXT=0 to install the pure-Python backends "
                       "only.")
    return head + ("install torch first, then `pip install --no-build-isolation .`. If torch is installed, this build "
                   "is likely running in an isolated build environment (pip's default), which cannot see it: add "
                   "--no-build-isolation. Or set RMKERNELS_BUILD_EXT=0 to install the pure-Python backends only.")


def _libstdcxx_module():
    """rmkernels/_libstdcxx.py, loaded by path (importing the package would import its ops)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_rmkernels_libstdcxx",
                                                  os.path.join(ROOT, "rmkernels", "_libstdcxx.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extensions():
    if not _env_flag("RMKERNELS_BUILD_EXT", "1"):
        print("rmkernels: RMKERNELS_BUILD_EXT=0, building no C++/CUDA extension")
        return [], {}, {"cpp": False, "cuda": False, "archs": ""}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as e:  # pragma: no cover - only without torch
        sys.exit(_no_torch_message(e))

    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    has_nvcc = bool(nvcc and os.path.exists(nvcc))
    want_cuda = not _env_flag("RMKERNELS_SKIP_CUDA_BUILD")
    force_cuda = _env_flag("RMKERNELS_FORCE_CUDA_BUILD")
    with_cuda = want_cuda and torch.version.cuda is not None and has_nvcc
    if force_cuda and not with_cuda:
        sys.exit(
            "rmkernels: RMKERNELS_FORCE_CUDA_BUILD=1 but the CUDA kernels cannot be built "
            f"(torch.version.cuda={torch.version.cuda}, nvcc found={has_nvcc}, "
            f"RMKERNELS_SKIP_CUDA_BUILD={os.environ.get('RMKERNELS_SKIP_CUDA_BUILD', '0')})"
        )
    archs = os.environ.get("RMKERNELS_CUDA_ARCHS", "8.0;9.0")
    # -fno-trapping-math: the kernels never read floating-point exception flags; without it
    # GCC will not turn a float comparison inside a loop into a select, so the `#pragma omp
    # simd` loops with clamps and masks stay scalar ("control flow in loop"). Results are
    # unchanged (unlike -ffast-math: NaN, inf and rounding keep IEEE semantics).
    # -ffp-contract=off: no fused multiply-adds the source does not write, so the AVX2/AVX-512
    # variants of the loops (csrc/include/rmkernels/cpu_simd.h) give the baseline's bits.
    # -g0: no debug information (Python's own CFLAGS add -g, which made the PPO kernels' CPU file,
    # then one ppo.cpp, take 92 s instead of 67 s on one core of the 2-core AMD EPYC runner).
    # No -std: torch's BuildExtension adds the standard its headers need when the flags name
    # none (C++17 in older torch, C++20 since its headers use C++20: torch 2.13's warn under
    # C++17, later ones refuse it). tests/test_build.py compiles the .cu files (torch-free) as
    # both; the .cpp files, which include torch's headers, build as the installed torch asks.
    cxx = (["-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off", "-g0"]
           if sys.platform != "win32"
           else ["/O2"])
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # libstdc++ as a shared library, torch's own, named by its path before the compiler's library
    # (rmkernels/_libstdcxx.py: a g++ that links it statically gave the extension a second copy
    # of the iostreams, and the process crashed on the H200 image, 2026-11-30 and 2026-12-04).
    # The build is checked for such a copy after linking (Build.build_extension).
    libstdcxx = _libstdcxx_module()
    link = (["-fopenmp"] + libstdcxx.link_args() if sys.platform.startswith("linux")
            else [] if sys.platform == "win32" else ["-fopenmp"])
    if with_cuda:
        print(f"rmkernels: building C++ CPU + CUDA kernels for archs {archs}")
        ext = CUDAExtension(
            "rmkernels._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("RMKERNELS_WITH_CUDA", "1"), ("RMKERNELS_CUDA_ARCHS", f'"{archs}"')],
            extra_compile_args={
                "cxx": cxx,
                # No --use_fast_math: the kernels are exact (IEEE division, sqrt, expf/log1pf
                # of libdevice, denormals kept), as the README promises.
                "nvcc": ["-O3", "-lineinfo"] + _gencode_flags(archs),  # the -std torch adds, as for cxx
            },
            extra_link_args=link,
        )
    else:
        why = "skipped by RMKERNELS_SKIP_CUDA_BUILD" if not want_cuda else (
            "torch has no CUDA" if torch.version.cuda is None else "nvcc not found")
        print(f"rmkernels: building C++ CPU kernels only (CUDA: {why})")
        ext = CppExtension(
            "rmkernels._C",
            cpu_sources,
            include_dirs=include_dirs,
            define_macros=[("RMKERNELS_CUDA_ARCHS", '""')],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    base = BuildExtension.with_options(use_ninja=True)

    class OwnLibstdcxx(Exception):
        pass

    class Build(base):
        """torch's BuildExtension; a failed compile ends with what to do about it, and a library
        that carries its own libstdc++ is refused."""

        def build_extension(self, ext):
            super().build_extension(ext)
            path = self.get_ext_fullpath(ext.name)
            own = libstdcxx.own_copy(path) if os.path.exists(path) else []  # [] for a library that is not ELF
            if own:
                raise OwnLibstdcxx(
                    f"rmkernels: the compiler ({os.environ.get('CXX', 'c++')}) linked a static copy of libstdc++ "
                    f"into {path} (it defines {', '.join(own)}), beside the shared one torch loads: two copies of "
                    "the iostreams crash the process at the first error message. Build with a g++ that links "
                    "libstdc++ as a shared library (CXX=/usr/bin/g++, for example), or set RMKERNELS_BUILD_EXT=0 "
                    "to install without the extension.")

        def run(self):
            try:
                super().run()
            except OwnLibstdcxx as e:
                sys.exit(str(e))
            except Exception as e:  # a compile or link error, no compiler, no ninja...
                sys.exit(f"rmkernels: building the C++ extension rmkernels._C failed ({type(e).__name__}: {e}). "
                         "It needs a C++ compiler with OpenMP for the standard torch asks for (C++17, or C++20 for "
                         "recent torch: g++ >= 10) and the torch it builds against; "
                         "or set RMKERNELS_BUILD_EXT=0 to install without it (the 'reference' and 'triton' "
                         "backends only).")

    return [ext], {"build_ext": Build}, {
        "cpp": True, "cuda": with_cuda, "archs": archs if with_cuda else ""}


if _extension_requested(sys.argv[1:]):
    ext_modules, cmdclass, build_config = _extensions()

    # Record what was asked for at build time; `python -m rmkernels.info` compares it with what loads.
    with open(os.path.join(ROOT, "rmkernels", "_build_config.py"), "w") as f:
        f.write("# generated by setup.py\n")
        f.write(f"BUILD_CONFIG = {build_config!r}\n")
else:  # metadata or the sdist: no torch, no compiler, and no _build_config.py (MANIFEST.in leaves it out)
    ext_modules, cmdclass = [], {}

setup(
    name="rmkernels",
    version=_read_version(),
    description="Fused, exact kernels for RLHF: reward-model pooling and losses, PPO and critic-free advantages",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Operating System :: POSIX :: Linux",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["rmkernels", "rmkernels.*"])
    + find_packages("python", include=["rmkernels_train", "rmkernels_train.*"]),
    package_dir={"rmkernels_train": "python/rmkernels_train"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        # numpy < 2.4: triton 3.6's interpreter (TRITON_INTERPRET=1, Triton on CPU tensors) calls
        # int() on 1-element arrays, which numpy 2.4 refuses
        "triton": ["triton==3.6.0", "numpy<2.4"],
        # rmkernels-train (rmkernels_train.cli checks these and names the missing ones)
        "train": ["transformers>=4.56.2", "tokenizers", "safetensors", "tqdm", "matplotlib"],
        "trl": ["trl>=1.16"],
        "test": _requirements("requirements-test.txt"),
    },
    entry_points={"console_scripts": ["rmkernels-train=rmkernels_train.cli:entry"]},
    zip_safe=False,
)
