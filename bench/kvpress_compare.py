"""kvpress side by side: the haystack items through NVIDIA kvpress presses on the same GGUF, beside Chelsea.

Needs the optional extra (torch, transformers, kvpress, gguf), best in a venv of its own; the tests never do.

    # 1. system python (chelsea_gguf built): the items, tokenized by llama.cpp, and Chelsea's answers
    python3 bench/kvpress_compare.py --export-tokens /tmp/kvpress_items.json [--quick] [--lengths 1536,2560] [--depths 0.1,0.5]
    python3 bench/kvpress_compare.py --chelsea --tokens /tmp/kvpress_items.json [--ratios 0.25,0.2]
    # 2. the venv with the extra: the same token ids through kvpress
    #    (the compare extra's list; ``pip install -e ".[compare]"`` would also build llama.cpp, not needed here)
    python3 -m venv /work/venv-compare
    /work/venv-compare/bin/pip install torch==2.13.0 "transformers>=5.2,<5.3" kvpress==0.5.5 gguf numpy
    /work/venv-compare/bin/python bench/kvpress_compare.py --tokens /tmp/kvpress_items.json [--presses ...]
    # 3. the table of both (also written at the end of 1 and 2)
    python3 bench/kvpress_compare.py --report [--out bench/results/X.json [--merge bench/results/X_kvzip.json]]

Plain completion on both sides, no chat template (kvpress's own pipeline wraps the prompt in it, where even
the full cache of SmolLM2-135M answers nothing): the context's tokens go through one forward pass inside
``press(model)``, then the question's tokens at their true positions, then greedy decoding; the answer is
scored by ``item.correct``. The item's prompt is tokenized once, by llama.cpp when ``--tokens`` is given, and
split where the context's own tokens end, so both sides see the same ids; the HF tokenizer of the GGUF is
checked against them, token for token (meta: ``tokens_checked``). Chelsea gets the whole prompt (it compresses
online between 256-token chunks, the question included in its recent window); kvpress compresses the context
only, then reads the question uncompressed, as kvpress does.

Scorer presses (all but KVzip) share one prefill (``FanOut``): each layer's inputs are handed to every
press's own ``compress``, exact because a press compresses a layer's cache after that layer's attention ran
(checked: the same answers, token for token, as one ``press(model)`` prefill per press, 11 of 11 on a 1k item;
``--separate-prefill`` runs them that way). KVzip runs its own ``press(model)`` at the largest keep; smaller
keeps re-mask the same reconstruction scores with kvpress's ``compress_post``.

KVzip scores each token by the attention it gets while the model re-reads "repeat the context": its
reconstruction prompt keeps kvpress's chat-template suffix, but the context here has no chat-template prefix,
so the prefix length kvpress assumes is set to 0 (otherwise the first ~30 tokens would go unscored).

Results: bench/results/kvpress_compare.json (kvpress rows), kvpress_compare.chelsea.json (llama.cpp rows),
kvpress_compare.md (one table: retrieved / total overall, per depth band and needle kind, seconds per item).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
ROOT = BENCH.parent
DEFAULT_GGUF = Path.home() / ".cache" / "chelsea-gguf" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct Q4_1"
PRESSES = ("KVzip", "KeyDiff", "Knorm", "StreamingLLM", "SnapKV", "ExpectedAttention", "TOVA")
DEFAULT_PRESSES = "KVzip,KeyDiff,Knorm,StreamingLLM,SnapKV,ExpectedAttention"
N_GEN = 10
LENGTHS = (1024, 2048, 3072, 4096)   # bench/retrieval.py's SmolLM2 lengths: the same item ids as its Chelsea rows
BANDS = ((0.0, 1 / 3, "0-33%"), (1 / 3, 2 / 3, "33-66%"), (2 / 3, 1.0001, "66-100%"))

sys.path.insert(0, str(BENCH))
from provenance import provenance  # noqa: E402  (bench/ is on the path from here on)


# ---------------------------------------------------------------------------------------------- common


def gguf_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    try:
        from chelsea_gguf.models import smollm2_path
        return Path(smollm2_path())
    except Exception:  # noqa: BLE001 - the venv has no built chelsea_gguf: the file where it puts the model
        return DEFAULT_GGUF


def model_name(path: Path) -> str:
    """How the results name the model of `path`: the default's name, else the file's."""
    return MODEL_NAME if path.resolve() == gguf_path(None).resolve() else path.name


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


def parse_lengths(s: str | None) -> list[int] | None:
    return [int(x) for x in s.split(",")] if s else None


def parse_depths(s: str | None) -> list[float] | None:
    return [float(x) for x in s.split(",")] if s else None


def build_items(count_tokens, lengths: list[int] | None, quick: bool, depths: list[float] | None = None) -> list[Any]:
    import haystacks
    kw: dict[str, Any] = {"depths": depths} if depths else {}
    if lengths is None:
        return list(haystacks.build_items(count_tokens, quick=quick, **kw) if _has_default_lengths(haystacks)
                    else haystacks.build_items(count_tokens, LENGTHS, quick=quick, **kw))
    return list(haystacks.build_items(count_tokens, lengths, quick=quick, **kw))


def _has_default_lengths(mod: Any) -> bool:
    import inspect
    p = inspect.signature(mod.build_items).parameters.get("lengths")
    return p is not None and p.default is not inspect.Parameter.empty


def item_fields(item: Any) -> dict[str, Any]:
    return {f.name: getattr(item, f.name) for f in dataclasses.fields(item) if f.init}


def make_item(fields: dict[str, Any]) -> Any:
    """The RetrievalItem back from its fields (for ``correct``)."""
    import haystacks
    cls = haystacks.RetrievalItem
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in fields.items() if k in names})


def split_prompt(prompt_ids: list[int], context_ids: list[int]) -> int:
    """Where the context ends in the prompt's tokens: the longest common prefix with the context's own
    tokens (a token that straddles the boundary goes to the question)."""
    n = 0
    for a, b in zip(prompt_ids, context_ids):
        if a != b:
            break
        n += 1
    return n


def tokenized(items: list[Any], tokenize) -> list[dict[str, Any]]:
    out = []
    for it in items:
        ids = tokenize(it.prompt())
        n = split_prompt(ids, tokenize(it.context))
        out.append({"fields": item_fields(it), "context_ids": ids[:n], "question_ids": ids[n:]})
    return out


def spread(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Round-robin over (length, needle kind, haystack) groups, haystacks in turn, so the first N items (a
    partial run) cover every haystack, kind and length; inside a group depths are striped over the bands, each
    group starting at another depth. (The run of 2026-12-02 took its 13 items in an earlier order, prose
    groups first: 12 prose items and 1 of sentences; its rows name them.)"""
    groups: dict[tuple, list] = defaultdict(list)
    for r in records:
        f = r["fields"]
        groups[(f.get("length"), f.get("needle_kind"), f.get("haystack"))].append(r)
    # consecutive groups differ in haystack (prose, sentences, code, prose, ...), then in needle kind
    by_hay: dict[Any, list] = defaultdict(list)
    for key in groups:
        by_hay[key[2]].append(key)
    lanes = []
    for lane in by_hay.values():     # and inside a haystack, needle kinds in turn
        seen: dict[Any, int] = defaultdict(int)
        rank = {}
        for key in lane:
            rank[key] = seen[key[1]]
            seen[key[1]] += 1
        kinds = list(dict.fromkeys(k[1] for k in lane))
        lanes.append(sorted(lane, key=lambda k: (rank[k], kinds.index(k[1]))))
    keys = [lane[i] for i in range(max(map(len, lanes), default=0)) for lane in lanes if i < len(lane)]
    queues = []
    for g, q in enumerate(groups[k] for k in keys):
        q = sorted(q, key=lambda r: r["fields"].get("depth") or 0)
        striped = sorted(range(len(q)), key=lambda i: (i % 3, i // 3))   # 0,3,6,1,4,7,..: bands in turn
        striped = striped[g % len(q):] + striped[:g % len(q)] if q else striped
        queues.append([q[i] for i in striped])
    out: list[dict[str, Any]] = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def load_tokens(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    return data


# ---------------------------------------------------------------------------- system python: llama.cpp


def export_tokens(args: argparse.Namespace) -> int:
    from chelsea_gguf import Llama
    path = gguf_path(args.gguf)
    llm = Llama(str(path), n_ctx=16, n_threads=1, verbose=False)
    def tok(text: str) -> list[int]:
        return llm.tokenize(text)
    items = build_items(lambda t: len(tok(t)), parse_lengths(args.lengths), args.quick, parse_depths(args.depths))
    records = tokenized(items, tok)
    meta = provenance(" ".join(["python3", "bench/kvpress_compare.py"] + sys.argv[1:]), model=model_name(path),
                      gguf=str(path), tokenizer="llama.cpp (chelsea_gguf.Llama.tokenize, add_bos as the GGUF says)")
    write_json(Path(args.export_tokens), {"meta": meta, "items": records})
    print(f"{args.export_tokens}: {len(records)} items, "
          f"{min(len(r['context_ids']) for r in records)}-{max(len(r['context_ids']) for r in records)} context tokens")
    return 0


# Chelsea's rows by protocol: "compress-then-ask" is kvpress's (the context compressed before the question is
# read); "in-prompt" is a completion call's (context and question one prompt: the compression knows the question)
CHELSEA_LABELS = {"compress-then-ask": "Chelsea", "in-prompt": "Chelsea, question in the prompt"}


def run_chelsea(args: argparse.Namespace) -> int:
    """Full cache and Chelsea at each kept share on llama.cpp, on the exported token ids."""
    from common import FULL, chelsea, new_session, open_method
    data = load_tokens(Path(args.tokens))
    path = gguf_path(args.gguf)
    exported = data["meta"].get("gguf")
    if exported and Path(exported).name != path.name:
        raise SystemExit(f"--tokens {args.tokens}: token ids of {Path(exported).name}, but --gguf is {path.name} "
                         f"(pass --gguf {exported})")
    records = select(spread(data["items"]), args.limit)
    ratios = [float(r) for r in args.ratios.split(",")]
    from scoring_ablation import chelsea_with
    methods = ([] if args.no_full else [FULL]) + [chelsea_with(r, args.config) if args.config else chelsea(r)
                                                  for r in ratios]
    rows: list[dict[str, Any]] = []
    out = Path(args.out).with_name(Path(args.out).stem + ".chelsea.json") if args.out else RESULTS / "kvpress_compare.chelsea.json"
    t_start = time.time()
    meta = provenance(" ".join(["python3", "bench/kvpress_compare.py"] + sys.argv[1:]), model=model_name(path),
                      tokens_file=args.tokens, tokens_meta=data["meta"], threads=args.threads, n_gen=args.max_new_tokens,
                      ratios=ratios, side="llama.cpp (this project)", protocol=args.protocol, n_ctx=args.ctx,
                      config=args.config, reread=args.reread)
    if args.reread and args.protocol != "compress-then-ask":
        raise SystemExit("--reread: only with --protocol compress-then-ask (a re-read ranks a compression made before "
                         "the question is read)")
    settings = ([args.config] if args.config else []) + (["reread"] if args.reread else [])
    label = CHELSEA_LABELS[args.protocol] + (f" ({', '.join(settings)})" if settings else "")
    for rec in records:
        item = make_item(rec["fields"])
        ids = rec["context_ids"] + rec["question_ids"]
        for m in methods:
            n_ctx = args.ctx or len(ids) + args.max_new_tokens + 16
            t0 = time.perf_counter()
            with open_method(m, n_ctx, str(path), n_threads=args.threads) as llm:
                with new_session(llm, m, n_ctx) as s:
                    t1 = time.perf_counter()
                    if args.protocol == "compress-then-ask":
                        # as kvpress: the context alone is read and compressed, then the question is read
                        if args.reread and m.kind != "full":
                            llm.eval(rec["context_ids"])
                            llm.kv_cluster_compress(reread=True)
                            s.n_past = s.n_fed = len(rec["context_ids"])
                        else:
                            s.feed(rec["context_ids"])
                            s.settle()
                        gen = s.greedy(rec["question_ids"], args.max_new_tokens)
                    else:
                        gen = s.greedy(ids, args.max_new_tokens)
                    cells = s.cells_used()
                text = llm.detokenize(gen).decode("utf-8", errors="replace")
            t2 = time.perf_counter()
            rows.append(row_for(rec, "full" if m.kind == "full" else label, m.ratio, item.correct(text), text,
                                {"seconds": round(t2 - t1, 3), "seconds_with_load": round(t2 - t0, 3),
                                 "cells_held": cells, "protocol": args.protocol}))
            print(json.dumps(rows[-1]), flush=True)
        meta["wall_s"] = round(time.time() - t_start, 1)
        write_json(out, {"meta": meta, "rows": rows})
    print(out)
    write_report(out.with_name(out.name.replace(".chelsea.json", ".json")))
    return 0


# ------------------------------------------------------------------------------- venv: kvpress presses


def select(records: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    return records[:limit] if limit else records


def row_for(rec: dict[str, Any], method: str, keep: float, correct: bool, answer: str, extra: dict[str, Any]) -> dict[str, Any]:
    f = rec["fields"]
    return {"method": method, "keep": keep, "item_id": f.get("item_id"), "haystack": f.get("haystack"),
            "needle_kind": f.get("needle_kind"), "depth": f.get("depth"), "length": f.get("length"),
            "n_context": len(rec["context_ids"]), "n_question": len(rec["question_ids"]),
            "correct": bool(correct), "answer": answer, **extra}


class _Tokenizers:
    """Stands in for transformers.AutoTokenizer inside kvzip_press: the model's config names a GGUF's folder,
    which AutoTokenizer.from_pretrained cannot open without gguf_file=."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    def from_pretrained(self, *a: Any, **k: Any) -> Any:
        return self.tok


def _kvzip_class() -> Any:
    import kvpress
    from kvpress.presses import kvzip_press

    class PlainKVzipPress(kvpress.KVzipPress):
        """KVzip on a context with no chat-template prefix (see the module doc); keeps its scores, so that
        another kept share can be masked from the same reconstruction pass (``mask_again``)."""

        def _perform_kvzip_compression(self, model: Any, tokenizer: Any) -> None:
            self.prefix_length = 0
            super()._perform_kvzip_compression(model, tokenizer)

        def compress_post(self, model: Any) -> None:
            self.scores = self.score_val.clone()
            super().compress_post(model)

        def mask_again(self, model: Any, scores: Any) -> None:
            """kvpress's own compress_post at this press's ratio, on the scores of an earlier pass."""
            self.score_val = scores.clone()
            super().compress_post(model)
            self.score_val = None

    return kvzip_press, PlainKVzipPress


def make_press(name: str, keep: float, tok: Any) -> Any:
    import kvpress
    cr = round(1.0 - keep, 6)
    if name == "KVzip":
        kvzip_press, cls = _kvzip_class()
        kvzip_press.AutoTokenizer = _Tokenizers(tok)
        return cls(compression_ratio=cr)
    cls = {"KeyDiff": kvpress.KeyDiffPress, "Knorm": kvpress.KnormPress, "StreamingLLM": kvpress.StreamingLLMPress,
           "SnapKV": kvpress.SnapKVPress, "ExpectedAttention": kvpress.ExpectedAttentionPress,
           "TOVA": kvpress.TOVAPress}[name]
    return cls(compression_ratio=cr)


class FanOut:
    """Every scorer press on one prefill: at each attention layer, after the layer ran on the full cache,
    each press's own ``compress`` (kvpress's code) is given the same inputs its ``forward_hook`` would get and
    its result goes to a cache of its own; the prefill's cache stays full (the full-cache answer). Exact for
    scorer presses: a press compresses layer l's cache after layer l's attention, so the prefill's hidden
    states, and each layer's inputs to compress, do not depend on the press."""

    def __init__(self, presses: dict[tuple[str, float], Any]) -> None:
        from transformers import DynamicCache
        self.presses = presses
        self.caches = {key: DynamicCache() for key in presses}
        self.compress_s = {key: 0.0 for key in presses}

    @contextlib.contextmanager
    def __call__(self, model: Any):
        for p in self.presses.values():
            p.post_init_from_model(model)
        hooks = []
        try:
            for layer in model.model.layers:
                layer.self_attn.rotary_emb = model.model.rotary_emb
                hooks.append(layer.self_attn.register_forward_hook(self.hook, with_kwargs=True))
            yield
        finally:
            for h in hooks:
                h.remove()

    def hook(self, module: Any, inputs: Any, kwargs: dict, output: Any) -> Any:
        from kvpress.utils import extract_keys_and_values
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
        for key, p in self.presses.items():
            t0 = time.perf_counter()
            k, v = p.compress(module, kwargs["hidden_states"], keys, values, output[1], kwargs)
            self.caches[key].update(k, v, module.layer_idx)
            self.compress_s[key] += time.perf_counter() - t0
        return output


def clone_cache(cache: Any) -> Any:
    from transformers import DynamicCache
    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys.clone(), layer.values.clone(), i)
    return out


def prefill(model: Any, press: Any, ctx_ids: list[int]) -> tuple[Any, float]:
    """The context through the model without its head (as kvpress's pipeline does), inside press(model)."""
    import torch
    from transformers import DynamicCache
    cache = DynamicCache()
    t0 = time.perf_counter()
    with torch.no_grad(), (press(model) if press is not None else contextlib.nullcontext()):
        model.model(input_ids=torch.tensor([ctx_ids]), past_key_values=cache)
    return cache, time.perf_counter() - t0


def answer(model: Any, cache: Any, n_ctx: int, q_ids: list[int], n_gen: int, eos: set[int]) -> tuple[list[int], float, float]:
    """The question at its true positions (after n_ctx context tokens, however many the cache kept), then
    greedy decoding, as kvpress's pipeline. Seconds to the first answer token, and in all."""
    import torch
    t0 = time.perf_counter()
    with torch.no_grad():
        pos = torch.arange(n_ctx, n_ctx + len(q_ids)).unsqueeze(0)
        out = model(input_ids=torch.tensor([q_ids]), past_key_values=cache, position_ids=pos, logits_to_keep=1)
        gen = [int(out.logits[0, -1].argmax())]
        t1 = time.perf_counter()
        p = n_ctx + len(q_ids)
        while len(gen) < n_gen and gen[-1] not in eos:
            out = model(input_ids=torch.tensor([[gen[-1]]]), past_key_values=cache, position_ids=torch.tensor([[p]]))
            gen.append(int(out.logits[0, -1].argmax()))
            p += 1
    if gen[-1] in eos:
        gen = gen[:-1]
    return gen, t1 - t0, time.perf_counter() - t0


def answer_item(model: Any, tok: Any, rec: dict[str, Any], configs: list[tuple[str, float]], n_gen: int,
                eos: set[int], separate: bool) -> list[tuple[str, float, list[int], dict[str, Any]]]:
    """Every (press, keep) of `configs` on one item: (name, keep, answer ids, timing). cache_len: the context's
    entries kept (KVzip masks instead of removing: the unmasked count). Seconds: prefill_s is
    the context's pass with the press (for presses sharing one pass, that pass plus this press's compress),
    prompt_s adds the question to the first answer token, seconds the whole answer."""
    ctx, q = rec["context_ids"], rec["question_ids"]
    n = len(ctx)
    out = []

    def timing(pre: float, first: float, total: float, cache_len: int, **extra: Any) -> dict[str, Any]:
        return {"prefill_s": round(pre, 3), "prompt_s": round(pre + first, 3), "seconds": round(pre + total, 3),
                "cache_len": cache_len, **extra}

    scorer = [(nm, k) for nm, k in configs if nm not in ("full", "KVzip")]
    if separate:
        for nm, k in configs:
            if nm == "KVzip":
                continue
            cache, pre = prefill(model, None if nm == "full" else make_press(nm, k, tok), ctx)
            kept = cache.get_seq_length()
            gen, first, total = answer(model, cache, n, q, n_gen, eos)
            out.append((nm, k, gen, timing(pre, first, total, kept, prefill="own")))
    else:
        fan = FanOut({key: make_press(*key, tok) for key in scorer})
        cache, pre_all = prefill(model, fan, ctx)
        # the shared pass without the presses' compress calls is the full cache's prefill; each press's
        # prefill is that plus its own compress calls
        plain = pre_all - sum(fan.compress_s.values())
        full_len = cache.get_seq_length()
        gen, first, total = answer(model, cache, n, q, n_gen, eos)
        if ("full", 1.0) in configs:
            out.append(("full", 1.0, gen, timing(plain, first, total, full_len, prefill="shared")))
        for key in scorer:
            c = fan.caches[key]
            kept = c.get_seq_length()
            gen, first, total = answer(model, c, n, q, n_gen, eos)
            out.append((*key, gen, timing(plain + fan.compress_s[key], first, total, kept,
                                          prefill="shared", compress_s=round(fan.compress_s[key], 3))))
    kvzip = sorted([k for nm, k in configs if nm == "KVzip"], reverse=True)
    if kvzip:
        # one reconstruction pass (kvpress's KVzip at the first keep); the other keeps re-mask its scores
        press = make_press("KVzip", kvzip[0], tok)
        cache, pre = prefill(model, press, ctx)
        scores = press.scores
        spare = clone_cache(cache) if len(kvzip) > 1 else None
        gen, first, total = answer(model, cache, n, q, n_gen, eos)
        out.append(("KVzip", kvzip[0], gen, timing(pre, first, total, int(round(n * kvzip[0])), prefill="own")))
        for k in kvzip[1:]:
            t0 = time.perf_counter()
            again = make_press("KVzip", k, tok)
            again.mask_again(model, scores)
            c = clone_cache(spare)
            remask = time.perf_counter() - t0
            gen, first, total = answer(model, c, n, q, n_gen, eos)
            out.append(("KVzip", k, gen, timing(pre + remask, first, total, int(round(n * k)),
                                                prefill="reconstruction pass of KVzip keep %g, re-masked" % kvzip[0])))
    order = {c: i for i, c in enumerate(configs)}
    return sorted(out, key=lambda r: order[(r[0], r[1])])


def run_kvpress(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers
    import kvpress
    from transformers import AutoModelForCausalLM, AutoTokenizer
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    import logging
    logging.getLogger("kvpress").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)

    path = gguf_path(args.gguf)
    t_load = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.eval()
    load_s = time.perf_counter() - t_load

    def hf_tokenize(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    if args.tokens:
        data = load_tokens(Path(args.tokens))
        records, tok_meta = data["items"], data["meta"]
        tokenizer_used = tok_meta.get("tokenizer", "llama.cpp")
    else:
        items = build_items(lambda t: len(hf_tokenize(t)), parse_lengths(args.lengths), args.quick,
                            parse_depths(args.depths))
        records, tok_meta = tokenized(items, hf_tokenize), None
        tokenizer_used = "HF tokenizer of the GGUF (no --tokens file: llama.cpp not consulted)"
    # the same ids token for token: the HF tokenizer of the GGUF against the ids fed (llama.cpp's when --tokens),
    # on every item of the file
    mismatched = [r["fields"].get("item_id") for r in records
                  if hf_tokenize(make_item(r["fields"]).prompt()) != r["context_ids"] + r["question_ids"]]
    checked = {"items": len(records), "identical": len(records) - len(mismatched), "mismatched": mismatched[:20],
               "against": tokenizer_used}
    print(f"tokens: HF tokenizer vs {tokenizer_used}: {checked['identical']}/{len(records)} identical", flush=True)
    records = select(spread(records), args.limit)

    keeps = [float(r) for r in args.ratios.split(",")]
    names = [p.strip() for p in args.presses.split(",") if p.strip()]
    for nm in names:
        if nm not in PRESSES:
            raise SystemExit(f"--presses: unknown {nm!r} (known: {', '.join(PRESSES)})")
    configs: list[tuple[str, float]] = [("full", 1.0)] + [(nm, k) for k in keeps for nm in names]
    eos_ids = model.generation_config.eos_token_id
    eos = set(eos_ids if isinstance(eos_ids, list) else [eos_ids])

    out = Path(args.out) if args.out else RESULTS / "kvpress_compare.json"
    meta = provenance(" ".join(["python", "bench/kvpress_compare.py"] + sys.argv[1:]), model=MODEL_NAME,
                      gguf=str(path), side="kvpress (transformers, weights dequantized from the GGUF to float32, sdpa)",
                      torch=torch.__version__, transformers=transformers.__version__,
                      kvpress=getattr(kvpress, "__version__", None) or _dist_version("kvpress"),
                      threads=torch.get_num_threads(), n_gen=args.max_new_tokens, keeps=keeps, presses=names,
                      load_s=round(load_s, 1), tokens_file=args.tokens, tokens_meta=tok_meta, tokens_checked=checked,
                      mode="plain completion (no chat template): context prefilled inside press(model), "
                           "question at its true positions, greedy")
    rows: list[dict[str, Any]] = []
    t_start = time.time()
    done = 0
    for rec in records:
        if args.time_budget and time.time() - t_start > args.time_budget:
            print(f"time budget {args.time_budget} s reached after {done} items", flush=True)
            break
        item = make_item(rec["fields"])
        for name, keep, gen, timing in answer_item(model, tok, rec, configs, args.max_new_tokens, eos,
                                                   args.separate_prefill):
            text = tok.decode(gen, skip_special_tokens=True)
            rows.append(row_for(rec, name, keep, item.correct(text), text, timing))
            print(json.dumps(rows[-1]), flush=True)
        done += 1
        meta.update(items_done=done, items_selected=len(records), wall_s=round(time.time() - t_start, 1))
        write_json(out, {"meta": meta, "rows": rows})
    print(out)
    write_report(out)
    return 0


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------ report


def band(depth: float | None) -> str:
    if depth is None:
        return "-"
    d = depth / 100 if depth > 1 else depth
    for lo, hi, name in BANDS:
        if lo <= d < hi:
            return name
    return BANDS[-1][2]


def summarize(rows: list[dict[str, Any]], side: str, common_ids: set[str] | None) -> list[dict[str, Any]]:
    by: dict[tuple, list] = defaultdict(list)
    for r in rows:
        if common_ids is not None and r["item_id"] not in common_ids:
            continue
        by[(r["method"], r["keep"])].append(r)
    key_t = "prompt_s" if side == "kvpress" else "seconds"
    # against the full cache on the same items (a press run on fewer items is set against those)
    full_t = {r["item_id"]: r[key_t] for r in by.get(("full", 1.0), [])}
    out = []
    for (method, keep), rs in by.items():
        s: dict[str, Any] = {"side": side, "method": method, "keep": keep, "n": len(rs),
                             "correct": sum(r["correct"] for r in rs)}
        for _, _, bname in BANDS:
            b = [r for r in rs if band(r["depth"]) == bname]
            s[bname] = (sum(r["correct"] for r in b), len(b))
        kinds: dict[str, list] = defaultdict(list)
        for r in rs:
            kinds[str(r["needle_kind"])].append(r["correct"])
        s["kinds"] = {k: (sum(v), len(v)) for k, v in kinds.items()}
        hays: dict[str, list] = defaultdict(list)
        for r in rs:
            hays[str(r["haystack"])].append(r["correct"])
        s["hays"] = {k: (sum(v), len(v)) for k, v in hays.items()}
        s["seconds"] = sum(r["seconds"] for r in rs) / len(rs)
        s["prompt_s"] = sum(r[key_t] for r in rs) / len(rs)
        paired = [(r[key_t], full_t[r["item_id"]]) for r in rs if r["item_id"] in full_t]
        s["prompt_vs_full"] = sum(a for a, _ in paired) / sum(b for _, b in paired) if paired else None
        out.append(s)
    return out


def retrieval_rows(path: Path) -> dict[str, Any] | None:
    """The full cache's and Chelsea's (default options, f16) rows of bench/retrieval.py's recorded run, in
    this script's row names; the same item ids are the same prompts, tokenized by llama.cpp."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    rows = []
    for r in data.get("rows", []):
        if r.get("type_kv") or r.get("haystack") == "chat":
            continue
        if r.get("kind") == "full":
            name, keep = "full", 1.0
        elif r.get("kind") == "chelsea" and r.get("method") == f"chelsea R={r.get('ratio'):g}":
            name, keep = "Chelsea", r["ratio"]
        else:
            continue
        rows.append({**r, "method": name, "keep": keep})
    meta = {**data.get("meta", {}), "source": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)}
    return {"meta": meta, "rows": rows} if rows else None


def write_report(kv_path: Path = RESULTS / "kvpress_compare.json", merge: list[Path] | None = None,
                 title: str = "kvpress side by side") -> Path:
    """The table of both sides: kv_path (kvpress rows, with those of `merge` that it lacks: another run's
    presses on the same items) and the Chelsea rows beside it."""
    ch_path = kv_path.with_name(kv_path.stem + ".chelsea.json")
    kv = json.loads(kv_path.read_text()) if kv_path.exists() else None
    merged = [(p, json.loads(p.read_text())) for p in merge or [] if p.exists()]
    if kv:
        have = {(r["method"], r["keep"], r["item_id"]) for r in kv["rows"]}
        for _, other in merged:
            new = [r for r in other["rows"] if (r["method"], r["keep"], r["item_id"]) not in have]
            have |= {(r["method"], r["keep"], r["item_id"]) for r in new}
            kv["rows"] += new
    ch = json.loads(ch_path.read_text()) if ch_path.exists() else None
    if ch is None:
        ch = retrieval_rows(kv_path.parent / "retrieval.json")
    common: set[str] | None = None
    if kv and ch:
        common = {r["item_id"] for r in kv["rows"]} & {r["item_id"] for r in ch["rows"]}
    summaries = (summarize(ch["rows"], "llama.cpp", common) if ch else []) + (summarize(kv["rows"], "kvpress", common) if kv else [])
    order = {m: i for i, m in enumerate(["full", "Chelsea", *PRESSES])}
    summaries.sort(key=lambda s: (-s["keep"], order.get(s["method"], 99), s["side"]))
    kinds = sorted({k for s in summaries for k in s["kinds"]})
    hays = sorted({k for s in summaries for k in s["hays"]})
    model = ((kv or ch or {}).get("meta") or {}).get("model") or MODEL_NAME
    lines = [f"# {title} ({model}, plain completion, same token ids)", ""]
    if kv:
        m = kv["meta"]
        tc = m.get("tokens_checked", {})
        lines += [f"kvpress side: torch {m.get('torch')}, transformers {m.get('transformers')}, kvpress {m.get('kvpress')}, "
                  f"{m.get('threads')} thread(s), {m.get('cpu')}; commit {m.get('commit')}, {m.get('date')}; "
                  f"{m.get('items_done')} of {m.get('items_selected')} items in {m.get('wall_s')} s.",
                  f"Token ids: {tc.get('against')}; the HF tokenizer of the GGUF gives the same ids on "
                  f"{tc.get('identical')} of {tc.get('items')} items"
                  + (f" (where not, it splits digits after spaces or newlines differently: {', '.join(tc['mismatched'][:4])}"
                     f"{', ...' if len(tc['mismatched']) > 4 else ''}); both sides are fed llama.cpp's ids." if tc.get("mismatched")
                     else ".")]
        lines += [f"Merged from {p.name}: {', '.join(o['meta'].get('presses', []))}, {o['meta'].get('items_done')} of "
                  f"{o['meta'].get('items_selected')} items in {o['meta'].get('wall_s')} s, {o['meta'].get('date')}."
                  for p, o in merged]
    if ch:
        m = ch["meta"]
        lines += [f"llama.cpp side ({m.get('source', 'kvpress_compare.chelsea.json')}): commit {m.get('commit')}, "
                  f"{m.get('threads')} thread(s), {m.get('date')}."]
    if common is not None:
        lines += [f"Both sides counted on the {len(common)} items each of them answered."]
    lines += ["", "Prompt s: context prefill + compression + question, to the first answer token (llama.cpp: the "
                  "whole answer, as Chelsea compresses inside the prompt); vs full: against the full cache on the "
                  "same side; total s: with ~10 decoded tokens. Scorer presses share one prefill (their own compress "
                  "time added); KVzip's smaller keep re-masks the scores of its larger keep's reconstruction pass, "
                  "whose time it is given.", ""]
    head = ["keep", "method", "side", "retrieved", *[b[2] for b in BANDS], *kinds, *hays, "prompt s", "vs full", "total s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        def frac(t: tuple[int, int]) -> str:
            return f"{t[0]}/{t[1]}" if t[1] else "-"
        cells = [f"{s['keep']:.0%}" if s["method"] != "full" else "100%", s["method"], s["side"],
                 f"{s['correct']}/{s['n']}", *[frac(s[b[2]]) for b in BANDS],
                 *[frac(s["kinds"].get(k, (0, 0))) for k in kinds],
                 *[frac(s["hays"].get(k, (0, 0))) for k in hays], f"{s['prompt_s']:.2f}",
                 f"{s['prompt_vs_full']:.2f}x" if s["prompt_vs_full"] else "-", f"{s['seconds']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    path = kv_path.with_suffix(".md")
    path.write_text("\n".join(lines) + "\n")
    print(path)
    return path


# -------------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help=f"the GGUF (default: chelsea_gguf.models.smollm2_path(), else {DEFAULT_GGUF})")
    ap.add_argument("--export-tokens", metavar="FILE", help="system python: write the items and llama.cpp's token ids")
    ap.add_argument("--tokens", metavar="FILE", help="read items and token ids written by --export-tokens")
    ap.add_argument("--chelsea", action="store_true", help="system python: full cache and Chelsea on llama.cpp")
    ap.add_argument("--report", action="store_true",
                    help="only rewrite the table (--out's .md, default kvpress_compare.md) from the JSON results")
    ap.add_argument("--merge", metavar="FILES", help="with --report: comma-separated JSON of other kvpress runs on "
                                                     "the same items, their rows that --out lacks added (e.g. KVzip)")
    ap.add_argument("--ratios", default="0.25,0.2", help="kept shares (kvpress compression_ratio = 1 - keep)")
    ap.add_argument("--presses", default=DEFAULT_PRESSES, help=f"comma-separated, of {', '.join(PRESSES)}")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--limit", type=int, help="the first N items (spread over lengths and needle kinds)")
    ap.add_argument("--lengths", help="comma-separated context lengths in tokens (haystacks.build_items)")
    ap.add_argument("--depths", help="comma-separated needle depths, 0-1 (haystacks.build_items; default its DEPTHS); "
                                     "scoring_ablation.py's 63 items: --lengths 1024,1536,2048 "
                                     "--depths 0.05,0.15,0.3,0.45,0.6,0.75,0.9")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--protocol", choices=sorted(CHELSEA_LABELS), default="compress-then-ask",
                    help="--chelsea: compress the context before the question is read (as kvpress), or feed both as "
                         "one prompt")
    ap.add_argument("--reread", action="store_true",
                    help="--chelsea, compress-then-ask: compress the context with kv_cluster_compress(reread=True)")
    ap.add_argument("--config", help="--chelsea: clustering options as scoring_ablation.py takes them (attn=0,...)")
    ap.add_argument("--no-full", action="store_true", help="--chelsea: leave out the full cache (already run)")
    ap.add_argument("--ctx", type=int, help="--chelsea: one logical context size for every item (e.g. 16384: the "
                    "context is read whole before it is compressed, as kvpress does), instead of one sized to each")
    ap.add_argument("--max-new-tokens", type=int, default=N_GEN)
    ap.add_argument("--separate-prefill", action="store_true",
                    help="a prefill per scorer press inside its own press(model), as kvpress's pipeline (slower)")
    ap.add_argument("--time-budget", type=float, help="start no new item after this many seconds")
    ap.add_argument("--out", help="kvpress rows to this JSON (default bench/results/kvpress_compare.json)")
    args = ap.parse_args()
    if args.report:
        write_report(Path(args.out) if args.out else RESULTS / "kvpress_compare.json",
                     [Path(p) for p in args.merge.split(",")] if args.merge else None)
        return 0
    if args.export_tokens:
        return export_tokens(args)
    if args.chelsea:
        if not args.tokens:
            raise SystemExit("--chelsea needs --tokens FILE (from --export-tokens)")
        return run_chelsea(args)
    return run_kvpress(args)


if __name__ == "__main__":
    sys.exit(main())
