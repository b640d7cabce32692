"""Skip, with the reason, where the embedded default data cannot be generated: it is made from the
brain templates of the ``deepmriprep`` package (:mod:`tmerge.data.synthetic.anatomy`), an optional
install."""

from __future__ import annotations

import pytest

from tmerge.data.synthetic.anatomy import template_dir
from tmerge.errors import DataError


def anatomy_missing() -> str | None:
    """Why the embedded default data cannot be generated here, or ``None`` where it can."""
    try:
        template_dir()
    except DataError as exc:
        return f"the embedded default data needs deepmriprep's brain templates: {exc}"
    return None


def require_anatomy() -> None:
    """In a fixture or test: skip it where :func:`anatomy_missing` says why."""
    reason = anatomy_missing()
    if reason is not None:
        pytest.skip(reason)


_REASON = anatomy_missing()
#: Mark for tests (or ``pytestmark`` of modules) that need the anatomy templates.
requires_anatomy = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
