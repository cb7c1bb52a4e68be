#!/usr/bin/env python3
"""Compiles CUDA sources with NVRTC, as the kernels crate does at run time, to catch errors on a
machine without a GPU (nvcc includes headers that NVRTC lacks, so nvcc passing proves little).

    scripts/nvrtc_check.py [-DNAME=VALUE]... [--ptxas] FILE.cu...
        # after: source ../shared/gpu/cuda-build-env.sh; --ptxas also assembles the PTX for
        # sm_90 and prints each kernel's registers, spills and shared memory (ptxas -v)

Prepends pdl.cuh from the source's folder, as the crate does. Finds libnvrtc in the CUDA wheels of cuda-build-env.sh (or $NVRTC_LIB); exits 1 on an error.
"""
import ctypes
import glob
import os
import subprocess
import sys
import tempfile


def load_nvrtc():
    path = os.environ.get("NVRTC_LIB")
    if not path:
        hits = glob.glob(os.path.expanduser(
            "~/.cache/cuda13-wheels/venv/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so"))
        if not hits:
            sys.exit("nvrtc_check: libnvrtc.so not found; set NVRTC_LIB")
        path = hits[0]
    # NVRTC loads its builtins library from the same folder.
    os.environ["LD_LIBRARY_PATH"] = os.path.dirname(path) + ":" + os.environ.get("LD_LIBRARY_PATH", "")
    ctypes.CDLL(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(path)


def ptx_of(lib, prog):
    size = ctypes.c_size_t()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value


def ptxas_report(ptx):
    """Registers, spills and shared memory per kernel, from `ptxas -v` for sm_90."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        open(src, "wb").write(ptx)
        run = subprocess.run(["ptxas", "-arch=sm_90", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    return (run.stdout + run.stderr).strip()


def main():
    lib = load_nvrtc()
    args = sys.argv[1:]
    defines = [a.encode() for a in args if a.startswith("-D")]
    want_ptxas = "--ptxas" in args
    failed = False
    for path in [a for a in args if not a.startswith("-")]:
        prog = ctypes.c_void_p()
        src = open(path, "rb").read()
        # The crate compiles every .cu after pdl.cuh, found beside it.
        prelude = os.path.join(os.path.dirname(path), "pdl.cuh")
        if os.path.exists(prelude):
            src = open(prelude, "rb").read() + src
        if lib.nvrtcCreateProgram(ctypes.byref(prog), src, path.encode(), 0, None, None) != 0:
            sys.exit(f"nvrtc_check: cannot create a program for {path}")
        flags = [b"--gpu-architecture=compute_90"] + defines
        opts = (ctypes.c_char_p * len(flags))(*flags)
        rc = lib.nvrtcCompileProgram(prog, len(flags), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        text = log.value.decode(errors="replace").strip()
        print(f"{path}: {'ok' if rc == 0 else 'FAILED'}" + (f"\n{text}" if text else ""))
        failed |= rc != 0
        if rc == 0 and want_ptxas:
            print(ptxas_report(ptx_of(lib, prog)))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
