"""One libstdc++ in the process: how setup.py links rmkernels._C against torch's, and the check
that it did (no torch import here: setup.py loads this file by path).

A g++ that links libstdc++ statically (the H200 image's /opt/gcc/bin/g++ does; an explicit
``-lstdc++`` did not change that there, presumably because it finds only the archive: not
inspected on that machine) gives the extension its own copy of the
iostreams beside the one torch loaded. Two copies crash the process: on 2026-11-30 and again on
2026-12-04 every TORCH_CHECK message that formats an integer (c10::str on a stream made by
torch's copy) and every ``std::ifstream`` read (``rmkernels._C.huge_pages``) segfaulted there.

- ``link_args()``: the libstdc++ this process has loaded (torch's, once torch is imported),
  named by its path on the link line before the compiler's own library: every symbol the
  extension takes from libstdc++ then binds to that shared library (DT_NEEDED libstdc++.so.6),
  and a static archive the compiler adds after it has nothing left to contribute.
- ``own_copy(path)``: the libstdc++ symbols a built library defines itself (an ELF reading of
  its symbol tables); setup.py refuses a build where it finds any.
"""

import os
import struct
import sys

# Symbols that only libstdc++ itself defines (no header instantiates them inline): std::locale::
# classic() and std::ostream::_M_insert<long> (an extern template: what formatting an integer
# into a stream calls).
SENTINELS = ("_ZNSt6locale7classicEv", "_ZNSo9_M_insertIlEERSoT_")

_SHT_SYMTAB, _SHT_DYNSYM = 2, 11


def loaded_libstdcxx():
    """Path of the libstdc++ shared library mapped into this process, or None (not Linux, none
    loaded)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith("libstdc++.so") and os.path.isfile(path):
                    return path
    except OSError:
        return None
    return None


def link_args():
    """Link arguments naming libstdc++ as a shared library: the path of the one this process
    loaded (torch's), else ``-lstdc++``."""
    path = loaded_libstdcxx()
    return [path] if path else ["-lstdc++"]


def own_copy(path, names=SENTINELS):
    """Those of `names` that the ELF shared library at `path` defines (in .symtab or .dynsym);
    [] for a library that takes them from a shared libstdc++, or for a file that is not ELF."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # 64-bit little-endian only
        return []
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found = set()
    for _, sh_type, _, _, off, size, link, _, _, entsize in sections:
        if sh_type not in (_SHT_SYMTAB, _SHT_DYNSYM) or entsize != 24:
            continue
        str_off, str_size = sections[link][4], sections[link][5]
        strtab = data[str_off:str_off + str_size]
        wanted = {}  # offset in the string table -> name (a name may end a longer string)
        for name in names:
            key, at = name.encode() + b"\0", -1
            while (at := strtab.find(key, at + 1)) >= 0:
                wanted[at] = name
        if not wanted:
            continue
        for st_name, _, _, st_shndx, _, _ in struct.iter_unpack("<IBBHQQ", data[off:off + size]):
            if st_shndx != 0 and st_name in wanted:
                found.add(wanted[st_name])
    return sorted(found)
