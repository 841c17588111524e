import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


def require_shared(*parts: str) -> Path:
    """Path inside ../shared, or skip the test with the reason (a fresh clone has no ../shared)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: real weights/data/oracles live in ../shared next to the "
                    f"repository (present in CI, not in a fresh clone)")
    return path
