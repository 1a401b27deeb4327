#!/usr/bin/env bash
# Install chelsea-gguf from this checkout: system tools (Debian/Ubuntu, when run as root), the Python
# build tools, then the package itself. The first build compiles the pinned llama.cpp (~5-7 min on
# 2 cores); later ones reuse build/ and ccache and take seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need_apt=()
command -v git    >/dev/null 2>&1 || need_apt+=(git)      # applies ggml_patches/
command -v ccache >/dev/null 2>&1 || need_apt+=(ccache)   # fast rebuilds
command -v g++    >/dev/null 2>&1 || need_apt+=(g++)
if ((${#need_apt[@]})); then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "install.sh: please install: ${need_apt[*]}" >&2
        [[ " ${need_apt[*]} " == *" git "* || " ${need_apt[*]} " == *" g++ "* ]] && exit 1
    fi
fi

PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -q "scikit-build-core>=0.10" "cffi>=1.17" "cmake>=3.21" ninja
# llama-cpp-python's Python side only (its own llama.cpp build switched off): chelsea_gguf.compat runs it,
# and its OpenAI server, on this package's patched libllama
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PYTHON" -m pip install -q "llama-cpp-python[server]==0.3.36"
# the RPC backend and its worker (chelsea-rpc-server), unless CHELSEA_RPC=OFF
export CHELSEA_RPC="${CHELSEA_RPC:-ON}"
# ccache keys on paths relative to the checkout, so a second clone reuses the first one's objects
export CCACHE_BASEDIR="$PWD"
"$PYTHON" -m pip install -q --no-build-isolation -e ".[test,gemma]"
echo "install.sh: chelsea-gguf installed ($("$PYTHON" -c 'import chelsea_gguf; print(chelsea_gguf.__version__)'))"
