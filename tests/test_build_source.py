"""The build's source step (cmake/llama_cpp_source.py): patches apply in order, a bad patch is named,
and re-laying the tree rewrites only what changed (so rebuilds stay incremental)."""

from __future__ import annotations

import difflib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cmake" / "llama_cpp_source.py"


def load_script():
    spec = importlib.util.spec_from_file_location("llama_cpp_source", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def make_patch(tmp: Path, name: str, rel: str, old: str, new: str) -> Path:
    lines = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                 fromfile=f"a/{rel}", tofile=f"b/{rel}")
    patch = tmp / "patches" / name
    patch.parent.mkdir(exist_ok=True)
    patch.write_text("".join(lines))
    return patch


@pytest.fixture()
def pristine(tmp_path: Path) -> Path:
    tree = tmp_path / "pristine"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "a.cpp").write_text("int a = 1;\nint b = 2;\n")
    (tree / "src" / "untouched.cpp").write_text("int u = 0;\n")
    return tree


def test_patches_apply_in_order_and_only_changed_files_are_rewritten(tmp_path: Path, pristine: Path) -> None:
    src = load_script()
    make_patch(tmp_path, "0001-a.patch", "src/a.cpp", "int a = 1;\nint b = 2;\n", "int a = 10;\nint b = 2;\n")
    make_patch(tmp_path, "0002-b.patch", "src/a.cpp", "int a = 10;\nint b = 2;\n", "int a = 10;\nint b = 20;\n")
    dest = tmp_path / "dest"
    patches = sorted((tmp_path / "patches").glob("*.patch"))
    src.lay_out(pristine, dest, patches)
    assert (dest / "src" / "a.cpp").read_text() == "int a = 10;\nint b = 20;\n"
    untouched_mtime = os.stat(dest / "src" / "untouched.cpp").st_mtime_ns
    patched_mtime = os.stat(dest / "src" / "a.cpp").st_mtime_ns

    src.lay_out(pristine, dest, patches)  # nothing changed: nothing rewritten
    assert os.stat(dest / "src" / "a.cpp").st_mtime_ns == patched_mtime
    assert os.stat(dest / "src" / "untouched.cpp").st_mtime_ns == untouched_mtime

    src.lay_out(pristine, dest, patches[:1])  # dropping a patch takes its change back out
    assert (dest / "src" / "a.cpp").read_text() == "int a = 10;\nint b = 2;\n"
    src.lay_out(pristine, dest, [])
    assert (dest / "src" / "a.cpp").read_text() == "int a = 1;\nint b = 2;\n"
    assert os.stat(dest / "src" / "untouched.cpp").st_mtime_ns == untouched_mtime


def test_a_patch_that_does_not_apply_is_named(tmp_path: Path, pristine: Path) -> None:
    src = load_script()
    bad = make_patch(tmp_path, "0001-stale.patch", "src/a.cpp", "int a = 5;\nint b = 2;\n", "int a = 6;\nint b = 2;\n")
    with pytest.raises(src.SourceError, match="0001-stale.patch does not apply"):
        src.lay_out(pristine, tmp_path / "dest", [bad])


def test_wrong_archive_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the sdist")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dest", str(tmp_path / "d"), "--patches", str(tmp_path),
                           "--cache", str(tmp_path / "cache"), "--sdist", str(fake)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "does not match the pinned" in proc.stderr and str(fake) in proc.stderr


def test_repo_patches_apply_to_the_pinned_tree() -> None:
    src = load_script()
    cache = src.default_cache_dir()
    tree = cache / f"llama.cpp-{src.SDIST_SHA256[:12]}"
    if not (tree / ".chelsea-complete").is_file():
        pytest.skip("pinned tree not unpacked in the cache (the build does that)")
    patches = sorted((REPO / "ggml_patches").glob("*.patch"))
    assert patches, "ggml_patches/ holds no patch"
    contents = src.patched_contents(tree, patches)
    assert contents and all(v is not None for v in contents.values())
