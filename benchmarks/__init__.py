"""Benchmarks as users run them (each module's docstring says how); results/ holds what they
wrote last, a .json and a .md each."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def spread(values: list) -> dict:
    """median, min, max (and the values) of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}


def write_results(name: str, payload: dict, markdown: str, folder: Path = RESULTS) -> None:
    """folder/<name>.json (payload) and folder/<name>.md (markdown); the markdown is printed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (folder / f"{name}.md").write_text(markdown.rstrip("\n") + "\n")
    print(markdown)
