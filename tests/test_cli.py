"""chelsea-run end to end, as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def run_cli(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chelsea_gguf.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_one_shot_prompt_reports_speed_and_kv(model_path: Path) -> None:
    proc = run_cli(str(model_path), "-c", "1k", "-p", "The capital of France is", "-n", "12", "--temp", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("The capital of France is")
    assert "Paris" in proc.stdout
    assert re.search(r"kv cache\s*:\s*[\d.]+ MiB", proc.stderr)
    assert re.search(r"compute\s*:\s*[\d.]+ MiB", proc.stderr)
    assert re.search(r"prompt eval:.*tokens per second", proc.stderr)
    assert re.search(r"eval\s*:.*/\s+1[12] tokens", proc.stderr)
    assert "context 1024 tokens" in proc.stderr


def test_default_model_and_prompt_file(tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Water boils at a temperature of", encoding="utf-8")
    proc = run_cli("-f", str(prompt), "-n", "4", "--temp", "0", "--no-display-prompt", "-ctk", "q8_0",
                   "-ctv", "q8_0", "-fa", "on")
    assert proc.returncode == 0, proc.stderr
    assert not proc.stdout.startswith("Water")
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in proc.stderr
    assert "K q8_0" in proc.stderr


def test_chat_mode_reads_stdin(model_path: Path) -> None:
    proc = run_cli(str(model_path), "--chat", "-n", "16", "--temp", "0",
                   stdin="What is the capital of France? Answer in one word.\n")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "<|im_end|>" not in proc.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-c", "64q", "-p", "x"], "--ctx: cannot parse '64q'"),
        (["-ctk", "q3_x", "-p", "x"], "-ctk"),
        ([], "nothing to do"),
        (["-p", "x", "-f", "y"], "not allowed with"),
        (["-f", "/no/such/prompt.txt"], "/no/such/prompt.txt"),
        (["-p", "x", "-n", "-5"], "-n/--n-predict: -5 is out of range"),
        (["-p", "x", "--kv-mem", "3X"], "--kv-mem: cannot parse '3X'"),
        (["-p", "x", "--kv-mem", "1G", "--no-kv-cluster"], "--kv-mem: a KV memory budget needs clustering"),
        (["-p", "x", "--kv-mem", "1G", "--kv-ratio", "0.2"], "--kv-mem and --kv-ratio"),
    ],
)
def test_bad_arguments(args: list[str], needle: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert needle in proc.stderr


def test_missing_model_is_named() -> None:
    proc = run_cli("/no/such/model.gguf", "-p", "x")
    assert proc.returncode == 1
    assert "model file not found: /no/such/model.gguf" in proc.stderr


def test_prompt_longer_than_context_is_reported_before_any_output(model_path: Path) -> None:
    proc = run_cli(str(model_path), "-c", "256", "-p", "word " * 600, "-n", "4")
    assert proc.returncode == 1
    assert "prompt is 601 tokens, longer than the context (n_ctx=256)" in proc.stderr
    assert proc.stdout == ""


PROMPT = "The capital of France is"


def test_clusters_by_default_and_says_what_it_holds(model_path: Path) -> None:
    proc = run_cli(str(model_path), "-c", "32k", "-p", PROMPT, "-n", "4", "--temp", "0")
    assert proc.returncode == 0, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert re.search(r"context 32768 tokens, KV clustering at ratio 0\.25: 8704 cells, KV [\d.]+ MiB against "
                     r"720\.0 MiB for the full cache \(2\d%\)", first), first
    assert "kv cluster :" in proc.stderr
    assert re.search(r"kv memory\s*:\s*[\d.]+ MiB for a 32768-token context, [\d.]+ MiB less than the full "
                     r"cache's 720\.00 MiB", proc.stderr)
    full = run_cli(str(model_path), "-c", "32k", "-p", PROMPT, "-n", "4", "--temp", "0", "--no-kv-cluster")
    assert full.returncode == 0, full.stderr
    assert "full KV cache: 32768 cells, KV 720.0 MiB" in full.stderr.splitlines()[0]
    assert "kv cluster :" not in full.stderr
    assert full.stdout == proc.stdout  # a short prompt: nothing to merge, the same text


def test_memory_budget_picks_the_ratio(model_path: Path) -> None:
    proc = run_cli(str(model_path), "-c", "32k", "--kv-mem", "64M", "-p", PROMPT, "-n", "4", "--temp", "0")
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"ratio (0\.\d+) \(--kv-mem 64 MiB\): (\d+) cells, KV ([\d.]+) MiB", proc.stderr)
    assert m and float(m.group(3)) <= 64.0 and 0.05 < float(m.group(1)) < 0.1, proc.stderr
    small = run_cli(str(model_path), "-c", "64k", "--kv-mem", "2M", "-p", PROMPT)
    assert small.returncode == 1 and small.stdout == ""
    assert "--kv-mem: 2.0 MiB cannot hold a clustered KV cache for 65536 tokens" in small.stderr


def test_flash_attention_is_auto_by_default(model_path: Path) -> None:
    proc = run_cli(str(model_path), "-c", "1k", "-p", PROMPT, "-n", "1", "-v")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"flash_attn\s*=\s*auto", proc.stderr)


def test_prompt_progress_on_a_terminal_only(model_path: Path, tmp_path: Path) -> None:
    prompt = tmp_path / "long.txt"
    prompt.write_text("The river ran past the mill and the orchard. " * 120, encoding="utf-8")
    args = [str(model_path), "-c", "4k", "-f", str(prompt), "-n", "1", "-b", "256", "--no-display-prompt"]
    piped = run_cli(*args)
    assert piped.returncode == 0, piped.stderr
    assert "prompt:" not in piped.stderr
    main, sub = pty.openpty()
    with subprocess.Popen([sys.executable, "-m", "chelsea_gguf.cli", *args], stdout=subprocess.DEVNULL,
                          stderr=sub, stdin=subprocess.DEVNULL) as proc:
        os.close(sub)
        seen = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=300) == 0, seen.decode(errors="replace")
    os.close(main)
    lines = re.findall(r"prompt: (\d+)/(\d+) tokens, [\d.]+ tokens per second, (\d+) cells, ETA \d+ s",
                       seen.decode(errors="replace"))
    assert len(lines) >= 3, seen.decode(errors="replace")
    done = [int(d) for d, _, _ in lines]
    assert done == sorted(done) and done[-1] == int(lines[-1][1])
