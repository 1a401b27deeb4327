#!/usr/bin/env python3
"""Lay out the pinned, patched llama.cpp source tree for the build.

The tree is the one vendored in the llama-cpp-python sdist pinned in docs/design.md.  Steps:

1. obtain the sdist (``pip download --no-deps``) into the download cache, unless a path is given;
2. check its sha256 -- a wrong archive is a hard error, never a silent fallback;
3. unpack ``vendor/llama.cpp`` once into a pristine copy in the cache;
4. lay the pristine tree into the build's source dir, apply ``ggml_patches/*.patch`` in order.

Files are only rewritten when their content changes, so editing one patch recompiles only the
files that patch touches (ninja compares mtimes).  No llama.cpp source ever lands in the repo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
VENDOR_PREFIX = f"llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/"
MANIFEST = ".chelsea-patches.json"


class SourceError(RuntimeError):
    """A problem the user must fix; printed without a traceback."""


def default_cache_dir() -> Path:
    env = os.environ.get("CHELSEA_GGUF_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "chelsea-gguf"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def obtain_sdist(cache: Path, given: str | None) -> Path:
    if given:
        sdist = Path(given)
        if not sdist.is_file():
            raise SourceError(f"CHELSEA_LLAMA_CPP_SDIST={given}: no such file")
    else:
        downloads = cache / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        sdist = downloads / SDIST_FILE
        if not sdist.is_file() or sha256_of(sdist) != SDIST_SHA256:
            print(f"-- chelsea: downloading {SDIST_NAME}=={SDIST_VERSION} sdist into {downloads}", flush=True)
            # --no-build-isolation keeps pip from building cmake from source just to read metadata
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", SDIST_NAME,
                   "--no-build-isolation", "-d", str(downloads), f"{SDIST_NAME}=={SDIST_VERSION}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not sdist.is_file():
                raise SourceError(
                    f"could not download {SDIST_FILE} with pip (offline?). Put the file in {downloads} "
                    f"or pass -DCHELSEA_LLAMA_CPP_SDIST=/path/to/{SDIST_FILE}.\n{proc.stdout}{proc.stderr}")
    actual = sha256_of(sdist)
    if actual != SDIST_SHA256:
        raise SourceError(f"{sdist}: sha256 {actual} does not match the pinned {SDIST_SHA256}")
    return sdist


def pristine_tree(cache: Path, sdist: Path) -> Path:
    tree = cache / f"llama.cpp-{SDIST_SHA256[:12]}"
    stamp = tree / ".chelsea-complete"
    if stamp.is_file():
        return tree
    print(f"-- chelsea: unpacking vendor/llama.cpp into {tree}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="llama.cpp-", dir=cache))
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(VENDOR_PREFIX) and (m.isfile() or m.isdir()):
                m.name = m.name[len(VENDOR_PREFIX):]
                if m.name:
                    members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    (tmp / ".chelsea-complete").write_text(SDIST_SHA256 + "\n")
    if tree.exists():
        shutil.rmtree(tree)
    tmp.rename(tree)
    return tree


PATCH_PATH_RE = re.compile(r"^(?:---|\+\+\+) (?:a/|b/)?(\S+)")


def files_touched(patch: Path) -> set[str]:
    touched = set()
    for line in patch.read_text(encoding="utf-8", errors="replace").splitlines():
        m = PATCH_PATH_RE.match(line)
        if m and m.group(1) != "/dev/null":
            touched.add(m.group(1))
    return touched


def patched_contents(pristine: Path, patches: list[Path]) -> dict[str, bytes | None]:
    """Apply the patches to scratch copies of the files they touch; None means deleted."""
    touched: set[str] = set()
    for p in patches:
        touched |= files_touched(p)
    with tempfile.TemporaryDirectory(prefix="chelsea-patch-") as scratch:
        root = Path(scratch)
        for rel in touched:
            src = pristine / rel
            if src.is_file():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, root / rel)
        for p in patches:
            proc = subprocess.run(["git", "apply", "--whitespace=nowarn", "-p1", str(p)],
                                  cwd=root, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SourceError(f"patch {p} does not apply to the pinned llama.cpp:\n{proc.stderr.strip()}")
        return {rel: (root / rel).read_bytes() if (root / rel).is_file() else None for rel in touched}


def write_if_changed(path: Path, data: bytes) -> bool:
    if path.is_file() and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return True


def lay_out(pristine: Path, dest: Path, patches: list[Path]) -> None:
    if not (dest / MANIFEST).is_file():
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(pristine, dest, ignore=shutil.ignore_patterns(".chelsea-complete"))
        (dest / MANIFEST).write_text("[]")
    previous = set(json.loads((dest / MANIFEST).read_text()))
    wanted = patched_contents(pristine, patches)
    changed = 0
    # files an earlier patch set touched but this one does not go back to upstream
    for rel in previous - set(wanted):
        src = pristine / rel
        if src.is_file():
            changed += write_if_changed(dest / rel, src.read_bytes())
        elif (dest / rel).exists():
            (dest / rel).unlink()
            changed += 1
    for rel, data in wanted.items():
        if data is None:
            if (dest / rel).exists():
                (dest / rel).unlink()
                changed += 1
        else:
            changed += write_if_changed(dest / rel, data)
    (dest / MANIFEST).write_text(json.dumps(sorted(wanted), indent=1))
    print(f"-- chelsea: llama.cpp source at {dest}: {len(patches)} patch(es), {changed} file(s) rewritten",
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", required=True, help="where the patched tree goes (inside the build dir)")
    ap.add_argument("--patches", required=True, help="folder of numbered *.patch files")
    ap.add_argument("--cache", default=str(default_cache_dir()))
    ap.add_argument("--sdist", default=os.environ.get("CHELSEA_LLAMA_CPP_SDIST") or None)
    args = ap.parse_args()
    try:
        cache = Path(args.cache)
        cache.mkdir(parents=True, exist_ok=True)
        sdist = obtain_sdist(cache, args.sdist)
        pristine = pristine_tree(cache, sdist)
        patches = sorted(Path(args.patches).glob("*.patch"))
        lay_out(pristine, Path(args.dest), patches)
    except SourceError as e:
        print(f"chelsea: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
