import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO))


# The device-runner tests' artifact and images (tests/device_helpers.py), one per module;
# a module may define its own `artifact` (test_profiles does).
@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from device_helpers import hosvd_artifact
    return hosvd_artifact(tmp_path_factory.mktemp("art"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from device_helpers import colour_images
    return colour_images(tmp_path_factory.mktemp("images"))
