"""What crosses the network when the KV cache lives on RPC workers: bytes per phase (model load, prompt, decoded
token, compression), full cache vs Chelsea, and each worker's memory.

    python3 bench/rpc_traffic.py            # two chelsea-rpc-server workers on 127.0.0.1, SmolLM2 (~2 min)

Each worker sits behind a byte-counting TCP relay in this process, so the numbers are the protocol's own bytes
both ways (llama.cpp's RPC messages, without TCP/IP headers). The model's layers and their KV cache are all on the
workers (``n_gpu_layers=99``, split as llama.cpp splits them); the client keeps the input embeddings. Phases: the
model load (weights uploaded once), a prompt of ``--prompt-tokens`` varied-text tokens (the clustered run compresses
while the prompt is fed), the first decoded token (the clustered run compresses to budget there), ``--decode`` more
greedy tokens (per token; fewer than the interval g, so no compression), and one explicit compression to budget
(``Llama.kv_cluster_compress``) of the cells those tokens added.
Results: bench/results/rpc_traffic.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from chelsea_gguf import Llama  # noqa: E402
from chelsea_gguf.kv import MIB  # noqa: E402
from chelsea_gguf.rpc import server_binary  # noqa: E402

import haystacks  # noqa: E402
import rpc_workers  # noqa: E402
from provenance import provenance  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class CountingRelay:
    """127.0.0.1:port -> a worker, counting the bytes each way."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.sent = 0      # client -> worker
        self.received = 0  # worker -> client
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(1 << 20):
                with self._lock:
                    if up:
                        self.sent += len(data)
                    else:
                        self.received += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def total(self) -> tuple[int, int]:
        with self._lock:
            return self.sent, self.received


def measure(method: str, relays: list[CountingRelay], args: argparse.Namespace) -> dict[str, Any]:
    def snapshot() -> tuple[int, int]:
        totals = [r.total() for r in relays]
        return sum(t[0] for t in totals), sum(t[1] for t in totals)

    def phase(name: str, before: tuple[int, int], t0: float, per: int = 1) -> tuple[int, int]:
        now = snapshot()
        phases[name] = {"to_workers_bytes": (now[0] - before[0]) / per, "from_workers_bytes": (now[1] - before[1]) / per,
                        "seconds": (time.perf_counter() - t0) / per}
        return now

    kw: dict[str, Any] = {"kv_cluster": True, "kv_cluster_ratio": args.ratio} if method == "chelsea" else {}
    phases: dict[str, dict[str, float]] = {}
    s, t0 = snapshot(), time.perf_counter()
    with Llama(n_ctx=args.n_ctx, n_threads=1, verbose=False, n_gpu_layers=99,
               rpc_servers=",".join(r.endpoint for r in relays), **kw) as llm:
        s = phase("model load", s, t0)
        items = haystacks.build_items(lambda text: len(llm.tokenize(text, add_bos=False)), [args.prompt_tokens],
                                      depths=(0.5,), haystacks=("prose",), needle_kinds=("fact",))
        tokens = llm.tokenize(items[0].context)[:args.prompt_tokens]
        t0 = time.perf_counter()
        llm.eval(tokens)
        s = phase(f"prompt ({len(tokens)} tokens)", s, t0)
        t0 = time.perf_counter()
        llm.eval([_argmax(llm)])
        s = phase("first decoded token" + (" (with the compression to budget)" if kw else ""), s, t0)
        t0 = time.perf_counter()
        for _ in range(args.decode):
            llm.eval([_argmax(llm)])
        s = phase(f"decode, per token (next {args.decode})", s, t0, per=args.decode)
        stats_before = llm.kv_cluster_stats() if method == "chelsea" else None
        compression = None
        if method == "chelsea":
            t0 = time.perf_counter()
            removed = llm.kv_cluster_compress()
            s = phase("one compression to budget", s, t0)
            after = llm.kv_cluster_stats()
            compression = {"cells_removed": removed, "passes": after["passes"] - stats_before["passes"]}
        memory = [{"name": m.name, "model_mib": m.model_bytes / MIB, "kv_mib": m.kv_bytes / MIB,
                   "compute_mib": m.compute_bytes / MIB} for m in llm.buffer_memory()]
        kv = llm.kv_stats()
        return {"method": method, "phases": phases, "compression": compression, "memory": memory,
                "kv_stats": {"cells": kv.n_cells, "cells_used": kv.n_cells_used}, "n_layers": kv.n_layers}


def _argmax(llm: Llama) -> int:
    import numpy as np

    from chelsea_gguf._lib import ffi, lib

    logits = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(llm.ctx, -1), 4 * llm.n_vocab()), dtype=np.float32)
    return int(np.argmax(logits))


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = [f"RPC traffic, SmolLM2-135M Q4_1 on two chelsea-rpc-server workers on 127.0.0.1 (CPU backend), all layers "
           f"and their KV cache on the workers; commit {meta['commit']}, `{meta['command']}`. Bytes are the RPC "
           "protocol's, both ways, summed over the workers (a counting relay in front of each).", "",
           "| method | phase | to workers | from workers | seconds |", "|---|---|---:|---:|---:|"]
    for r in rows:
        for name, p in r["phases"].items():
            out.append(f"| {r['method']} | {name} | {_size(p['to_workers_bytes'])} | {_size(p['from_workers_bytes'])} "
                       f"| {p['seconds']:.3f} |")
    out += ["", "Memory per buffer type (model weights, KV cache with cluster sizes, compute buffers), MiB:", "",
            "| method | buffer | model | KV | compute |", "|---|---|---:|---:|---:|"]
    for r in rows:
        for m in r["memory"]:
            out.append(f"| {r['method']} | {m['name']} | {m['model_mib']:.2f} | {m['kv_mib']:.2f} | "
                       f"{m['compute_mib']:.2f} |")
    for r in rows:
        if r["compression"]:
            out += ["", f"The {r['method']} compression to budget removed {r['compression']['cells_removed']} cells in "
                        f"{r['compression']['passes']} passes."]
    return "\n".join(out) + "\n"


def _size(n: float) -> str:
    for unit, f in (("MiB", MIB), ("KiB", 1024)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n:.0f} B"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not server_binary().exists():
        raise SystemExit(f"{server_binary()} is not built: reinstall with CHELSEA_RPC=ON (scripts/install.sh does)")
    rows = []
    with rpc_workers.workers(server_binary(), 2) as procs:
        relays = [CountingRelay(endpoint) for endpoint, _ in procs]
        for method in ("full", "chelsea"):
            rows.append(measure(method, relays, args))
            print(json.dumps(rows[-1]["phases"]), flush=True)
    command = "python3 bench/rpc_traffic.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v != ap.get_default(k))
    meta = provenance(command, settings={k: v for k, v in vars(args).items() if k != "out"})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rpc_traffic.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.out / "rpc_traffic.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
