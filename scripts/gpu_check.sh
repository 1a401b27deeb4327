#!/usr/bin/env bash
# chelsea-gguf: the GPU check of the Chelsea ops and of clustering with the KV cache on the GPU (issue 4).
#
# The GPU machine (the `device` tool: one H200) reaches no network and takes at most 64 MiB of working tree
# per call, so the inputs travel prepared, in parts, and the work runs in phases while the machine stays warm
# (it keeps files for ~30 s between calls: issue the calls back to back).
#
#   here (no GPU):   bash scripts/gpu_check.sh prepare      # lays out .device/ (git-ignored), prints the plan
#   on the device:   bash scripts/gpu_check.sh stage        # carry one .device/partN per call: parked in /tmp
#                    bash scripts/gpu_check.sh build        # carry .device/src: CUDA build (sm_90), ~5-8 min
#                    bash scripts/gpu_check.sh test         # test-backend-ops for our ops and FLASH_ATTN_EXT
#                    bash scripts/gpu_check.sh bench        # passkey with -ngl 99 + decode 8k/32k, full vs clustered
#                    bash scripts/gpu_check.sh all          # build + test + bench in one call (if time allows)
#
# Device time is short (15 min a task, 10 min a call): a from-scratch ggml-cuda build for sm_90 on its 16 cores is
# the long part, so run `build` alone first (timeout_s ~590; a second `build` resumes where it stopped), then
# `test` and `bench` in the same warm lease.
#
# Results go to $OUT (what the device tool brings back, at most 8 files: gpu.log, build.log, tbo.log and
# gpu_check_<gpu>.{md,json}) and to bench/results/gpu_check_<gpu>.{md,json}.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PHASE="${1:-all}"
STAGE=/tmp/chelsea-gpu                # parked parts (outside the working tree, which each call replaces)
BUILD="$ROOT/build-gpu"               # ignored build dir: kept between calls on a warm machine
OUT="${OUT:-$ROOT/bench/results}"
MODEL_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PART_MB=40                            # parts of the model, each travels in its own call

log() { echo "== gpu_check: $*"; }

gpu_name() {
    nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_' || echo unknown
}

case "$PHASE" in
prepare)
    # 1. the patched llama.cpp tree, laid out from the pinned sdist and ggml_patches/ as the build does (the
    #    device cannot fetch the sdist), then trimmed to what a CUDA build with test-backend-ops needs
    src=/tmp/chelsea-gpu-tree
    python3 cmake/llama_cpp_source.py --dest "$src" --patches "$ROOT/ggml_patches" || exit 1
    rm -rf .device && mkdir -p .device/src
    grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
    mkdir -p .device/src/llama.cpp
    tar -C "$src" -cf - \
        --exclude='./docs' --exclude='./models' --exclude='./tools' --exclude='./examples' --exclude='./media' \
        --exclude='./benches' --exclude='./gguf-py' --exclude='./.github' \
        --exclude='./ggml/src/ggml-vulkan' --exclude='./ggml/src/ggml-sycl' --exclude='./ggml/src/ggml-cann' \
        --exclude='./ggml/src/ggml-opencl' --exclude='./ggml/src/ggml-musa' --exclude='./ggml/src/ggml-hip' \
        --exclude='./ggml/src/ggml-webgpu' --exclude='./ggml/src/ggml-zdnn' --exclude='./ggml/src/ggml-hexagon' \
        --exclude='./ggml/src/ggml-openvino' --exclude='./ggml/src/ggml-virtgpu' --exclude='./ggml/src/ggml-zendnn' \
        . | tar -C .device/src/llama.cpp -xf - || exit 1
    # the tests' CMakeLists.txt names vocab files as arguments only; tools/ and examples/ are off
    mkdir -p .device/src/llama.cpp/tools .device/src/llama.cpp/examples
    # 2. cffi for the Python side (the device's Python is 3.12 and has no cffi)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .device/src/wheels cffi pycparser \
        || log "could not fetch cffi wheels: the Python checks (passkey, bench) will be skipped there"
    # 3. the model, in parts
    model="${CHELSEA_GPU_MODEL:-$HOME/.cache/chelsea-gguf/models/$MODEL_NAME}"
    if [ -f "$model" ]; then
        split -b "${PART_MB}M" -d "$model" .device/model.
        i=1
        for f in .device/model.*; do mkdir -p ".device/part$i" && mv "$f" ".device/part$i/"; i=$((i + 1)); done
    else
        log "no $model: the passkey and decode checks will be skipped"
    fi
    du -sh .device/src .device/part* 2>/dev/null
    cat <<EOF
-- plan (device tool, calls back to back so the machine stays warm):
   run carry=[".device/part1"] "bash scripts/gpu_check.sh stage"      (and so on for each partN)
   run carry=[".device/src"]   "bash scripts/gpu_check.sh build"      (timeout_s 590; again if it stops)
   run carry=[".device/src"]   "bash scripts/gpu_check.sh test"
   run carry=[".device/src"]   "bash scripts/gpu_check.sh bench"      (needs every part staged)
EOF
    ;;

stage)
    mkdir -p "$STAGE"
    found=0
    for d in .device/part* .device/src; do
        [ -d "$d" ] || continue
        cp -a "$d/." "$STAGE/" && found=1 && log "parked $d in $STAGE"
    done
    [ "$found" = 1 ] || { log "nothing carried under .device/"; exit 1; }
    ls -la "$STAGE" | head -20
    ;;

build|test|bench|all)
    mkdir -p "$OUT"
    GPU="$(gpu_name)"
    log "GPU: $GPU"; nvidia-smi 2>&1 | head -15 | tee "$OUT/gpu.log"
    SRC=.device/src
    [ -d "$SRC/llama.cpp" ] || SRC="$STAGE"
    PY="${PYTHON:-python3}"
    SITE=/tmp/chelsea-site
    INST=/tmp/chelsea-inst

    if [ "$PHASE" = build ] || [ "$PHASE" = all ]; then
        [ -d "$SRC/llama.cpp" ] || { log "no patched llama.cpp tree (carry .device/src)"; exit 1; }
        # the Python build needs cffi at build time; the same build gives test-backend-ops (CHELSEA_BUILD_TESTS)
        if ls "$SRC"/wheels/*.whl >/dev/null 2>&1; then
            $PY -m pip install -q --no-index --no-deps --target "$SITE" "$SRC"/wheels/*.whl
        fi
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        t0=$(date +%s)
        cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCHELSEA_CUDA=ON -DCHELSEA_BUILD_TESTS=ON \
            -DCMAKE_CUDA_ARCHITECTURES=90 -DCHELSEA_LLAMA_CPP_TREE="$(cd "$SRC/llama.cpp" && pwd)" \
            -DPython_EXECUTABLE="$(command -v $PY)" 2>&1 | tail -5 | tee "$OUT/build.log"
        cmake --build "$BUILD" -j"$(nproc)" --target _chelsea_native ggml-cuda test-backend-ops 2>&1 \
            | grep -E "error|FAILED|Linking" | tail -40 | tee -a "$OUT/build.log"
        rc=${PIPESTATUS[0]}
        log "build rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build.log"
        [ "$rc" = 0 ] || exit "$rc"
        # the package as pip would lay it out: libraries in chelsea_gguf/lib, test-backend-ops in chelsea_gguf/bin
        cmake --install "$BUILD" --prefix "$INST" > /dev/null && cp chelsea_gguf/*.py "$INST/chelsea_gguf/" || exit 1
    fi

    TBO="$INST/chelsea_gguf/bin/test-backend-ops"
    if [ "$PHASE" = test ] || [ "$PHASE" = all ]; then
        [ -x "$TBO" ] || { log "no $TBO (run the build phase first)"; exit 1; }
        fails=0
        : > "$OUT/tbo.log"
        # FLASH_ATTN_EXT: our per-head-mask cases (their vars have 'hidden'), then a share of upstream's own
        # (GQA 4, head sizes 64/128: the kernels and kernel selection that ggml_patches/0008 touches)
        for run in "CHELSEA_MATCH:" "CHELSEA_PLAN:" "CHELSEA_MERGE:" "FLASH_ATTN_EXT:hidden" \
                   "FLASH_ATTN_EXT:hsk=(64|128),hsv=(64|128),nh=4,nr23=\[4,1\]"; do
            op="${run%%:*}"; params="${run#*:}"
            "$TBO" test -b CUDA0 -o "$op" ${params:+-p "$params"} > /tmp/tbo.log 2>&1
            rc=$?
            { echo "### test-backend-ops test -b CUDA0 -o $op ${params:+-p '$params'}: rc=$rc"; cat /tmp/tbo.log; } >> "$OUT/tbo.log"
            log "test-backend-ops -o $op ${params:+-p '$params'}: rc=$rc, $(grep -c ' OK' /tmp/tbo.log) OK, $(grep -c 'FAIL' /tmp/tbo.log) FAIL"
            grep -E "FAIL|not supported" /tmp/tbo.log | head -20
            tail -3 /tmp/tbo.log
            [ "$rc" = 0 ] || fails=$((fails + 1))
        done
        log "test-backend-ops: $fails op group(s) failed"
    fi

    if [ "$PHASE" = bench ] || [ "$PHASE" = all ]; then
        export PYTHONPATH="$INST:$SITE${PYTHONPATH:+:$PYTHONPATH}"
        model="$STAGE/$MODEL_NAME"
        if [ ! -f "$model" ] && ls "$STAGE"/model.* >/dev/null 2>&1; then
            cat "$STAGE"/model.* > "$model"
        fi
        if [ ! -f "$model" ] || [ "$(sha256sum "$model" | cut -d' ' -f1)" != "$MODEL_SHA256" ]; then
            log "model missing or incomplete (stage every .device/partN first): passkey and decode skipped"
            exit 2
        fi
        [ -f "$INST/chelsea_gguf/__init__.py" ] || { log "no installed package in $INST (run the build phase first)"; exit 1; }
        cd /tmp # import the installed package, not the source folder
        GPU="$GPU" MODEL="$model" OUTDIR="$OUT" $PY - <<'EOF'
import json, os, time
from pathlib import Path
from chelsea_gguf import Llama
from chelsea_gguf.passkey import passkey_prompt
from chelsea_gguf.sampling import SamplingParams

gpu, model, out = os.environ["GPU"], os.environ["MODEL"], Path(os.environ["OUTDIR"])
rows = {"gpu": gpu, "passkey": [], "decode": []}

def cfg(kind):
    return {} if kind == "full" else {"kv_cluster": True, "kv_cluster_ratio": 0.2}

# passkey with the KV cache on the GPU, clustering on, flash attention off and on (the per-head bias mask)
for fa in (False, True):
    for kind in ("full", "chelsea R=0.2"):
        ok = 0
        with Llama(model, n_ctx=8192, n_gpu_layers=99, flash_attn=fa, verbose=False, **cfg(kind)) as llm:
            for depth in (0.1, 0.5, 0.9):
                p = passkey_prompt(300, depth, seed=int(depth * 100))
                ans = llm.create_completion(p.prompt, max_tokens=12, temperature=0.0)["choices"][0]["text"]
                ok += p.retrieved(ans)
            stats = llm.kv_cluster_stats() if kind != "full" else {}
        r = {"config": kind, "flash_attn": fa, "retrieved": ok, "of": 3, "compression": stats.get("compression")}
        rows["passkey"].append(r); print(json.dumps(r), flush=True)

# decode speed at depth 8k and 32k, full vs clustered, everything on the GPU
import pydoc_data.topics as topics
text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
for depth in (8192, 32768):
    for kind in ("full", "chelsea R=0.2"):
        with Llama(model, n_ctx=depth + 512, n_batch=2048, n_gpu_layers=99, flash_attn=True, verbose=False,
                   **cfg(kind)) as llm:
            doc = llm.tokenize(text)
            doc = (doc * (depth // len(doc) + 1))[:depth]
            t0 = time.time()
            n = sum(1 for _ in llm.generate_tokens(doc, SamplingParams(temperature=0.0), 128))
            t = llm.last_timings
            r = {"config": kind, "depth": depth, "decode_tok_s": t.generation_tok_per_s,
                 "prompt_tok_s": t.prompt_tokens / (t.prompt_ms / 1000) if t.prompt_ms else None,
                 "kv_mib": llm.kv_stats().kv_mib, "generated": n, "wall_s": round(time.time() - t0, 2)}
            if kind != "full":
                cs = llm.kv_cluster_stats()
                r.update(compression=cs["compression"], cluster_ms=cs["time_ms"], passes=cs["passes"])
        rows["decode"].append(r); print(json.dumps(r), flush=True)

full = {r["depth"]: r for r in rows["decode"] if r["config"] == "full"}
lines = [f"# GPU check on {gpu}", "", f"Model {Path(model).name}, `bash scripts/gpu_check.sh`, "
         f"{time.strftime('%Y-%m-%d')}.", "", "## Passkey (3 depths, 8k context, -ngl 99)", "",
         "| config | flash attn | retrieved | compression |", "|---|---|---:|---:|"]
lines += [f"| {r['config']} | {r['flash_attn']} | {r['retrieved']}/3 | {r['compression'] or '-'} |" for r in rows["passkey"]]
lines += ["", "## Decode (128 tokens after the prompt, flash attention, -ngl 99)", "",
          "| config | depth | decode tok/s | speedup | KV MiB |", "|---|---:|---:|---:|---:|"]
lines += [f"| {r['config']} | {r['depth']} | {r['decode_tok_s']:.1f} | "
          f"{r['decode_tok_s'] / full[r['depth']]['decode_tok_s']:.2f}x | {r['kv_mib']:.1f} |" for r in rows["decode"]]
stem = f"gpu_check_{gpu}"
(out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
(out / f"{stem}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
        rc=$?
        # the results belong in the repo too (bench/results), the GPU named in the file name
        [ "$OUT" != "$ROOT/bench/results" ] && cp "$OUT"/gpu_check_* "$ROOT/bench/results/" 2>/dev/null
        exit "$rc"
    fi
    ;;

*)
    echo "usage: $0 prepare|stage|build|test|bench|all"; exit 2 ;;
esac
