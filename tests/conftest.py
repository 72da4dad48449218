import os
from pathlib import Path

import pytest

MINI = Path(os.environ.get("COCOMIX_TEST_DATA") or os.environ.get("COCOMIX_DATA")
            or Path(__file__).resolve().parents[2] / "shared/data/coco2017-mini")


@pytest.fixture(scope="session")
def mini_root() -> Path:
    "The real coco2017-mini folder (read-only)."
    if not (MINI / "split.json").is_file():
        pytest.skip(f"coco2017-mini not found at {MINI}; set COCOMIX_TEST_DATA to its folder")
    return MINI
