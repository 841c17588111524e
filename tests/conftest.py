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


# The device-runner tests' artifact and images (tests/device_helpers.py), one per module;
# a module may define its own `artifact` (test_host does).
@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from device_helpers import hosvd_artifact
    return hosvd_artifact(tmp_path_factory.mktemp("art"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from device_helpers import colour_images
    return colour_images(tmp_path_factory.mktemp("images"))
