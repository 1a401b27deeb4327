"""Finishes a CUDA build started on another machine (scripts/gpu_check.sh, `run` on the GPU machine).

    BUILD_DIR=/work/main/build-cuda python3 scripts/gpu_finish_build.py commands.txt [--dry-run]

commands.txt is `ninja -t commands` of the build, recorded where it was configured. Compile commands whose
object already exists are skipped; the others run in parallel on every core. Then the link commands run in
order, and test-backend-ops is linked against the ggml libraries. Tools and libraries the recorded commands
name by an absolute path that this machine lacks (the CUDA runtime, cuBLAS, cmake) are looked up here by
name; the directories they were found in are written to /tmp/chelsea-cuda-libdirs for LD_LIBRARY_PATH.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LIB_DIR_PATTERNS = ("/usr/local/nvidia/lib64", "/usr/local/cuda*/lib64", "/usr/local/cuda*/lib", "/usr/local/cuda*/targets/x86_64-linux/lib",
                    "/usr/lib/x86_64-linux-gnu", "/opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib",
                    "/usr/local/lib/python3*/dist-packages/nvidia/*/lib", "/usr/lib/python3/dist-packages/nvidia/*/lib")


def find_library(name: str) -> str | None:
    """A file named `name`, or a versioned one (libcublas.so -> libcublas.so.13), in the usual places."""
    for pattern in LIB_DIR_PATTERNS:
        for d in sorted(glob.glob(pattern)):
            for candidate in [os.path.join(d, name)] + sorted(glob.glob(os.path.join(d, name + ".*"))):
                if os.path.isfile(candidate):
                    return candidate
    return None


def fix_paths(cmd: str, found_dirs: set[str]) -> str:
    """Replaces absolute paths of tools and libraries this machine lacks."""
    def replace(m: re.Match[str]) -> str:
        path = m.group(0)
        if os.path.exists(path):
            return path
        base = os.path.basename(path)
        if base in ("cmake", "nvcc", "python3", "python3.11"):
            tool = shutil.which(base) or (shutil.which("python3") if base.startswith("python") else None)
            if tool is None and base == "nvcc":
                tool = next(iter(sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))), None)
            if tool:
                return tool
        if ".so" in base or base.endswith(".a"):
            lib = find_library(base)
            if lib:
                found_dirs.add(os.path.dirname(lib))
                return lib
        return path
    return re.sub(r"(?<![\w=.-])/[\w./+-]+", replace, cmd)


def output_of(cmd: str) -> str | None:
    outs = re.findall(r"\s-o\s+(\S+)", cmd)
    return outs[-1] if outs else None


def run(cmd: str, cwd: str) -> tuple[int, str, float]:
    t0 = time.time()
    p = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, executable="/bin/bash")
    return p.returncode, (p.stdout + p.stderr)[-3000:], time.time() - t0


def main() -> int:
    build = os.environ.get("BUILD_DIR") or sys.exit("set BUILD_DIR to the build directory")
    lines = [ln.strip() for ln in Path(sys.argv[1]).read_text().splitlines() if ln.strip()]
    found_dirs: set[str] = set()
    compiles, links = [], []
    for ln in lines:
        cmd = fix_paths(re.sub(r"^ccache\s+", "", ln), found_dirs)
        out = output_of(cmd)
        if " -c " in f" {cmd} ":
            if out and not os.path.exists(os.path.join(build, out)):
                compiles.append((out, cmd))
        elif "_ffi_build.py" in cmd:
            continue  # the generated C source travelled with the build
        else:
            links.append(cmd)
    print(f"{len(compiles)} objects to compile, {len(links)} link steps, on {os.cpu_count()} cores", flush=True)
    if "--dry-run" in sys.argv:
        print("\n".join(out for out, _ in compiles) + "\n" + "\n".join(c[:300] for c in links))
        return 0

    failed = 0
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        for (out, _), (rc, text, secs) in zip(compiles, pool.map(lambda oc: run(oc[1], build), compiles)):
            print(f"  {'ok ' if rc == 0 else 'FAILED'} {secs:6.1f} s  {out}", flush=True)
            if rc != 0:
                failed += 1
                print(text, flush=True)
    print(f"compiled in {time.time() - t0:.0f} s, {failed} failed", flush=True)
    if failed:
        return 1

    tbo_obj = "llama.cpp-build/tests/CMakeFiles/test-backend-ops.dir/test-backend-ops.cpp.o"
    links.append(f"/usr/bin/c++ -O3 -DNDEBUG {tbo_obj} -o bin/test-backend-ops -Wl,-rpath,'$ORIGIN' -Wl,--allow-shlib-undefined "
                 "bin/libggml.so bin/libggml-cuda.so bin/libggml-cpu.so bin/libggml-base.so -lpthread")
    for cmd in links:
        out = output_of(cmd)
        if out and os.path.exists(os.path.join(build, out)) and not compiles:
            print(f"  linked already       {out}", flush=True)
            continue
        rc, text, secs = run(cmd, build)
        print(f"  {'ok ' if rc == 0 else 'FAILED'} {secs:6.1f} s  link {output_of(cmd) or shlex.split(cmd)[:3]}", flush=True)
        if rc != 0:
            print(text, flush=True)
            return 1
    # where the libraries ggml-cuda loads at run time live here
    for name in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcuda.so.1"):
        lib = find_library(name)
        if lib:
            found_dirs.add(os.path.dirname(lib))
        else:
            print(f"warning: no {name} found on this machine", flush=True)
    Path("/tmp/chelsea-cuda-libdirs").write_text(":".join(sorted(found_dirs)))
    print(f"CUDA libraries from: {', '.join(sorted(found_dirs)) or '(the recorded paths)'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
