"""``chelsea-server``: llama-cpp-python's OpenAI-compatible server on chelsea-gguf, KV clustering on.

    chelsea-server --model model.gguf --n_ctx 32768 --kv-ratio 0.2 --host 127.0.0.1 --port 8000

Our ``--kv-*`` flags (clustering is on unless ``--no-kv-cluster``) are taken out; every other argument is
``python -m llama_cpp.server``'s own. Without ``--model`` (or a config file) it serves the default model.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from chelsea_gguf.cli import add_cluster_arguments, cluster_kwargs_of


def _cluster_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chelsea-server", add_help=False,
                                description="llama-cpp-python's OpenAI-compatible server with KV-cache clustering. "
                                            "Other arguments are those of python -m llama_cpp.server (below).")
    add_cluster_arguments(p)
    return p


def _names_a_model(args: Sequence[str]) -> bool:
    flags = ("--model", "--config_file")
    return any(a in flags or a.startswith(tuple(f + "=" for f in flags)) for a in args) or \
        bool(os.environ.get("MODEL") or os.environ.get("CONFIG_FILE"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _cluster_parser()
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        cluster_keywords = cluster_kwargs_of(args)
    except ValueError as e:
        parser.error(str(e))
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print()
    from chelsea_gguf import compat

    try:
        compat.install()
    except compat.CompatError as e:
        print(f"chelsea-server: error: {e}", file=sys.stderr)
        return 1
    compat.set_cluster_defaults(**cluster_keywords)
    if not _names_a_model(rest) and "-h" not in rest and "--help" not in rest:
        from chelsea_gguf.models import ModelFetchError, default_model_path

        try:
            rest = ["--model", str(default_model_path()), *rest]
        except ModelFetchError as e:
            print(f"chelsea-server: error: {e}", file=sys.stderr)
            return 1
    from llama_cpp.server.__main__ import main as llama_cpp_server_main

    sys.argv = ["chelsea-server", *rest]
    llama_cpp_server_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
