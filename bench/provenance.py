"""What a recorded result says about where it ran (commit, CPU, cores, date, command). No chelsea_gguf import, so
scripts that run outside the package's environment (kvpress_compare.py in its torch venv) record the same."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(command: str, **extra: Any) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=HERE).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if dirty else ""),
            "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "machine": platform.machine(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": command, **extra}
