"""What every benchmark shares: the device's name, reading prompt text, writing JSON and plots."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "brown.txt"


def git_revision() -> str:
    """HEAD's short hash; $PACKKV_GIT where the tree travelled without .git (the GPU machine)."""
    if os.environ.get("PACKKV_GIT"):
        return os.environ["PACKKV_GIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def header(device: str) -> dict:
    """Top-level fields of every results file: where, when and with what it was measured."""
    return {"device": device, "command": " ".join([Path(sys.executable).name] + sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "git": git_revision(),
            "host_python": platform.python_version()}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(x) -> str:
    return f"{x:.1f}" if isinstance(x, float) else str(x)
