"""Pieces shared by the benchmark scripts."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the 1M-architecture checkpoint with random weights in the read-only ../shared folder
DEFAULT_CHECKPOINT = REPO.parent / "shared" / "fixtures" / "mattersim_v1_reference" / "m3gnet-1M-random.pth"


def write_report(report: dict, output: Path | None) -> None:
    """Print the report as json and, with ``output``, write it there too."""
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        Path(output).write_text(text)
