"""RPC workers for the tests: chelsea-rpc-server processes on 127.0.0.1, and a stock llama.cpp rpc-server.

The stock worker is built once from the pristine pinned llama.cpp tree (no ggml_patches), the way a user who
built llama.cpp themselves would have it, and cached beside that tree (a few minutes the first time, ccache
after). ``python tests/rpc_workers.py`` builds it ahead of a test run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0


def _source_script():
    spec = importlib.util.spec_from_file_location("llama_cpp_source", REPO / "cmake" / "llama_cpp_source.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the RPC worker on port {port} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return
        time.sleep(0.1)
    raise RuntimeError(f"the RPC worker on port {port} did not listen within {timeout_s} s")


@contextlib.contextmanager
def workers(binary: Path | str, count: int, threads: int = 1) -> Iterator[list[tuple[str, subprocess.Popen]]]:
    """``count`` workers of ``binary`` on free ports of 127.0.0.1, stopped (killed if need be) on exit."""
    procs: list[tuple[str, subprocess.Popen]] = []
    try:
        for _ in range(count):
            port = free_port()
            proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port), "-t", str(threads)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append((f"127.0.0.1:{port}", proc))
            wait_listening(port, proc)
        yield procs
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stock_rpc_server() -> Path:
    """llama.cpp's rpc-server built from the pinned tree without this project's patches (cached)."""
    src = _source_script()
    cache = src.default_cache_dir()
    pristine = src.pristine_tree(cache, src.obtain_sdist(cache, None))
    root = cache / f"stock-rpc-server-{src.SDIST_SHA256[:12]}"
    binary = root / "build" / "rpc-server"
    if binary.exists():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    (root / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.21)\n"
        "project(stock_rpc_server C CXX)\n"
        f'add_subdirectory("{pristine.as_posix()}/ggml" ggml)\n'
        f'add_executable(rpc-server "{pristine.as_posix()}/tools/rpc/rpc-server.cpp")\n'
        "target_link_libraries(rpc-server PRIVATE ggml)\n"
        "target_compile_features(rpc-server PRIVATE cxx_std_17)\n")
    configure = ["cmake", "-S", str(root), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release",
                 "-DBUILD_SHARED_LIBS=OFF", "-DGGML_RPC=ON", "-DGGML_BUILD_TESTS=OFF", "-DGGML_BUILD_EXAMPLES=OFF"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    if shutil.which("ccache"):
        configure += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
    jobs = str(max(1, len(os.sched_getaffinity(0))))
    for cmd in (configure, ["cmake", "--build", str(root / "build"), "--target", "rpc-server", "-j", jobs]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the stock rpc-server failed: {' '.join(cmd)}\n{done.stdout[-3000:]}"
                               f"\n{done.stderr[-3000:]}")
    return binary


if __name__ == "__main__":
    print(stock_rpc_server())
    sys.exit(0)
