"""The shared test helpers (tests/helpers/) themselves."""

from __future__ import annotations

import pytest
from helpers.anatomy import require_anatomy


def test_missing_anatomy_package_skips_instead_of_erroring(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tiny_default`` (tests/conftest.py) and the other generated-data fixtures call
    :func:`require_anatomy`: without deepmriprep their tests are skipped, with the reason, rather
    than reported as errors."""
    import tmerge.data.synthetic.anatomy as anatomy

    monkeypatch.setattr(anatomy.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match=r"deepmriprep.*pip install --no-deps deepmriprep"):
        require_anatomy()
