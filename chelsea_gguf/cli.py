"""``chelsea-run``: one-shot completion or interactive chat, with llama.cpp's flag conventions.

Generated text goes to stdout; the model line and the performance summary go to stderr, so
``chelsea-run -p ... > out.txt`` captures only the text.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from chelsea_gguf.cluster import OPTIONS, OptionSpec, options_from_keywords
from chelsea_gguf.kv import MIB
from chelsea_gguf.kv_memory import parse_memory_size
from chelsea_gguf.llama import Llama, Timings
from chelsea_gguf.models import ModelFetchError
from chelsea_gguf.options import FLASH_ATTN_MODES, KV_CACHE_TYPES, parse_context_size


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"chelsea-run: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="chelsea-run", description="Run a GGUF model with llama.cpp (chelsea-gguf).")
    p.add_argument("model", nargs="?", help="GGUF file, or a known name (smollm2, gemma3-270m); "
                   "default: SmolLM2-135M-Instruct Q4_1")
    p.add_argument("-m", "--model", dest="model_opt", metavar="FILE", help="GGUF file (same as the positional)")
    p.add_argument("-c", "--ctx", "--ctx-size", dest="ctx", default="4k", metavar="N",
                   help="context size in tokens: 4096, 8k, 64k; 0 = the model's training context (default 4k)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("-p", "--prompt", help="prompt text (raw completion)")
    src.add_argument("-f", "--file", metavar="FILE", help="read the prompt from a file")
    p.add_argument("--chat", action="store_true", help="interactive chat on stdin using the model's chat template")
    p.add_argument("-sys", "--system", metavar="TEXT", help="system message for --chat")
    p.add_argument("-n", "--n-predict", dest="n_predict", type=_n_predict, default=128, metavar="N",
                   help="tokens to generate; -1 = until end of text or a full context (default 128)")
    p.add_argument("-b", "--batch-size", dest="batch_size", type=int, default=512, metavar="N")
    p.add_argument("-ub", "--ubatch-size", dest="ubatch_size", type=int, default=512, metavar="N")
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", type=int, default=0, metavar="N")
    p.add_argument("-ts", "--tensor-split", dest="tensor_split", metavar="N0,N1,...",
                   help="shares of the offloaded layers per device, e.g. 3,1 (llama.cpp's split)")
    p.add_argument("--rpc", dest="rpc", metavar="HOST:PORT,...",
                   help="RPC workers (chelsea-rpc-server) to hold the offloaded layers (-ngl) and their KV cache")
    p.add_argument("-fa", "--flash-attn", dest="flash_attn", default="auto", choices=sorted(FLASH_ATTN_MODES),
                   help="flash attention: on, off or auto, on where the backend supports it (default auto)")
    p.add_argument("-ctk", "--cache-type-k", dest="cache_type_k", default="f16", choices=list(KV_CACHE_TYPES),
                   metavar="TYPE", help=f"K cache type: {', '.join(KV_CACHE_TYPES)} (default f16)")
    p.add_argument("-ctv", "--cache-type-v", dest="cache_type_v", default="f16", choices=list(KV_CACHE_TYPES),
                   metavar="TYPE", help="V cache type (default f16)")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="threads (default: all CPUs)")
    p.add_argument("-s", "--seed", type=int, default=0xFFFFFFFF, metavar="N", help="RNG seed (default random)")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", dest="top_k", type=int, default=40)
    p.add_argument("--top-p", dest="top_p", type=float, default=0.95)
    p.add_argument("--min-p", dest="min_p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", dest="repeat_penalty", type=float, default=1.0)
    p.add_argument("--no-display-prompt", dest="display_prompt", action="store_false",
                   help="do not echo the prompt before the generated text")
    add_cluster_arguments(p)
    p.add_argument("--kv-mem", dest="kv_mem", metavar="SIZE", type=_memory_size,
                   help="KV memory budget (512M, 2G, 2GiB): clustering with the largest ratio whose K, V and cluster "
                        "sizes fit it for the --ctx context (-c 0: the model's training context)")
    p.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    return p


def _n_predict(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count, got {text!r}") from None
    if n < -1:
        raise argparse.ArgumentTypeError(f"{n} is out of range (-1 = until the end, or 0 and more)")
    return n


def _memory_size(text: str) -> int:
    try:
        return parse_memory_size(text, "--kv-mem")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--kv-mem: ")) from None


def _full_cache_bytes(llm: Llama) -> int:
    return llm.kv_memory_plan.full_bytes if llm.kv_memory_plan else llm.kv_layout().bytes(llm.n_ctx(), False)


def format_plan(llm: Llama) -> str:
    """The first line: what the run will hold, and the KV memory against the full cache's."""
    kv = llm.kv_stats()
    full = _full_cache_bytes(llm)
    head = f"chelsea-run: model {Path(llm.model_path).name} ({llm.model_description()}), context {llm.n_ctx()} tokens"
    budget = f" (--kv-mem {llm.kv_memory_plan.budget_bytes / MIB:.0f} MiB)" if llm.kv_memory_plan else ""
    if llm.kv_cluster_options is None:
        fits = f", which fits{budget}" if budget else ""
        return f"{head}, full KV cache: {kv.n_cells} cells, KV {kv.kv_mib:.1f} MiB{fits}"
    return (f"{head}, KV clustering at ratio {llm.kv_cluster_options.ratio:g}{budget}: {kv.n_cells} cells, "
            f"KV {kv.kv_mib:.1f} MiB against {full / MIB:.1f} MiB for the full cache ({kv.buffer_bytes / full:.0%})")


class PromptProgress:
    """Prompt progress on a terminal, one line rewritten per batch: tokens done / total, tokens per second, cells
    held, time left. Prompts of one batch print nothing."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.llm: Llama | None = None
        self.t_start = 0.0

    def __call__(self, done: int, total: int) -> None:
        if done == 0:
            self.t_start = time.perf_counter()
            return
        if self.llm is None or total <= self.llm.n_batch:
            return
        rate = done / max(time.perf_counter() - self.t_start, 1e-9)
        self.out.write(f"\rprompt: {done}/{total} tokens, {rate:.1f} tokens per second, "
                       f"{self.llm.kv_stats().n_cells_used} cells, ETA {(total - done) / rate:.0f} s  ")
        self.out.write("\n" if done >= total else "")
        self.out.flush()


def format_summary(llm: Llama, timings: Timings) -> str:
    kv = llm.kv_stats()
    lines = []
    if llm.kv_cluster_options is not None:
        cs = llm.kv_cluster_stats()
        lines.append(f"kv cluster : {cs['tokens']} tokens in {cs['cells']} cells ({cs['compression']:.2f}x, "
                     f"ratio {llm.kv_cluster_options.ratio:g}), {cs['passes']} passes in {cs['compressions']} "
                     f"compressions, {cs['time_ms']:.2f} ms clustering")
        full = _full_cache_bytes(llm)
        lines.append(f"kv memory  : {kv.kv_mib:8.2f} MiB for a {llm.n_ctx()}-token context, "
                     f"{(full - kv.buffer_bytes) / MIB:.2f} MiB less than the full cache's {full / MIB:.2f} MiB")
        if cs["nonfinite"]:
            lines.append(f"warning    : the KV cache holds NaN/Inf ({cs['nonfinite']} cell-head-layer slices found by "
                         f"clustering): the model's output is not to be trusted")
    lines += [
        f"kv cache   : {kv.kv_mib:8.2f} MiB  (K {kv.type_k} {kv.k_bytes / MIB:.2f} MiB, "
        f"V {kv.type_v} {kv.v_bytes / MIB:.2f} MiB), {kv.n_cells} cells, {kv.n_cells_used} used, "
        f"{kv.tokens} tokens",
        f"compute    : {kv.compute_mib:8.2f} MiB  (activations, attention masks, a batch's logits)",
        f"prompt eval: {timings.prompt_ms:10.2f} ms / {timings.prompt_tokens:5d} tokens "
        f"({timings.prompt_tok_per_s:8.2f} tokens per second)",
        f"eval       : {timings.generation_ms:10.2f} ms / {timings.generated_tokens:5d} tokens "
        f"({timings.generation_tok_per_s:8.2f} tokens per second)",
    ]
    return "\n".join(lines)


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": args.temp, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
            "repeat_penalty": args.repeat_penalty, "seed": args.seed,
            "max_tokens": None if args.n_predict < 0 else args.n_predict}


def run_completion(llm: Llama, prompt: str, args: argparse.Namespace, out: TextIO) -> None:
    n_prompt = len(llm.tokenize(prompt))
    if n_prompt > llm.n_ctx():
        raise ValueError(f"prompt is {n_prompt} tokens, longer than the context (n_ctx={llm.n_ctx()}): "
                         f"give a larger -c")
    if args.display_prompt:
        out.write(prompt)
        out.flush()
    for chunk in llm.create_completion(prompt, stream=True, **_sampling_kwargs(args)):
        out.write(chunk["choices"][0]["text"])
        out.flush()
    out.write("\n")
    out.flush()


def run_chat(llm: Llama, args: argparse.Namespace, inp: TextIO, out: TextIO) -> None:
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = inp.isatty()
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        messages.append({"role": "user", "content": line})
        reply = ""
        for chunk in llm.create_chat_completion(messages, stream=True, **_sampling_kwargs(args)):
            piece = chunk["choices"][0]["delta"].get("content", "")
            reply += piece
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": reply})
        print(format_summary(llm, llm.last_timings), file=sys.stderr)


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """The KV-clustering flags of chelsea-run and chelsea-server: clustering is on unless --no-kv-cluster."""
    g = p.add_argument_group("KV-cache clustering (Chelsea)")
    g.add_argument("--no-kv-cluster", dest="kv_cluster", action="store_false", default=True,
                   help="keep the full KV cache (clustering is on by default)")
    g.add_argument("--kv-cluster", dest="kv_cluster", action="store_true",
                   help="cluster the KV cache online, ~ratio x the KV memory (the default; kept for scripts)")
    for o in OPTIONS:
        if o.flag is not None:
            _add_cluster_flag(g, o)


def _add_cluster_flag(g: Any, o: OptionSpec) -> None:
    """An option's flag, default None (the C library's default): a bool's flag turns it off."""
    assert o.flag is not None
    if o.c_type == "_Bool":
        g.add_argument(o.flag, dest=o.keyword, action="store_const", const=False, default=None, help=o.flag_help)
    else:
        g.add_argument(o.flag, dest=o.keyword, type=float if o.c_type == "float" else int, default=None,
                       metavar="X" if o.c_type == "float" else "N", help=f"{o.doc} (default {o.default})")


def _flag(o: OptionSpec) -> str:
    return o.flag or o.keyword


def cluster_kwargs_of(args: argparse.Namespace) -> dict[str, Any]:
    """The Llama keywords the clustering flags ask for; ValueError naming the flag if one is bad."""
    flagged = [o for o in OPTIONS if o.flag is not None]
    chosen = {o.keyword: getattr(args, o.keyword) for o in flagged if getattr(args, o.keyword) is not None}
    if chosen and not args.kv_cluster:
        raise ValueError(f"{', '.join(_flag(o) for o in flagged if o.keyword in chosen)}: clustering is off")
    if not args.kv_cluster:
        return {}
    options_from_keywords(chosen, label=_flag)
    return {"kv_cluster": True, **chosen}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model and args.model_opt:
        parser.error("give the model once: either positionally or with -m")
    model = args.model_opt or args.model
    try:
        n_ctx = parse_context_size(args.ctx, "--ctx")
    except ValueError as e:
        parser.error(str(e))
    if not args.chat and args.prompt is None and args.file is None:
        parser.error("nothing to do: give a prompt with -p TEXT or -f FILE, or use --chat")
    prompt = args.prompt
    if args.file is not None:
        try:
            prompt = Path(args.file).read_text(encoding="utf-8")
        except OSError as e:
            parser.error(f"-f {args.file}: {e.strerror or e}")
    try:
        cluster_kwargs = cluster_kwargs_of(args)
    except ValueError as e:
        parser.error(str(e))
    if args.kv_mem is not None:
        if not args.kv_cluster:
            parser.error("--kv-mem: a KV memory budget needs clustering, but --no-kv-cluster is given")
        if args.kv_cluster_ratio is not None:
            parser.error("--kv-mem and --kv-ratio both set the ratio: give one of them")
        cluster_kwargs["kv_cluster_memory"] = args.kv_mem
    progress = PromptProgress(sys.stderr) if sys.stderr.isatty() else None
    try:
        llm = Llama(model, n_ctx=n_ctx, n_batch=args.batch_size, n_ubatch=args.ubatch_size,
                    n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, tensor_split=args.tensor_split,
                    rpc_servers=args.rpc, flash_attn=args.flash_attn,
                    type_k=args.cache_type_k, type_v=args.cache_type_v, seed=args.seed, verbose=args.verbose,
                    progress=progress, **cluster_kwargs)
    except (FileNotFoundError, ValueError, ModelFetchError) as e:
        message = str(e)
        for keyword, flag in (("kv_cluster_memory:", "--kv-mem:"), ("rpc_servers:", "--rpc:"),
                              ("tensor_split:", "--tensor-split:")):
            if message.startswith(keyword):
                message = flag + message.removeprefix(keyword)
        print(f"chelsea-run: error: {message}", file=sys.stderr)
        return 1
    if progress is not None:
        progress.llm = llm
    with llm:
        print(format_plan(llm), file=sys.stderr)
        try:
            if args.chat:
                run_chat(llm, args, sys.stdin, sys.stdout)
            else:
                assert prompt is not None
                run_completion(llm, prompt, args, sys.stdout)
                print(format_summary(llm, llm.last_timings), file=sys.stderr)
        except ValueError as e:
            print(f"chelsea-run: error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
