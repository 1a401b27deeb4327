"""llama.cpp's RPC backend: model layers, and their KV cache, on workers on other machines.

A worker is ``chelsea-rpc-server`` (llama.cpp's ``rpc-server`` built from this package's patched tree, so it runs
the clustering ops). A client names its workers as llama-cpp-python does, ``rpc_servers="host:port,host:port"``
(``chelsea-run --rpc``); layers offloaded with ``n_gpu_layers`` are split across them as llama.cpp splits them
(``tensor_split``), and every compression runs on the worker that holds each layer's cache.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from chelsea_gguf._lib import ffi, lib, library_dir

__all__ = ["parse_rpc_servers", "rpc_devices", "model_devices", "server_binary", "server_main", "BufferMemory",
           "buffer_memory", "CONNECT_TIMEOUT_S"]

# a worker that does not accept a connection within this is reported as unreachable (llama.cpp itself would abort)
CONNECT_TIMEOUT_S = 5.0


def parse_rpc_servers(value: str | list[str] | tuple[str, ...], option: str = "rpc_servers") -> list[str]:
    """``"host:port,host:port"`` (or a list of ``host:port``) to a list of endpoints, checked."""
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise ValueError(f"{option}: expected 'host:port[,host:port...]', got {value!r}")
    if not items or any(not v for v in items):
        raise ValueError(f"{option}: expected 'host:port[,host:port...]', got {value!r}")
    for endpoint in items:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{option}: {endpoint!r} is not host:port (a port 1-65535)")
    if len(set(items)) != len(items):
        raise ValueError(f"{option}: a worker is named twice in {value!r}")
    return items


def _check_reachable(endpoint: str, option: str) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ValueError(f"{option}: cannot connect to the RPC worker at {endpoint} ({e.strerror or e}): start one "
                         f"there with `chelsea-rpc-server -H {host} -p {port}`") from None


def rpc_devices(endpoints: list[str], option: str = "rpc_servers") -> list[object]:
    """The devices of the workers at ``endpoints`` (one or more each), in order. Each worker is tried first with a
    plain connection, so that an unreachable one is a ValueError naming it rather than llama.cpp's abort."""
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if reg == ffi.NULL:
        raise ValueError(f"{option}: this build of chelsea-gguf has no RPC backend; reinstall it with CHELSEA_RPC=ON "
                         "(scripts/install.sh does)")
    add_server_ptr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if add_server_ptr == ffi.NULL:
        raise ValueError(f"{option}: the RPC backend has no ggml_backend_rpc_add_server")
    add_server = ffi.cast("ggml_backend_reg_t (*)(const char *)", add_server_ptr)
    devices: list[object] = []
    for endpoint in endpoints:
        _check_reachable(endpoint, option)
        server = add_server(endpoint.encode())
        if server == ffi.NULL or lib.ggml_backend_reg_dev_count(server) == 0:
            raise ValueError(f"{option}: the RPC worker at {endpoint} has no devices")
        devices.extend(lib.ggml_backend_reg_dev_get(server, i) for i in range(lib.ggml_backend_reg_dev_count(server)))
    return devices


def model_devices(endpoints: list[str], option: str = "rpc_servers") -> object:
    """A NULL-terminated ``ggml_backend_dev_t[]`` for ``llama_model_params.devices``: the workers first, then this
    machine's GPUs (integrated ones only when there is no discrete one), the order llama.cpp gives its own ``--rpc``.
    The caller keeps it alive while the model loads."""
    local = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    gpus = [d for d in local if lib.ggml_backend_dev_type(d) == lib.GGML_BACKEND_DEVICE_TYPE_GPU]
    if not gpus:
        gpus = [d for d in local if lib.ggml_backend_dev_type(d) == lib.GGML_BACKEND_DEVICE_TYPE_IGPU]
    devices = rpc_devices(endpoints, option) + gpus
    return ffi.new("ggml_backend_dev_t[]", devices + [ffi.NULL])


@dataclass(frozen=True)
class BufferMemory:
    """What a context allocates on one buffer type: a device (``CPU``, ``RPC0[host:port]``...) or the host."""

    name: str
    model_bytes: int
    kv_bytes: int       # K, V and the cluster sizes
    compute_bytes: int


def buffer_memory(ctx: object) -> list[BufferMemory]:
    n = lib.chelsea_buffer_memory_get(ctx, ffi.NULL, 0)
    if n <= 0:
        return []
    out = ffi.new("struct chelsea_buffer_memory[]", n)
    n = min(n, lib.chelsea_buffer_memory_get(ctx, out, n))
    return [BufferMemory(ffi.string(m.name).decode(errors="replace"), int(m.model_bytes), int(m.kv_bytes),
                         int(m.compute_bytes)) for m in out[0:n]]


def server_binary() -> Path:
    """The worker binary this install built (``CHELSEA_RPC=ON``)."""
    return library_dir().parent / "bin" / ("rpc-server.exe" if os.name == "nt" else "rpc-server")


def server_main() -> None:
    """``chelsea-rpc-server``: llama.cpp's rpc-server (its options: -H host, -p port, -t threads, -d devices)."""
    binary = server_binary()
    if not binary.exists():
        sys.exit(f"chelsea-rpc-server: {binary} is not built; reinstall chelsea-gguf with CHELSEA_RPC=ON "
                 "(scripts/install.sh does)")
    os.execv(str(binary), [str(binary), *sys.argv[1:]])
