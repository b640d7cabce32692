"""AdaptiveMerge: gradients into δ through functional_call, equality with imm_merge and the plain net.

Run this file as a script (``python tests/merge/test_adaptive.py``) to time an adaption step
against a plain training step of the same 3-D conv net.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from tmerge.merge import AdaptiveMerge, imm_merge, mergeable_layers


class TinyNet(nn.Module):
    """Conv3d–InstanceNorm–LeakyReLU–Conv3d–InstanceNorm–LeakyReLU–1³ head."""

    def __init__(self, in_channels: int = 2, width: int = 4, n_classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, width, 3, padding=1)
        self.norm1 = nn.InstanceNorm3d(width, affine=True)
        self.conv2 = nn.Conv3d(width, width, 3, padding=1)
        self.norm2 = nn.InstanceNorm3d(width, affine=True)
        self.head = nn.Conv3d(width, n_classes, 1)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        return self.head(x)


LAYERS = {"conv1": ["conv1.weight", "conv1.bias"], "conv2": ["conv2.weight", "conv2.bias"]}
FUSED = {n for ns in LAYERS.values() for n in ns}


def _sources(
    n_models: int, in_channels: int = 2, seed: int = 0
) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    torch.manual_seed(seed)
    sds = [{k: v.clone() for k, v in TinyNet(in_channels).state_dict().items()} for _ in range(n_models)]
    fs = [{k: 0.1 + torch.rand_like(v) for k, v in sd.items()} for sd in sds]
    return sds, fs


def _random_delta(model: AdaptiveMerge, seed: int = 1) -> None:
    with torch.no_grad():
        model.mixing.delta.copy_(
            torch.randn(model.mixing.delta.shape, generator=torch.Generator().manual_seed(seed))
        )


@pytest.mark.parametrize("n_models", [2, 3])
def test_delta_receives_gradients(n_models: int) -> None:
    sds, fs = _sources(n_models)
    model = AdaptiveMerge(TinyNet(), sds, fs, LAYERS)
    x = torch.randn(2, 2, 6, 6, 6)
    y = torch.randint(0, 3, (2, 6, 6, 6))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grad = model.mixing.delta.grad
    assert grad is not None and grad.shape == (n_models, 2)
    assert torch.all(grad.abs().sum(0) > 0), "every layer's δ column should get a gradient"
    for n, p in model.net.named_parameters():
        if n in FUSED:
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_only_delta_and_specific_parameters_are_trainable() -> None:
    sds, fs = _sources(2)
    model = AdaptiveMerge(TinyNet(), sds, fs, LAYERS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"mixing.delta"} | {f"net.{n}" for n, _ in TinyNet().named_parameters() if n not in FUSED}
    assert trainable == expected
    # Buffers are non-persistent: the checkpoint holds δ and the net's parameters only.
    assert set(model.state_dict()) == {"mixing.delta"} | {f"net.{n}" for n in TinyNet().state_dict()}


@pytest.mark.parametrize("fishers", [True, False])
def test_materialize_equals_imm_merge(fishers: bool) -> None:
    sds, fs = _sources(3)
    model = AdaptiveMerge(TinyNet(), sds, fs if fishers else None, LAYERS)
    _random_delta(model)
    alpha = model.alphas().detach()
    assert alpha.shape == (3, 2)
    expected = imm_merge(sds, fs if fishers else None, alpha, layers=LAYERS)
    state = model.materialize()
    assert set(state) == set(model.net.state_dict())
    for n in FUSED:
        torch.testing.assert_close(state[n], expected[n], rtol=1e-5, atol=1e-6)
        assert not state[n].requires_grad
    for n, v in model.net.state_dict().items():
        if n not in FUSED:
            assert torch.equal(state[n], v)


def test_forward_equals_plain_net_with_materialized_weights() -> None:
    sds, fs = _sources(2)
    model = AdaptiveMerge(TinyNet(), sds, fs, LAYERS)
    _random_delta(model)
    plain = TinyNet()
    plain.load_state_dict(model.materialize())
    x = torch.randn(1, 2, 5, 5, 5)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-6)


def test_merged_weights_follow_the_nets_memory_format() -> None:
    """A channels-last net gets channels-last merged weights (a layout mismatch would cost a
    conversion in every convolution) — with the same values and the same output."""
    sds, fs = _sources(2)
    model = AdaptiveMerge(TinyNet(), sds, fs, LAYERS)
    _random_delta(model)
    x = torch.randn(1, 2, 5, 5, 5)
    expected = model(x)
    reference = model.merged_parameters()
    model.to(memory_format=torch.channels_last_3d)
    merged = model.merged_parameters()
    assert merged["conv1.weight"].is_contiguous(memory_format=torch.channels_last_3d)
    assert not merged["conv1.weight"].is_contiguous()
    torch.testing.assert_close(merged["conv1.weight"], reference["conv1.weight"])
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last_3d)), expected)


def test_one_hot_alpha_reproduces_a_source() -> None:
    sds, fs = _sources(2)
    model = AdaptiveMerge(TinyNet(), sds, fs, LAYERS)
    merged = model.merged_parameters(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    for n in FUSED:
        torch.testing.assert_close(merged[n], sds[1][n], rtol=1e-6, atol=0.0)


def test_optimizer_step_moves_delta_and_keeps_alpha_valid() -> None:
    sds, fs = _sources(2)
    model = AdaptiveMerge(TinyNet(), sds, fs, LAYERS)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=10.0)
    x = torch.randn(2, 2, 4, 4, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert torch.any(model.mixing.delta != 0)
    alpha = model.alphas()
    assert torch.all(alpha >= 0)
    torch.testing.assert_close(alpha.sum(0), torch.ones(2))
    assert len(model.mixing.alphas_dict()) == 2


def test_buffers_follow_dtype_moves() -> None:
    sds, fs = _sources(2)
    model = AdaptiveMerge(TinyNet(), sds, fs, LAYERS).double()
    out = model(torch.randn(1, 2, 4, 4, 4, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert all(b.dtype == torch.float64 for b in model.buffers())


def test_mismatched_input_layer_is_reported_and_split_off() -> None:
    sds, fs = _sources(2, in_channels=2)
    target = TinyNet(in_channels=4)
    with pytest.raises(
        ValueError, match=r"'conv1'.*conv1\.weight: source \(4, 2, 3, 3, 3\) vs target \(4, 4, 3, 3, 3\)"
    ):
        AdaptiveMerge(target, sds, fs, LAYERS)
    mergeable, mismatched = mergeable_layers(target, sds, LAYERS)
    assert mismatched == ["conv1"] and mergeable == {"conv2": LAYERS["conv2"]}
    model = AdaptiveMerge(target, sds, fs, mergeable)
    assert model.net.conv1.weight.requires_grad and not model.net.conv2.weight.requires_grad
    model(torch.randn(1, 4, 4, 4, 4)).sum().backward()
    assert model.net.conv1.weight.grad is not None and model.mixing.delta.grad is not None


def test_release_restores_flags_and_weights() -> None:
    sds, fs = _sources(2)
    model = AdaptiveMerge(TinyNet(), sds, fs, LAYERS)
    _random_delta(model)
    state = model.materialize()
    net = model.release()
    assert all(p.requires_grad for p in net.parameters())
    for n, v in net.state_dict().items():
        assert torch.equal(v, state[n])


def test_construction_errors() -> None:
    sds, fs = _sources(2)
    with pytest.raises(ValueError, match="at least 2 source"):
        AdaptiveMerge(TinyNet(), sds[:1], fs[:1], LAYERS)
    with pytest.raises(ValueError, match=r"target network has no parameter.*'conv9\.weight'"):
        AdaptiveMerge(TinyNet(), sds, fs, {"conv9": ["conv9.weight"]})
    bad = [sds[0], {k: v for k, v in sds[1].items() if k != "conv2.bias"}]
    with pytest.raises(ValueError, match=r"sources\[1\] lacks .*'conv2\.bias'"):
        AdaptiveMerge(TinyNet(), bad, fs, LAYERS)
    bad = [sds[0], {**sds[1], "conv2.weight": torch.zeros(4, 4, 1, 1, 1)}]
    with pytest.raises(ValueError, match=r"'conv2\.weight'.*sources\[1\]"):
        AdaptiveMerge(TinyNet(), bad, fs, LAYERS)
    bad_f = [fs[0], {**fs[1], "conv1.bias": torch.ones(5)}]
    with pytest.raises(ValueError, match=r"fishers\[1\]\['conv1\.bias'\]"):
        AdaptiveMerge(TinyNet(), sds, bad_f, LAYERS)
    with pytest.raises(ValueError, match=r"layers is empty"):
        AdaptiveMerge(TinyNet(), sds, fs, {})


# ---------------------------------------------------------------------------------------- benchmark


def _timed(step: Callable[[], None]) -> float:
    # CPU time of this process, not wall time: on a shared 2-core machine other processes' load
    # otherwise dominates the difference being measured.
    t0 = time.process_time()
    step()
    return time.process_time() - t0


def benchmark(size: int = 32, width: int = 16, batch: int = 2, n: int = 15) -> dict[str, float]:
    """CPU seconds per forward+backward of a plain training step and of an adaption step, and their ratio.

    Steps alternate (plain, adaptive, plain, …) so that load from other processes hits both alike;
    the minimum over ``n`` steps is reported for each, and the ratio of the minima and of the medians.
    """
    torch.manual_seed(0)
    sds = [{k: v.clone() for k, v in TinyNet(2, width).state_dict().items()} for _ in range(2)]
    fs = [{k: torch.rand_like(v) for k, v in sd.items()} for sd in sds]
    plain = TinyNet(2, width)
    adaptive = AdaptiveMerge(TinyNet(2, width), sds, fs, LAYERS)
    x = torch.randn(batch, 2, size, size, size)
    y = torch.randint(0, 3, (batch, size, size, size))

    def step(model: nn.Module) -> None:
        for p in model.parameters():
            p.grad = None
        nn.functional.cross_entropy(model(x), y).backward()

    step(plain), step(adaptive)  # warm-up
    times: dict[str, list[float]] = {"plain": [], "adaptive": []}
    for _ in range(n):
        times["plain"].append(_timed(lambda: step(plain)))
        times["adaptive"].append(_timed(lambda: step(adaptive)))
    out = {k: min(v) for k, v in times.items()}
    out["ratio_min"] = out["adaptive"] / out["plain"]
    out["ratio_median"] = statistics.median(times["adaptive"]) / statistics.median(times["plain"])
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)  # one thread: process CPU time is then the step's cost, free of contention
    for size, width in [(16, 8), (32, 16), (48, 16)]:
        r = benchmark(size=size, width=width, n=20)
        print(
            f"{size}³ width {width}: plain {r['plain'] * 1e3:.1f} ms CPU/step, adaptive {r['adaptive'] * 1e3:.1f} ms CPU/step, "
            f"ratio of minima {r['ratio_min']:.3f}, of medians {r['ratio_median']:.3f} (threads={torch.get_num_threads()})"
        )
