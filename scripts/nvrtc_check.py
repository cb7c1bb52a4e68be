#!/usr/bin/env python3
"""Compiles CUDA sources with NVRTC, as the kernels crate does at run time, to catch errors on a
machine without a GPU (nvcc includes headers that NVRTC lacks, so nvcc passing proves little).

    scripts/nvrtc_check.py [-DNAME=VALUE]... [--ptxas] [--loads KERNEL] FILE.cu...
        # after: source ../shared/gpu/cuda-build-env.sh; --ptxas also assembles the PTX for
        # sm_90 and prints each kernel's registers, spills and shared memory (ptxas -v);
        # --loads KERNEL disassembles KERNEL (nvdisasm, fetched from PyPI on first use) and
        # prints how many global loads (LDG, all of them: planes, activations, escape lists)
        # go out before each run of LOP3/PRMT ops (decode, some address math): a heuristic
        # view; a GEMV step whose plane loads straddle a decode run waits for DRAM twice
        # (confirm in the SASS that the run uses loaded registers)

Prepends pdl.cuh from the source's folder, as the crate does. Finds libnvrtc in the CUDA wheels of cuda-build-env.sh (or $NVRTC_LIB); exits 1 on an error.
"""
import ctypes
import glob
import os
import re
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
    """Registers, spills and shared memory per kernel, from `ptxas -v` for sm_90, and the cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        open(src, "wb").write(ptx)
        cubin = os.path.join(tmp, "k.cubin")
        run = subprocess.run(["ptxas", "-arch=sm_90", "-v", src, "-o", cubin],
                             capture_output=True, text=True)
        binary = open(cubin, "rb").read() if run.returncode == 0 else None
    return (run.stdout + run.stderr).strip(), binary


NVDISASM_WHEEL = "nvidia-cuda-nvdisasm==13.2.86"


def nvdisasm():
    """$NVDISASM, or nvdisasm from its PyPI wheel, unpacked under ~/.cache on first use."""
    if os.environ.get("NVDISASM"):
        return os.environ["NVDISASM"]
    home = os.path.expanduser("~/.cache/cuda13-wheels/nvdisasm")
    tool = os.path.join(home, "nvidia/cu13/bin/nvdisasm")
    if not os.path.exists(tool):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", NVDISASM_WHEEL,
                            "-d", tmp], check=True)
            subprocess.run(["unzip", "-q", "-o", glob.glob(os.path.join(tmp, "*.whl"))[0], "-d", home],
                           check=True)
    return tool


def load_runs(cubin, kernel):
    """Global loads issued before each run of LOP3/PRMT ops in `kernel`'s SASS, or None if the
    cubin has no such kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        open(path, "wb").write(cubin)
        sass = subprocess.run([nvdisasm(), "-c", path], capture_output=True, text=True, check=True).stdout
    runs, loads, inside, found = [], 0, False, False
    for line in sass.splitlines():
        if line.startswith(".text."):
            inside = line.rstrip(":") == ".text." + kernel
            found |= inside
        # LDG.E..., not LDGDEPBAR (a cp.async barrier, no load).
        elif inside and re.search(r"\bLDG\.", line):
            loads += 1
        elif inside and ("LOP3" in line or "PRMT" in line) and loads:
            runs.append(loads)
            loads = 0
    return runs if found else None


def main():
    lib = load_nvrtc()
    args = sys.argv[1:]
    defines = [a.encode() for a in args if a.startswith("-D")]
    want_ptxas = "--ptxas" in args
    loads_of = None
    if "--loads" in args:
        at = args.index("--loads") + 1
        if at >= len(args) or args[at].startswith("-"):
            sys.exit("nvrtc_check: --loads needs a kernel name")
        loads_of = args[at]
    files = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "--loads")]
    failed = False
    for path in files:
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
        if rc == 0 and (want_ptxas or loads_of):
            report, cubin = ptxas_report(ptx_of(lib, prog))
            if want_ptxas or cubin is None:
                print(report)
            failed |= cubin is None
            if loads_of and cubin:
                runs = load_runs(cubin, loads_of)
                if runs is None:
                    print(f"nvrtc_check: no kernel {loads_of} in {path}")
                    failed = True
                else:
                    print(f"{loads_of}: global loads before each run of LOP3/PRMT ops: {runs}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
