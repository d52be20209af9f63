"""Compiles CUDA sources with NVRTC (libnvrtc from the pinned wheel), as a runtime loader would.

usage: python nvrtc_check.py LIBNVRTC ARCH NAME=FILE[+FILE...] ...
Each NAME is compiled from the concatenation of its FILEs (common.cuh first, like the Rust crate
ships it). Fails on any error or any log output (warnings); checks the PTX .version is <= 9.0.
"""
import ctypes
import re
import sys


def main() -> int:
    lib = ctypes.CDLL(sys.argv[1])
    arch = sys.argv[2]
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    rc_all = 0
    for spec in sys.argv[3:]:
        name, files = spec.split("=", 1)
        src = "\n".join(open(f, encoding="utf-8").read() for f in files.split("+"))
        prog = ctypes.c_void_p()
        ok = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), (name + ".cu").encode(), 0, None, None)
        if ok != 0:
            print(f"nvrtcCreateProgram({name}): {lib.nvrtcGetErrorString(ok).decode()}")
            return 1
        opts = [f"--gpu-architecture=compute_{arch}", "--std=c++17"]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        res = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        text = log.value.decode(errors="replace").strip()
        if res != 0 or text:
            print(f"NVRTC {name} compute_{arch}: {lib.nvrtcGetErrorString(res).decode()}\n{text}")
            rc_all = 1
            continue
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        m = re.search(r"^\.version (\d+)\.(\d+)", ptx.value.decode(), re.M)
        ver = (int(m.group(1)), int(m.group(2))) if m else (99, 99)
        status = "ok" if ver <= (9, 0) else "FAIL (> 9.0)"
        if ver > (9, 0):
            rc_all = 1
        print(f"  nvrtc {name:<12} compute_{arch}: PTX .version {ver[0]}.{ver[1]} {status}")
    return rc_all


if __name__ == "__main__":
    sys.exit(main())
