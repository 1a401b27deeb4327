"""chelsea-run end to end, as a user runs it (a subprocess)."""

from __future__ import annotations

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
    assert "n_ctx 1024" in proc.stderr


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


def test_prompt_longer_than_context_is_reported(model_path: Path) -> None:
    proc = run_cli(str(model_path), "-c", "256", "-p", "word " * 600, "-n", "4")
    assert proc.returncode == 1
    assert "n_ctx=256" in proc.stderr
