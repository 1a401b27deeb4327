#!/usr/bin/env bash
# chelsea-gguf: the GPU check of the Chelsea ops and of clustering with the KV cache on the GPU (issue 4).
#
# What it checks on an NVIDIA GPU: test-backend-ops for CHELSEA_MATCH/PLAN/MERGE and for flash attention with
# the per-head log(size) bias (CUDA against the CPU), passkey retrieval with -ngl 99 and clustering on (flash
# attention off and on), and decode speed at 8k and 32k depth, full cache vs clustered, everything on the GPU.
# Results: bench/results/gpu_check_<GPU>.{json,md} (and $OUT, where the device tool picks files up).
#
# On a machine with a GPU and a network, build with CUDA and run the checks against the installed package:
#     CMAKE_ARGS="-DCHELSEA_CUDA=ON -DCHELSEA_BUILD_TESTS=ON" bash scripts/install.sh
#     bash scripts/gpu_check.sh run --installed
#
# This workplace's GPU machine (the `device` tool: one H200, no network, 64 MiB of working tree per call,
# 15 minutes of device time a task) cannot afford a from-scratch ggml-cuda build (~2.5 CPU-hours of nvcc), so
# the build is started here, on the CPU machine, and finished there:
#   here:       cmake -S . -B build-cuda -G Ninja -DCHELSEA_CUDA=ON -DCHELSEA_BUILD_TESTS=ON \
#                   -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release
#               ninja -C build-cuda <as many objects as time allows>
#               bash scripts/gpu_check.sh pack        # .device/{part1,part2,build} (git-ignored)
#   device:     run carry=[".device/part1"] "bash scripts/gpu_check.sh stage"    (back to back: the machine
#               run carry=[".device/part2"] "bash scripts/gpu_check.sh stage"     keeps /tmp only while warm)
#               run carry=[".device/build"] "bash scripts/gpu_check.sh run"      (finishes the build: the objects
#                   not built here are compiled with the recorded commands on all cores, then linked)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PHASE="${1:-run}"
MODE="${2:-}"
STAGE=/tmp/chelsea-gpu                # staged parts: outside the working tree, which each call replaces
BUILD_HERE="${CHELSEA_GPU_BUILD:-build-cuda}"
OUTDIR="${OUT:-$ROOT/bench/results}"
MODEL_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
# the absolute path the build was configured at: the recorded commands name it
BUILT_AT=/work/main

log() { echo "== gpu_check: $*"; }

case "$PHASE" in
pack)
    [ -f "$BUILD_HERE/CMakeCache.txt" ] || { log "no $BUILD_HERE: configure and build it first (see the top of this file)"; exit 1; }
    grep -q "^CHELSEA_CUDA:BOOL=ON" "$BUILD_HERE/CMakeCache.txt" || { log "$BUILD_HERE is not a CHELSEA_CUDA=ON build"; exit 1; }
    [ "$ROOT" = "$BUILT_AT" ] || log "warning: the build's commands name $ROOT; the device run links $BUILT_AT to the tree"
    rm -rf .device && mkdir -p .device/build
    grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
    # what the build reads besides the working tree: the patched llama.cpp sources it laid out and its own
    # outputs so far (paths relative to the tree), and the cuBLAS headers its -I names (an absolute path).
    # When everything is compiled and linked here (scripts/gpu_finish_build.py run here links
    # test-backend-ops), the libraries alone travel
    linked=1
    for f in bin/libggml-cuda.so bin/libggml.so bin/libllama.so bin/test-backend-ops; do
        [ -f "$BUILD_HERE/$f" ] || linked=0
    done
    ls "$BUILD_HERE"/_chelsea_native.cpython-*.so > /dev/null 2>&1 || linked=0
    if [ "$linked" = 1 ]; then
        log "packing the linked libraries only"
        tar -czf .device/build/build.tgz "$BUILD_HERE"/bin/lib*.so "$BUILD_HERE"/bin/test-backend-ops \
            "$BUILD_HERE"/_chelsea_native.cpython-*.so || exit 1
        : > .device/build/commands.txt
    else
        # every command of the libraries and the Python module; test-backend-ops is linked there without
        # llama-common (it uses none of it, and llama-common is 40 more objects)
        ninja -C "$BUILD_HERE" -t commands ggml-cuda ggml llama _chelsea_native > .device/build/commands.txt || exit 1
        ninja -C "$BUILD_HERE" -t commands test-backend-ops | grep -- "-c .*test-backend-ops.cpp" >> .device/build/commands.txt
        tar -czf .device/build/build.tgz --exclude='*.o.d' \
            "$BUILD_HERE"/llama.cpp/{include,src,common,vendor,tests} \
            "$BUILD_HERE"/llama.cpp/ggml/{include,src/*.c,src/*.cpp,src/*.h,src/ggml-cpu,src/ggml-cuda} \
            "$BUILD_HERE"/llama.cpp-build "$BUILD_HERE"/bin "$BUILD_HERE"/CMakeFiles/_chelsea_native.dir \
            "$BUILD_HERE"/_chelsea_native.c || exit 1
    fi
    inc=$(grep -o -- "-I[^ ]*cublas[^ ]*include" "$BUILD_HERE/CMakeCache.txt" | head -1 | cut -c3-)
    if [ -n "$inc" ]; then
        tar -C / -czf .device/build/cublas-include.tgz "${inc#/}" || exit 1
    fi
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .device/build/wheels "cffi==$(python3 -c "import cffi; print(cffi.__version__)")" \
        || log "could not fetch the cffi wheel: the Python checks will fail there"
    model="${CHELSEA_GPU_MODEL:-$HOME/.cache/chelsea-gguf/models/$MODEL_NAME}"
    [ -f "$model" ] || { log "no $model (run chelsea-run once to fetch it)"; exit 1; }
    half=$(( ($(stat -c %s "$model") + 1) / 2 ))
    split -b "$half" -d "$model" .device/model.
    mkdir -p .device/part1 .device/part2 && mv .device/model.00 .device/part1/ && mv .device/model.01 .device/part2/
    n_built=$(grep -c -- " -c " .device/build/commands.txt)
    log "packed; $n_built compile commands recorded"
    du -sh .device/part1 .device/part2 .device/build
    ;;

stage)
    mkdir -p "$STAGE"
    found=0
    for d in .device/part*; do
        [ -d "$d" ] || continue
        cp -a "$d/." "$STAGE/" && found=1 && log "staged $d in $STAGE"
    done
    [ "$found" = 1 ] || { log "nothing carried under .device/part*"; exit 1; }
    ls -la "$STAGE"
    ;;

run)
    mkdir -p "$OUTDIR"
    GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')"
    [ -n "$GPU" ] || { log "no NVIDIA GPU visible (nvidia-smi)"; exit 1; }
    log "GPU: $GPU"; nvidia-smi 2>&1 | head -12 | tee "$OUTDIR/gpu.log"
    PY="${PYTHON:-python3}"
    INST=/tmp/chelsea-inst
    SITE=/tmp/chelsea-site

    if [ "$MODE" = "--installed" ]; then
        pkg="$($PY -c 'import chelsea_gguf, os; print(os.path.dirname(chelsea_gguf.__file__))')" || exit 1
        TBO="$pkg/bin/test-backend-ops"
    else
        [ -f .device/build/build.tgz ] || { log "carry .device/build (made by: bash scripts/gpu_check.sh pack)"; exit 1; }
        t0=$(date +%s)
        # the recorded commands name $BUILT_AT: put this tree there
        if [ "$(cd "$BUILT_AT" 2>/dev/null && pwd -P)" != "$(pwd -P)" ]; then
            [ -e "$BUILT_AT" ] && { log "$BUILT_AT exists and is another tree"; exit 1; }
            mkdir -p "$(dirname "$BUILT_AT")" && ln -s "$ROOT" "$BUILT_AT"
        fi
        tar -C "$BUILT_AT" -xzf .device/build/build.tgz || exit 1
        [ -f .device/build/cublas-include.tgz ] && { tar -C / -xzf .device/build/cublas-include.tgz || exit 1; }
        $PY -m pip install -q --no-index --no-deps --target "$SITE" .device/build/wheels/*.whl || exit 1
        BUILD_DIR="$BUILT_AT/$BUILD_HERE" $PY scripts/gpu_finish_build.py .device/build/commands.txt 2>&1 | tee "$OUTDIR/build.log"
        rc=${PIPESTATUS[0]}
        log "build finished rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUTDIR/build.log"
        [ "$rc" = 0 ] || exit "$rc"
        # the package as pip lays it out: libraries in chelsea_gguf/lib, the module beside the sources; cffi's
        # module uses the stable ABI (Py_LIMITED_API), so the one built for this machine's Python loads there
        B="$BUILT_AT/$BUILD_HERE"
        rm -rf "$INST" && mkdir -p "$INST/chelsea_gguf/lib"
        cp chelsea_gguf/*.py "$INST/chelsea_gguf/"
        cp "$B"/bin/lib*.so "$INST/chelsea_gguf/lib/"
        cp "$B"/_chelsea_native.cpython-*.so "$INST/chelsea_gguf/_chelsea_native.abi3.so"
        TBO="$B/bin/test-backend-ops"
        export PYTHONPATH="$INST:$SITE${PYTHONPATH:+:$PYTHONPATH}"
        export LD_LIBRARY_PATH="$INST/chelsea_gguf/lib:$(cat /tmp/chelsea-cuda-libdirs 2>/dev/null)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi

    # 1. test-backend-ops: our ops, our flash-attention cases (per-head mask: vars with 'hidden'), and a share
    #    of upstream's FLASH_ATTN_EXT cases (GQA 4, head sizes 64/128: the kernels ggml_patches/0008 touches)
    fails=0
    : > "$OUTDIR/tbo.log"
    [ -n "${GPU_CHECK_SKIP_TESTS:-}" ] && log "test-backend-ops skipped (GPU_CHECK_SKIP_TESTS)"
    [ -z "${GPU_CHECK_SKIP_TESTS:-}" ] && for run in "CHELSEA_MATCH:" "CHELSEA_PLAN:" "CHELSEA_MERGE:" "FLASH_ATTN_EXT:hidden" \
               "FLASH_ATTN_EXT:hsk=(64|128),hsv=(64|128),nh=4,nr23=\[4,1\]"; do
        op="${run%%:*}"; params="${run#*:}"
        timeout 150 "$TBO" test -b CUDA0 -o "$op" ${params:+-p "$params"} > /tmp/tbo.log 2>&1
        rc=$?
        { echo "### test-backend-ops test -b CUDA0 -o $op ${params:+-p '$params'}: rc=$rc"; cat /tmp/tbo.log; } >> "$OUTDIR/tbo.log"
        log "test-backend-ops -o $op ${params:+-p '$params'}: rc=$rc, $(grep -c ' OK' /tmp/tbo.log) OK, $(grep -c 'FAIL' /tmp/tbo.log) FAIL, $(grep -c 'not supported' /tmp/tbo.log) not supported"
        grep -E "FAIL" /tmp/tbo.log | head -10
        tail -2 /tmp/tbo.log
        [ "$rc" = 0 ] || fails=$((fails + 1))
    done
    log "test-backend-ops: $fails op group(s) failed"

    # 2. passkey and decode speed with everything on the GPU
    model="$STAGE/$MODEL_NAME"
    if [ ! -f "$model" ] && ls "$STAGE"/model.* > /dev/null 2>&1; then
        cat "$STAGE"/model.* > "$model"
    fi
    if [ ! -f "$model" ] && [ "$MODE" = "--installed" ]; then
        model="$(cd /tmp && $PY -c 'from chelsea_gguf import smollm2_path; print(smollm2_path())')" # fetched if needed
    fi
    if [ ! -f "$model" ] || [ "$(sha256sum "$model" | cut -d' ' -f1)" != "$MODEL_SHA256" ]; then
        log "model missing or incomplete (stage .device/part1 and part2 first): passkey and decode skipped"
        exit 2
    fi
    (cd /tmp && GPU="$GPU" MODEL="$model" OUTDIR="$OUTDIR" PYTHONUNBUFFERED=1 $PY "$ROOT/bench/gpu_bench.py")
    rc=$?
    [ "$OUTDIR" != "$ROOT/bench/results" ] && cp "$OUTDIR"/gpu_check_* "$ROOT/bench/results/" 2> /dev/null
    [ "$fails" = 0 ] || exit 3
    exit "$rc"
    ;;

*)
    echo "usage: $0 pack | stage | run [--installed]"; exit 2 ;;
esac
