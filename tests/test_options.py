"""The clustering options are declared once (ClusterOptions' fields): keywords, flags, help, defaults, README and
error messages all follow from that declaration and from the C library."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from chelsea_gguf import Llama
from chelsea_gguf._lib import lib
from chelsea_gguf.cli import build_parser, cluster_kwargs_of
from chelsea_gguf.cluster import KEYWORD_FIELDS, OPTIONS, ClusterOptions, default_options, options_from_keywords

README = Path(__file__).resolve().parent.parent / "README.md"
FLAGS = {"--kv-ratio", "--kv-chunk", "--kv-sinks", "--kv-recent", "--kv-interval", "--kv-no-bias",
         "--kv-match-keys"}


def test_every_field_is_declared_with_its_c_field_keyword_and_doc() -> None:
    c_defaults = lib.chelsea_kv_cluster_default_params()
    assert [o.name for o in OPTIONS] == [f.name for f in dataclasses.fields(ClusterOptions)]
    for o in OPTIONS:
        assert o.keyword == f"kv_cluster_{o.name}" and KEYWORD_FIELDS[o.keyword] == o.name
        assert o.doc and o.doc == o.doc.strip() and "\n" not in o.doc
        assert getattr(c_defaults, o.c_name) == pytest.approx(o.default)  # the default is C's
        assert o.doc in (ClusterOptions.__doc__ or "") and o.keyword in (Llama.__doc__ or "")
    assert FLAGS <= {o.flag for o in OPTIONS if o.flag}  # chelsea-run's flags stay


def test_to_native_is_the_c_default_for_the_default_options() -> None:
    ours, c = default_options().to_native(), lib.chelsea_kv_cluster_default_params()
    assert {o.c_name: getattr(ours, o.c_name) for o in OPTIONS} == {o.c_name: getattr(c, o.c_name) for o in OPTIONS}


def test_cli_help_shows_each_flag_with_the_c_default() -> None:
    text = " ".join(build_parser().format_help().split())
    for o in OPTIONS:
        if o.flag is None:
            continue
        assert o.flag in text
        if isinstance(o.default, bool):
            assert o.flag_help and " ".join(o.flag_help.split()) in text
        else:
            assert f"{o.doc} (default {o.default})" in text


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["-p", "x", *argv])


def test_flags_become_keywords() -> None:
    assert cluster_kwargs_of(parse()) == {"kv_cluster": True}  # on by default, as chelsea-server
    assert cluster_kwargs_of(parse("--kv-cluster")) == {"kv_cluster": True}
    assert cluster_kwargs_of(parse("--no-kv-cluster")) == {}
    assert cluster_kwargs_of(parse("--kv-ratio", "0.2", "--kv-no-bias", "--kv-match-keys",
                                   "--kv-interval", "8")) == \
        {"kv_cluster": True, "kv_cluster_ratio": 0.2, "kv_cluster_interval": 8, "kv_cluster_bias": False,
         "kv_cluster_match_values": False}
    with pytest.raises(ValueError, match=r"^--kv-ratio, --kv-no-bias: clustering is off"):
        cluster_kwargs_of(parse("--no-kv-cluster", "--kv-ratio", "0.2", "--kv-no-bias"))


@pytest.mark.parametrize(("argv", "message"), [
    (["--kv-recent", "-4"], r"^--kv-recent: -4\b"),
    (["--kv-chunk", "7"], r"^--kv-chunk: 7\b.*even"),
    (["--kv-interval", "-1"], r"^--kv-interval: -1\b"),
    (["--kv-ratio", "1.5"], r"^--kv-ratio: 1.5\b"),
])
def test_a_bad_flag_is_named_as_the_c_library_judges_it(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cluster_kwargs_of(parse("--kv-cluster", *argv))


@pytest.mark.parametrize(("keywords", "message"), [
    ({"kv_cluster_max_passes": 65}, r"^kv_cluster_max_passes: 65\b"),
    ({"kv_cluster_max_passes": 0}, r"^kv_cluster_max_passes: 0\b"),
    ({"kv_cluster_pass_fraction": 1.5}, r"^kv_cluster_pass_fraction: 1.5\b"),
    ({"kv_cluster_sinks": -1}, r"^kv_cluster_sinks: -1\b"),
    ({"kv_cluster_interval": -1}, r"^kv_cluster_interval: -1\b"),
])
def test_ranges_are_the_c_library_s_reported_with_the_keyword(keywords: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        options_from_keywords(keywords)


@pytest.mark.parametrize(("keywords", "message"), [
    ({"kv_cluster_random_pairs": 1}, r"^kv_cluster_random_pairs: expected a bool, got 1$"),
    ({"kv_cluster_ratio": "0.2"}, r"^kv_cluster_ratio: expected a number, got '0.2'$"),
    ({"kv_cluster_chunk": 8.0}, r"^kv_cluster_chunk: expected an integer, got 8.0$"),
    ({"kv_cluster_seed": -1}, r"^kv_cluster_seed: -1 is out of range \(0 \.\. 4294967295\)$"),
    ({"kv_cluster_recent": 2**31}, r"^kv_cluster_recent: 2147483648 is out of range"),
])
def test_what_c_cannot_see_is_checked_in_python(keywords: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        options_from_keywords(keywords)


def test_max_passes_up_to_the_c_cap_is_accepted() -> None:
    assert options_from_keywords({"kv_cluster_max_passes": 64}).max_passes == 64


def test_an_unknown_keyword_is_named_with_the_known_ones() -> None:
    with pytest.raises(TypeError, match=r"kv_cluster_ratoi.*kv_cluster_ratio"):
        Llama(kv_cluster=True, kv_cluster_ratoi=0.2)
    with pytest.raises(TypeError, match=r"n_ctxx"):
        Llama(n_ctxx=512)


def readme_rows() -> dict[str, list[str]]:
    """README's options table, `| keyword | flag | default | meaning |`: cells by keyword."""
    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`(kv_cluster\w*)`", cells[0]) if line.startswith("|") else []
        if len(names) == 1 and len(cells) == 4:
            rows[names[0]] = cells
    return rows


def readme_default(cell: str) -> object:
    value = cell.strip("` ")
    return {"on": True, "off": False}.get(value, value)


def test_readme_table_lists_every_keyword_with_its_flag_and_default() -> None:
    rows = readme_rows()
    for o in OPTIONS:
        assert o.keyword in rows, f"README's options table has no row for {o.keyword}"
        _, flag_cell, default_cell, meaning = rows[o.keyword]
        flags = re.findall(r"`(--[\w-]+)`", flag_cell)
        assert flags == ([o.flag] if o.flag else []), (o.keyword, flag_cell)
        default = readme_default(default_cell)
        if isinstance(o.default, bool):
            assert default is o.default, (o.keyword, default_cell)
        else:
            assert float(str(default)) == pytest.approx(o.default), (o.keyword, default_cell)
        assert meaning
