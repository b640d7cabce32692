"""The shared runner: precision choice."""

from __future__ import annotations

from tmerge.runner import resolve_precision


def test_precision_auto_is_fp32_on_cpu_and_bf16_on_gpu():
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("auto", "gpu") == "bf16-mixed"
    assert resolve_precision("16-mixed", "gpu") == "16-mixed"


