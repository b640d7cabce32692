"""Empirical Fisher: equality with an independent brute-force loop, methods, options, files."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmerge.callbacks import FisherCallback
from tmerge.errors import RunError
from tmerge.fisher import compute_fisher_sums, empirical_fisher, fisher_problem, normalize_fisher
from tmerge.io import write_safetensors
from tmerge.nets import Isensee2017, partition
from tmerge.runs import load_fisher

N, C, K, S = 8, 2, 3, 4  # samples, input channels, classes, spatial size


def _net(dropout: float = 0.0, norm: str | None = None) -> nn.Module:
    torch.manual_seed(1)
    layers: list[nn.Module] = [nn.Conv3d(C, 4, 3, padding=1)]
    if norm == "instance":
        layers.append(nn.InstanceNorm3d(4, affine=True))
    elif norm == "batch":
        layers.append(nn.BatchNorm3d(4))
    layers += [nn.LeakyReLU(0.01), nn.Dropout3d(dropout), nn.Conv3d(4, K, 1)]
    net = nn.Sequential(*layers)
    if norm == "batch":  # non-trivial running statistics, used in eval mode
        net.train()
        with torch.no_grad():
            net(torch.randn(4, C, S, S, S) * 2 + 1)
    return net


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(N, C, S, S, S, generator=g), torch.randint(0, K, (N, S, S, S), generator=g)


def _batches(x: Tensor, y: Tensor, size: int, as_dict: bool) -> list:
    out = []
    for i in range(0, len(x), size):
        xb, yb = x[i : i + size], y[i : i + size]
        out.append({"image": xb, "label": yb} if as_dict else (xb, yb))
    return out


def _brute_force(net: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Reference written independently: plain .backward() on one sample at a time, in eval mode."""
    net.eval()
    acc = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for i in range(len(x)):
        net.zero_grad()
        F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in net.named_parameters():
            acc[n] += p.grad**2
    net.zero_grad()
    return {n: a / len(x) for n, a in acc.items()}


def _assert_close(a: dict[str, Tensor], b: dict[str, Tensor], rtol: float = 1e-5) -> None:
    assert list(a) == list(b)
    # Absolute slack relative to the largest entry overall: some entries are exactly zero in
    # theory (a conv bias before an instance norm) and only round-off in practice.
    scale = max(float(t.abs().max()) for t in b.values())
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=rtol * scale, msg=n)


@pytest.mark.parametrize("method", ["loop", "vmap"])
@pytest.mark.parametrize(("batch_size", "as_dict"), [(1, True), (3, False), (8, True)])
def test_equals_brute_force_for_any_batch_size(method: str, batch_size: int, as_dict: bool) -> None:
    net = _net(norm="instance")
    x, y = _data()
    ref = _brute_force(net, x, y)
    fisher = empirical_fisher(
        net, _batches(x, y, batch_size, as_dict), F.cross_entropy, method=method, chunk_size=3
    )
    _assert_close(fisher, ref)
    assert all(f.dtype == torch.float32 and f.device.type == "cpu" for f in fisher.values())


def test_torch_dataloader_and_max_samples() -> None:
    net = _net()
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    _assert_close(
        empirical_fisher(net, loader, F.cross_entropy, max_samples=5), _brute_force(net, x[:5], y[:5])
    )
    assert compute_fisher_sums(net, loader, F.cross_entropy, max_samples=5).count == 5


def test_squared_batch_gradient_is_not_the_fisher() -> None:
    """The known bug (square of the batch-mean gradient) gives a different answer: the test can fail."""
    net = _net()
    x, y = _data()
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    wrong = {n: p.grad**2 for n, p in net.named_parameters()}
    fisher = empirical_fisher(net, [(x, y)], F.cross_entropy)
    for n in fisher:
        assert not torch.allclose(fisher[n], wrong[n], rtol=1e-2), n
    with pytest.raises(AssertionError):
        _assert_close(fisher, wrong)


def test_loop_equals_vmap_on_isensee() -> None:
    net = Isensee2017(in_channels=C, n_classes=K, base_filters=4, depth=3, dropout=0.3)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, C, 8, 16, 16, generator=g), torch.randint(0, K, (3, 8, 16, 16), generator=g)
    fused, _ = partition(net)
    loop = compute_fisher_sums(net, [(x, y)], F.cross_entropy, names=fused, method="loop")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vmap must work (no fallback) with InstanceNorm3d and Dropout3d
        vmap = compute_fisher_sums(net, [(x, y)], F.cross_entropy, names=fused, method="vmap", chunk_size=2)
    assert (loop.method, vmap.method) == ("loop", "vmap")
    assert loop.count == vmap.count == 3
    assert list(loop.sums) == fused
    # Instance norm at a small bottleneck amplifies float32 round-off differently in the two
    # evaluation orders (they agree to ~1e-5 here; see the module docstring of tmerge.fisher).
    _assert_close(vmap.sums, loop.sums, rtol=1e-4)


def test_dropout_model_is_deterministic_and_modes_are_restored() -> None:
    net = _net(dropout=0.5)
    x, y = _data()
    net.train()
    net[0].eval()  # a sub-module deliberately in eval mode must stay so
    first = empirical_fisher(net, [(x, y)], F.cross_entropy, method="loop")
    second = empirical_fisher(net, [(x, y)], F.cross_entropy, method="vmap")
    _assert_close(first, second)
    assert net.training and net[3].training and not net[0].training
    _assert_close(first, _brute_force(net, x, y))  # eval mode: dropout off
    assert all(p.grad is None for p in net.parameters())


def test_batchnorm_in_eval_and_norm_free_models() -> None:
    x, y = _data()
    for norm in ("batch", None):
        net = _net(norm=norm)
        ref = _brute_force(net, x, y)
        _assert_close(empirical_fisher(net, [(x, y)], F.cross_entropy, method="vmap"), ref)
        _assert_close(empirical_fisher(net, [(x, y)], F.cross_entropy, method="loop"), ref)


def test_names_subset_and_frozen_parameters() -> None:
    net = _net(norm="instance")
    x, y = _data()
    net[0].weight.requires_grad_(False)
    default = empirical_fisher(net, [(x, y)], F.cross_entropy)
    assert "0.weight" not in default and "0.bias" in default
    chosen = empirical_fisher(net, [(x, y)], F.cross_entropy, names=["4.weight", "0.weight"])
    assert list(chosen) == ["4.weight", "0.weight"]
    net[0].weight.requires_grad_(True)
    ref = _brute_force(net, x, y)
    _assert_close(chosen, {n: ref[n] for n in chosen})
    with pytest.raises(ValueError, match="missing.weight"):
        empirical_fisher(net, [(x, y)], F.cross_entropy, names=["missing.weight"])


def test_vmap_failure_falls_back_to_the_loop_with_a_warning() -> None:
    net = _net()
    x, y = _data()

    def branching_loss(out: Tensor, target: Tensor) -> Tensor:
        loss = F.cross_entropy(out, target)
        return loss * 2 if loss.item() > 0 else loss  # data-dependent: no vmap

    with pytest.warns(RuntimeWarning, match="falling back"):
        result = compute_fisher_sums(net, [(x, y)], branching_loss, method="vmap")
    assert result.method == "loop" and result.count == N
    ref = _brute_force(net, x, y)
    _assert_close({n: s / N for n, s in result.sums.items()}, {n: 4 * r for n, r in ref.items()})


def test_normalisation_options() -> None:
    net = _net()
    x, y = _data()
    raw = empirical_fisher(net, [(x, y)], F.cross_entropy)
    by_sum = empirical_fisher(net, [(x, y)], F.cross_entropy, normalize="sum")
    by_l2 = empirical_fisher(net, [(x, y)], F.cross_entropy, normalize="l2")
    assert sum(float(f.sum()) for f in by_sum.values()) == pytest.approx(1.0, rel=1e-5)
    assert sum(float(f.square().sum()) for f in by_l2.values()) == pytest.approx(1.0, rel=1e-5)
    total = sum(float(f.sum()) for f in raw.values())
    _assert_close(by_sum, {n: f / total for n, f in raw.items()})
    with pytest.raises(ValueError, match="'max'"):
        empirical_fisher(net, [(x, y)], F.cross_entropy, normalize="max")
    with pytest.raises(ValueError, match="total is 0"):
        normalize_fisher({"a": torch.zeros(3)}, "sum")


def test_per_tensor_normalisation_by_hand() -> None:
    # Each tensor divided by its own sum (the authors' code): [1, 3] -> [0.25, 0.75],
    # [[2, 2], [4, 0]] -> [[0.25, 0.25], [0.5, 0]]; an all-zero tensor stays zero.
    fisher = {
        "a": torch.tensor([1.0, 3.0]),
        "b": torch.tensor([[2.0, 2.0], [4.0, 0.0]]),
        "z": torch.zeros(2),
    }
    out = normalize_fisher(fisher, "per_tensor")
    assert torch.equal(out["a"], torch.tensor([0.25, 0.75]))
    assert torch.equal(out["b"], torch.tensor([[0.25, 0.25], [0.5, 0.0]]))
    assert torch.equal(out["z"], torch.zeros(2))
    assert torch.equal(fisher["a"], torch.tensor([1.0, 3.0]))  # the input is not modified
    # Scale-invariant per tensor: a model whose Fisher is 1000x larger merges with the same weight.
    scaled = normalize_fisher({k: 1000 * v for k, v in fisher.items()}, "per_tensor")
    for k in fisher:
        assert torch.allclose(scaled[k], out[k])


def test_bad_arguments() -> None:
    net = _net()
    x, y = _data()
    with pytest.raises(ValueError, match="'fast'"):
        empirical_fisher(net, [(x, y)], F.cross_entropy, method="fast")
    with pytest.raises(ValueError, match="no samples"):
        empirical_fisher(net, [], F.cross_entropy)
    with pytest.raises(ValueError, match="scalar"):
        empirical_fisher(net, [(x, y)], lambda o, t: F.cross_entropy(o, t, reduction="none"), method="loop")
    with pytest.raises(ValueError, match="'image' and 'label'"):
        empirical_fisher(net, [{"x": x, "y": y}], F.cross_entropy)


def test_load_fisher_roundtrip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "fisher.safetensors"
    write_safetensors(path, {"b.bias": torch.zeros(4), "a.weight": torch.ones(2, 3, dtype=torch.float64)})
    loaded = load_fisher(path)
    assert list(loaded) == ["a.weight", "b.bias"] and loaded["a.weight"].dtype == torch.float32
    with pytest.raises(RunError, match=r"nothere\.safetensors.*not found"):
        load_fisher(tmp_path / "nothere.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(RunError, match=r"garbage\.safetensors.*not a readable"):
        load_fisher(garbage)


def test_fisher_problem_names_the_first_fault() -> None:
    shapes = {"a": (2,), "b.weight": (2,)}
    assert fisher_problem({"a": torch.ones(2), "b.weight": torch.zeros(2)}, shapes, "f") is None
    assert fisher_problem({"a": torch.ones(2)}, shapes, "f") == "f lacks 1 expected parameter(s), e.g. 'b.weight'"
    wrong = fisher_problem({"a": torch.ones(2), "b.weight": torch.ones(3)}, shapes, "f")
    assert wrong is not None and wrong.startswith("f['b.weight'] has shape (3,), expected the parameter's shape (2,)")
    nan = fisher_problem({"a": torch.ones(2), "b.weight": torch.tensor([1.0, float("nan")])}, shapes, "f")
    assert nan is not None and "f['b.weight'] has NaN or infinite" in nan and "got 1 of 2 non-finite" in nan
    # Entries beyond the expected names are checked too (a Fisher covers more than is merged).
    negative = fisher_problem({"a": torch.ones(2), "b.weight": torch.ones(2), "c": -torch.ones(1)}, shapes, "f")
    assert negative == "f['c'] has negative entries; a diagonal Fisher is ≥ 0, got min -1"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"normalize": "mean"}, "'mean'"),
        ({"method": "jit"}, "'jit'"),
        ({"max_samples": 0}, "0"),
        ({"filename": "fisher.pt"}, "'fisher.pt'"),
        ({"names": "conv.weight"}, "'conv.weight'"),
        ({"num_workers": -1}, "-1"),
    ],
)
def test_callback_validates_its_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FisherCallback(**kwargs)


def test_the_fisher_options_are_validated_once() -> None:
    """The functions, the callback and the configs refuse an option with one message, the
    configs naming their key."""
    from tmerge.errors import ConfigError
    from tmerge.stages.configs import FisherConfig, MergeFisherConfig

    said = "normalize: expected one of none, sum, l2, per_tensor, got 'max'"
    net, x, y = _net(), torch.randn(1, C, S, S, S), torch.randint(0, K, (1, S, S, S))
    for refuse in (
        lambda: normalize_fisher({}, "max"),
        lambda: empirical_fisher(net, [(x, y)], F.cross_entropy, normalize="max"),
        lambda: FisherCallback(normalize="max"),
    ):
        with pytest.raises(ValueError, match=f"^{said}$"):
            refuse()
    for config in (FisherConfig, MergeFisherConfig):
        with pytest.raises(ConfigError, match=f"^fisher.{said}$"):
            config(normalize="max")
    with pytest.raises(ConfigError, match="^fisher.method: expected one of auto, loop, vmap, compile, got 'jit'$"):
        FisherConfig(method="jit")


# --------------------------------------------------------------------------------------------
# FisherCallback end to end (a subprocess per run, so that Lightning's DDP launcher can re-run it)
# --------------------------------------------------------------------------------------------

_WORKER = Path(__file__).parent / "helpers" / "fisher_ddp_worker.py"


def _run_worker(out: Path, devices: int):
    """Train with FisherCallback: in this process for one device, as a subprocess for DDP."""
    import os
    import subprocess
    import sys

    from helpers import fisher_ddp_worker as worker

    if devices == 1:
        worker.main(out, 1)
        return worker
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "PYTHONWARNINGS": "ignore"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(_WORKER), str(out), str(devices)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return worker


def _single_process_fisher(worker, checkpoint: str) -> dict[str, Tensor]:
    net = worker.make_net()
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})
    loader = torch.utils.data.DataLoader(worker.make_dataset(), batch_size=3)
    return empirical_fisher(net, loader, worker.sample_loss, method="loop")


def _check_run(out: Path, devices: int) -> None:
    import json

    worker = _run_worker(out, devices)
    info = json.loads((out / "info.json").read_text())
    assert info["world"] == devices and info["best"] != info["last"]
    # The callback left the best weights in the module and says which checkpoint they are from.
    assert info["fisher_best_path"] == info["best"] and info["module_holds_best"]
    stored = load_fisher(out / "fisher.safetensors")
    written = {n: stored[n] for n, _ in worker.make_net().named_parameters()}
    from safetensors import safe_open

    with safe_open(str(out / "fisher.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["samples"] == str(worker.N_SAMPLES) and meta["world_size"] == str(devices)
    assert meta["checkpoint"] == info["best"] and meta["normalize"] == "none" and meta["method"] == "vmap"
    assert float(meta["seconds"]) > 0
    # Same numbers as one process on the best checkpoint (and not the final weights).
    _assert_close(written, _single_process_fisher(worker, info["best"]))
    last = _single_process_fisher(worker, info["last"])
    assert any(not torch.allclose(written[n], last[n], rtol=1e-3) for n in written)


def test_callback_single_process(tmp_path: Path) -> None:
    _check_run(tmp_path, devices=1)


def test_callback_contract_errors() -> None:
    from types import SimpleNamespace

    callback = FisherCallback()
    module = SimpleNamespace(net=nn.Linear(2, 2), sample_loss=F.mse_loss)
    # A module or datamodule that breaks the contract is a programming error, not the user's.
    with pytest.raises(TypeError, match="'net'.*got NoneType"):
        callback.on_train_end(SimpleNamespace(datamodule=None), SimpleNamespace())
    with pytest.raises(TypeError, match="sample_loss"):
        callback.on_train_end(SimpleNamespace(datamodule=None), SimpleNamespace(net=nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="fisher_dataset"):
        callback.on_train_end(SimpleNamespace(datamodule=object()), module)
    with pytest.raises(TypeError, match="map-style Dataset with __len__, got generator"):
        data = SimpleNamespace(fisher_dataset=lambda: (x for x in ()))
        callback.on_train_end(SimpleNamespace(datamodule=data), module)


def test_callback_refuses_an_empty_fisher_dataset(tmp_path: Path) -> None:
    from types import SimpleNamespace

    data = SimpleNamespace(fisher_dataset=lambda: [])
    trainer = SimpleNamespace(
        datamodule=data,
        checkpoint_callback=None,  # no best checkpoint: the module keeps its weights
        global_rank=0,
        world_size=1,
        precision="32-true",
        is_global_zero=True,
        strategy=SimpleNamespace(reduce=lambda t, reduce_op: t),
        default_root_dir=str(tmp_path),
    )
    module = SimpleNamespace(net=nn.Linear(2, 2), sample_loss=F.mse_loss, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"Fisher dataset of SimpleNamespace is empty; got 0 samples"):
        FisherCallback().on_train_end(trainer, module)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_callback_ddp_two_processes_equals_single_process(tmp_path: Path) -> None:
    _check_run(tmp_path, devices=2)


# --------------------------------------------------------------------------------------------
# Fast paths: autocast, compiled loop, method choice, chunk size, timing
# --------------------------------------------------------------------------------------------


def _rel_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    scale = max(float(t.abs().max()) for t in b.values())
    return max(float((a[n] - b[n]).abs().max()) for n in b) / scale


def test_bf16_autocast_vmap_works_and_matches_the_loop() -> None:
    """vmap under bf16 autocast used to fail ("expected scalar type BFloat16 but found Float" in
    instance norm's batched backward); parameters now enter in the autocast dtype."""
    net = _net(norm="instance")  # conv → instance norm is the layer pair that failed
    x, y = _data()
    reference = compute_fisher_sums(net, [(x, y)], F.cross_entropy, method="loop")
    results = {}
    for method in ("loop", "vmap"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback
            results[method] = compute_fisher_sums(
                net, [(x, y)], F.cross_entropy, method=method, autocast_dtype=torch.bfloat16
            )
        assert results[method].method == method and results[method].precision == "bfloat16"
        assert all(s.dtype == torch.float32 for s in results[method].sums.values())  # fp32 accumulation
        # bf16 keeps 8 bits of mantissa: ~1e-2 from the float32 Fisher, relative to its largest entry.
        assert _rel_diff(results[method].sums, reference.sums) < 5e-2
    assert _rel_diff(results["vmap"].sums, results["loop"].sums) < 1e-2
    assert all(p.dtype == torch.float32 for p in net.parameters())  # the casts were not in place


def test_ambient_autocast_is_used_unless_float32_is_asked_for() -> None:
    net = _net(norm="instance")
    x, y = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ambient = compute_fisher_sums(net, [(x, y)], F.cross_entropy, method="vmap")
        forced = compute_fisher_sums(net, [(x, y)], F.cross_entropy, method="vmap", autocast_dtype=torch.float32)
    assert (ambient.method, ambient.precision) == ("vmap", "bfloat16")
    assert forced.precision == "float32"
    _assert_close({n: s / N for n, s in forced.sums.items()}, _brute_force(net, x, y))


def test_compiled_loop_equals_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled loop's graph capture (dynamo + AOT autograd, under autocast or not) gives the
    loop's numbers. The code-generating backend is swapped for ``aot_eager``: Inductor's C++
    build takes minutes on a loaded 2-core CPU, and tests/test_fastpath.py compiles for real."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    net = _net(norm="instance")
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        compiled = compute_fisher_sums(net, [(x, y)], F.cross_entropy, method="compile")
        bf16 = compute_fisher_sums(net, [(x, y)], F.cross_entropy, method="compile", autocast_dtype=torch.bfloat16)
        bf16_loop = compute_fisher_sums(net, [(x, y)], F.cross_entropy, method="loop", autocast_dtype=torch.bfloat16)
    assert (bf16.method, bf16.precision) == ("compile", "bfloat16")
    assert _rel_diff(bf16.sums, bf16_loop.sums) < 1e-2
    assert compiled.method == "compile" and compiled.count == N
    _assert_close({n: s / N for n, s in compiled.sums.items()}, _brute_force(net, x, y))


def test_compile_failure_falls_back_to_the_eager_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("no C compiler\nlong compiler log")

        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    net = _net()
    x, y = _data()
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(RuntimeError: no C compiler\); falling back"):
        result = compute_fisher_sums(net, [(x, y)], F.cross_entropy, method="compile")
    assert result.method == "loop" and result.count == N
    _assert_close({n: s / N for n, s in result.sums.items()}, _brute_force(net, x, y))


def test_auto_method_rule() -> None:
    from tmerge.fisher import COMPILE_COST_S, COMPILE_SAVING_S_PER_VOXEL, auto_method, compile_pays

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    small, large = torch.zeros(4, 32, 32, 32), torch.zeros(4, 128, 128, 128)
    assert auto_method(small, cpu, 10_000) == "vmap"
    assert auto_method(large, cpu, 10_000) == "loop"  # never compiles on CPU (minutes per compile)
    assert auto_method(small, cuda, 18) == "vmap"
    assert auto_method(large, cuda, 18) == "loop"  # 18 volumes do not repay compiling
    needed = math.ceil(COMPILE_COST_S / (128**3 * COMPILE_SAVING_S_PER_VOXEL))
    assert auto_method(large, cuda, needed) == "compile" and not compile_pays(needed - 1, 128**3)
    assert auto_method(large, cuda, None) == "loop"  # unknown length: no compile


def test_vmap_chunk_size_from_memory() -> None:
    from tmerge.fisher import vmap_chunk_size

    gib = 2**30
    assert vmap_chunk_size(3 * gib, 18 * gib) == 3  # half of 18 GiB in 3 GiB samples
    assert vmap_chunk_size(3 * gib, 1 * gib) == 1  # never below one
    assert vmap_chunk_size(1, 80 * gib) == 4  # capped at the largest chunk measured
    assert vmap_chunk_size(0, gib, cap=2) == 2


def test_timing_and_log_line() -> None:
    import logging

    net = _net()
    x, y = _data()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("tmerge")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        result = compute_fisher_sums(net, [(x, y)], F.cross_entropy, method="loop")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert result.seconds > 0 and result.volumes_per_s == pytest.approx(N / result.seconds)
    assert any("volumes/s" in r.getMessage() and "8 volume(s)" in r.getMessage() for r in records)


def test_autocast_follows_the_trainer_precision() -> None:
    from tmerge.fisher import autocast_for

    assert autocast_for("bf16-mixed") is torch.bfloat16
    assert autocast_for("16-mixed") is None  # float16 gradients would underflow
    assert autocast_for("32-true") is None
