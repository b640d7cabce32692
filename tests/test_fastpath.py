"""Fast paths: guarded torch.compile, its use in SegmentationModule, resolve_compile, loader settings."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch import nn

from tmerge.errors import ConfigError
from tmerge.fastpath import CompiledForward, enable_cudnn_benchmark
from tmerge.runner import TrainerConfig, resolve_compile


def _tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(2, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.LeakyReLU(0.01), nn.Conv3d(4, 3, 1)
    )


def _broken_compile(monkeypatch: pytest.MonkeyPatch, error: Exception) -> list[int]:
    calls: list[int] = []

    def compile_(module, **kwargs):
        def call(*args, **kw):
            calls.append(1)
            raise error

        return call

    monkeypatch.setattr(torch, "compile", compile_)
    return calls


def test_compiled_forward_equals_eager_loss_and_gradients() -> None:
    net = _tiny_net()
    x, y = torch.randn(2, 2, 6, 6, 6), torch.randint(0, 3, (2, 6, 6, 6))
    eager_loss = nn.functional.cross_entropy(net(x), y)
    eager_grads = torch.autograd.grad(eager_loss, list(net.parameters()))
    # aot_eager: TorchDynamo capture and AOT autograd as with the default backend, without
    # inductor's C++ code generation (minutes on a cold cache, and a C compiler to depend on).
    fast = CompiledForward(net, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # compiling must work
        loss = nn.functional.cross_entropy(fast(x), y)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    assert fast.active and fast.error is None
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_compile_failure_warns_once_and_gives_identical_results(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _broken_compile(monkeypatch, RuntimeError("InductorError: no working C compiler\n(details)"))
    net = _tiny_net()
    x = torch.randn(2, 2, 6, 6, 6)
    fast = CompiledForward(net)
    with pytest.warns(RuntimeWarning, match=r"torch.compile of Sequential failed .*no working C compiler.*eagerly"):
        first = fast(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no second warning
        second = fast(x)
    assert len(calls) == 1 and not fast.active and "no working C compiler" in (fast.error or "")
    torch.testing.assert_close(first, net(x), rtol=0, atol=0)
    torch.testing.assert_close(second, net(x), rtol=0, atol=0)


def test_out_of_memory_is_not_a_compile_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    _broken_compile(monkeypatch, torch.cuda.OutOfMemoryError("CUDA out of memory"))
    fast = CompiledForward(_tiny_net())
    with pytest.raises(torch.cuda.OutOfMemoryError):
        fast(torch.randn(1, 2, 4, 4, 4))
    assert fast.active


def _module(compile_: bool):
    pytest.importorskip("monai")
    from tmerge.modules.segmentation import SegmentationModule

    module = SegmentationModule(
        _tiny_net(),
        output_mode="softmax",
        class_names=["a", "b"],
        patch_size=6,
        channels_last=True,
        compile=compile_,
    )
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    module.configure_model()
    return module


def test_segmentation_module_compiles_without_renaming_its_state(monkeypatch: pytest.MonkeyPatch) -> None:
    eager, fast = _module(False), _module(True)
    assert eager._fast_net is None and isinstance(fast._fast_net, CompiledForward)
    # Checkpoints are read by the "net." prefix: compiling must not add "_orig_mod.".
    assert list(fast.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in fast.state_dict())
    fast.configure_model()  # Lightning calls it for every fit/validate/test: idempotent
    x = torch.randn(2, 2, 6, 6, 6)
    y = torch.randint(0, 3, (2, 1, 6, 6, 6))
    _broken_compile(monkeypatch, RuntimeError("unsupported"))
    broken = _module(True)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        loss = broken.loss_fn(broken(x), y)
    torch.testing.assert_close(loss, eager.loss_fn(eager(x), y), rtol=0, atol=0)


def test_resolve_compile() -> None:
    assert TrainerConfig().compile == "auto"
    assert resolve_compile("auto", "cpu") is False
    assert resolve_compile("auto", "gpu") is True and resolve_compile("auto", "cuda") is True
    assert resolve_compile("auto", "auto") is torch.cuda.is_available()
    assert resolve_compile("True", "cpu") is True and resolve_compile("false", "gpu") is False
    assert resolve_compile(True, "cpu") is True
    with pytest.raises(ConfigError, match="trainer.compile.*'sometimes'"):
        resolve_compile("sometimes", "cpu")


def test_cudnn_benchmark_respects_deterministic_algorithms() -> None:
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
        assert not enable_cudnn_benchmark() and not torch.backends.cudnn.benchmark
        torch.use_deterministic_algorithms(False)
        assert enable_cudnn_benchmark() and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = saved


def test_loader_kwargs_pin_memory_only_for_cuda() -> None:
    from tmerge.data.datasets import loader_kwargs

    assert loader_kwargs(0, cuda=False) == {"num_workers": 0, "persistent_workers": False, "pin_memory": False}
    assert loader_kwargs(4, cuda=True) == {"num_workers": 4, "persistent_workers": True, "pin_memory": True}
