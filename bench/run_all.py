"""Every benchmark in one command, then the plots and the headline table.

    python3 bench/run_all.py --quick     # smoke run of every benchmark (a few minutes on 2 cores)
    python3 bench/run_all.py             # full run (see bench/results/run_all.json for its recorded time)
    python3 bench/run_all.py --only kld,tasks

Stages run one after another (one model-heavy process at a time) and each writes its own results file as it
finishes, so an interrupted full run keeps what it completed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import provenance, write_json

HERE = Path(__file__).resolve().parent
STAGES: dict[str, list[str]] = {
    "kld": ["quality_kld.py"],
    "tasks": ["quality_tasks.py"],
    "speed": ["decode_bench.py"],
    "gemma": ["decode_bench.py", "--model", "gemma"],
    "memory": ["memory_bench.py"],
    "recent": ["recent_window.py"],
    "retrieval": ["retrieval.py"],
}
QUICK_STAGES = ("kld", "tasks", "speed", "memory", "retrieval")   # the Gemma plan has no quick variant: speed --quick covers the code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="comma-separated stages: " + ",".join(STAGES))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(QUICK_STAGES if args.quick else STAGES)
    times: dict[str, float] = {}
    failed: list[str] = []
    for name in names:
        cmd = [sys.executable, str(HERE / STAGES[name][0]), *STAGES[name][1:]] + (["--quick"] if args.quick else [])
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        if subprocess.run(cmd, cwd=HERE, check=False).returncode != 0:
            failed.append(name)
        times[name] = round(time.time() - t0, 1)
        print(f"== {name}: {times[name]:.0f} s", flush=True)
    report = [sys.executable, str(HERE / "report.py")] + (["--quick"] if args.quick else [])
    if subprocess.run(report, cwd=HERE, check=False).returncode != 0:
        failed.append("report")
    meta = provenance("python3 bench/run_all.py" + (" --quick" if args.quick else "")
                      + (f" --only {args.only}" if args.only else ""), stage_seconds=times, failed=failed,
                      total_s=round(sum(times.values()), 1))
    write_json("run_all_quick" if args.quick else "run_all", meta)
    print(meta)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
