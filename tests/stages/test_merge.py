"""``tmerge merge RECIPE.yaml``: recipe-driven merges of MONAI UNets and of M1 + M2-like runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from monai.networks.nets import UNet
from safetensors.torch import load_file

from tmerge.cli import main
from tmerge.fisher import normalize_fisher
from tmerge.io import file_sha256, write_safetensors
from tmerge.merge import imm_merge
from tmerge.merge.task_vectors import task_arithmetic, ties
from tmerge.nets import Isensee2017, partition
from tmerge.runs import FISHER_FILE, NET_FILE, save_net


def unet(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=1)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def save(path: Path, state: dict[str, torch.Tensor]) -> Path:
    write_safetensors(path, state)
    return path


def recipe(path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump(keys))
    return path


def test_ties_of_two_monai_unets_with_a_layer_override(tmp_path, capsys):
    base, a, b = unet(0), unet(1), unet(2)
    files = [save(tmp_path / f"{n}.safetensors", s) for n, s in (("base", base), ("a", a), ("b", b))]
    out = tmp_path / "merged" / "ties.safetensors"
    r = recipe(
        tmp_path / "r.yaml",
        method="ties",
        models=[str(files[1]), str(files[2])],
        base=str(files[0]),
        params={"k": 50, "lam": 0.8},
        overrides=[{"match": "model.0.*", "params": {"k": 100}}],
        output=str(out),
    )
    assert main(["merge", str(r)]) == 0
    merged = load_file(str(out))
    early = [n for n in base if n.startswith("model.0.")]
    rest = {n: base[n] for n in base if n not in early}
    expect = ties([{n: s[n] for n in rest} for s in (a, b)], rest, k=50, lam=0.8)
    expect.update(
        ties([{n: s[n] for n in early} for s in (a, b)], {n: base[n] for n in early}, k=100, lam=0.8)
    )
    assert set(merged) == set(base) and early
    for n, v in expect.items():
        torch.testing.assert_close(merged[n], v, msg=n)
    record = json.loads((tmp_path / "merged" / "ties.safetensors.json").read_text())
    assert record["method"] == "ties" and record["params"] == {"k": 50, "lam": 0.8, "trim": "tensor"}
    assert record["overrides"] == [{"match": "model.0.*", "params": {"k": 100, "lam": 0.8, "trim": "tensor"}}]
    assert [m["sha256"] for m in record["models"]] == [file_sha256(files[1]), file_sha256(files[2])]
    assert record["base"]["sha256"] == file_sha256(files[0]) and record["output"]["sha256"] == file_sha256(
        out
    )


def test_command_line_overrides_the_recipe(tmp_path):
    base, a = unet(0), unet(1)
    fb, fa = save(tmp_path / "base.safetensors", base), save(tmp_path / "a.safetensors", a)
    r = recipe(
        tmp_path / "r.yaml",
        method="ties",
        models=[str(fa)],
        base=str(fb),
        output=str(tmp_path / "o.safetensors"),
    )
    assert main(["merge", str(r), "method=task-arithmetic", "params.lam=1.0"]) == 0
    merged = load_file(str(tmp_path / "o.safetensors"))
    for n, v in task_arithmetic([a], base, lam=1.0).items():
        assert torch.equal(merged[n], v), n  # one model, λ = 1: the model itself
        assert torch.equal(merged[n], a[n]), n


def test_ties_trim_model_ranks_the_whole_recipe(tmp_path):
    """params.trim=model: one threshold over all the tensors merged (here every tensor of two
    MONAI UNets), which differs from the per-tensor default."""
    base, a, b = unet(0), unet(1), unet(2)
    files = [save(tmp_path / f"{n}.safetensors", s) for n, s in (("base", base), ("a", a), ("b", b))]
    merged = {}
    for scope in ("tensor", "model"):
        out = tmp_path / f"{scope}.safetensors"
        r = recipe(
            tmp_path / "r.yaml",
            method="ties",
            models=[str(files[1]), str(files[2])],
            base=str(files[0]),
            params={"k": 20, "trim": scope},
            output=str(out),
        )
        assert main(["merge", str(r)]) == 0
        merged[scope] = load_file(str(out))
        for n, v in ties([a, b], base, k=20, trim=scope).items():
            assert torch.equal(merged[scope][n], v), n
    assert any(not torch.equal(merged["tensor"][n], merged["model"][n]) for n in base)


def source_run(root: Path, name: str, seed: int) -> tuple[dict, dict]:
    """A run folder like task1/task2: net.safetensors (with its Fisher's hash) and fisher.safetensors."""
    torch.manual_seed(seed)
    net = Isensee2017(2, 8, base_filters=2, depth=2, dropout=0.0)
    for p in net.parameters():
        p.data.normal_()
    fused, _ = partition(net)
    fisher = {n: torch.rand_like(dict(net.named_parameters())[n]) for n in fused}
    run = root / name
    write_safetensors(run / FISHER_FILE, fisher)
    save_net(run / NET_FILE, net, {"arch": "Isensee2017", "fisher_sha256": file_sha256(run / FISHER_FILE)})
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, fisher


def test_imm_of_two_runs_by_their_fishers(tmp_path):
    (s1, f1), (s2, f2) = source_run(tmp_path, "task1", 1), source_run(tmp_path, "task2", 2)
    out = tmp_path / "imm.safetensors"
    r = recipe(
        tmp_path / "r.yaml",
        method="imm",
        models=[str(tmp_path / "task1"), str(tmp_path / "task2")],
        output=str(out),
    )
    assert main(["merge", str(r)]) == 0
    merged = load_file(str(out))
    n1, n2 = normalize_fisher(f1, "per_tensor"), normalize_fisher(f2, "per_tensor")
    eps = 1e-8 * float(
        sum(v.double().sum() for f in (n1, n2) for v in f.values())
        / sum(v.numel() for f in (n1, n2) for v in f.values())
    )
    half = torch.tensor([0.5, 0.5])
    weighted = imm_merge([s1, s2], [n1, n2], half, names=list(f1), eps=eps)
    for n, v in weighted.items():
        torch.testing.assert_close(merged[n], v, msg=n)
    # Norms and heads have no Fisher: averaged (unit Fishers), and the record says which.
    record = json.loads((tmp_path / "imm.safetensors.json").read_text())
    norm = next(n for n in s1 if "norm" in n)
    torch.testing.assert_close(merged[norm], (s1[norm] + s2[norm]) / 2)
    assert norm in record["without_fisher"] and not set(record["without_fisher"]) & set(f1)


def test_every_mismatch_is_one_error_and_nothing_is_written(tmp_path, capsys):
    a, b = unet(1), unet(2)
    fa = save(tmp_path / "a.safetensors", a)
    missing = save(tmp_path / "missing.safetensors", {k: v for k, v in b.items() if k != next(iter(b))})
    other_shape = save(tmp_path / "shape.safetensors", {**b, next(iter(b)): torch.zeros(3)})
    other_dtype = save(tmp_path / "dtype.safetensors", {k: v.double() for k, v in b.items()})
    out = tmp_path / "out.safetensors"
    cases = [
        ([str(fa), str(missing)], "mean-imm", {}, "model 1 lacks"),
        ([str(fa), str(other_shape)], "mean-imm", {}, "has shape (3,) in model 1"),
        ([str(fa), str(other_dtype)], "slerp", {}, "dtype torch.float64 in model 1"),
        ([str(fa), str(fa), str(fa)], "slerp", {}, "slerp merges exactly 2 models, got 3"),
        ([str(fa), str(fa)], "slerp", {"lam": 1}, "slerp takes t; unknown lam"),
        ([str(fa), str(tmp_path / "nope.safetensors")], "mean-imm", {}, "nope.safetensors does not exist"),
        ([str(fa)], "ties", {}, "needs the models' common base"),
    ]
    for models, method, params, message in cases:
        r = recipe(tmp_path / "r.yaml", method=method, models=models, params=params, output=str(out))
        assert main(["merge", str(r)]) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists() and not (tmp_path / "out.safetensors.json").exists()


def test_a_fisher_of_other_weights_is_refused(tmp_path, capsys):
    source_run(tmp_path, "task1", 1)
    source_run(tmp_path, "task2", 2)
    # task2's Fisher replaced by task1's: shapes agree, but not the hash its weights recorded.
    (tmp_path / "task2" / FISHER_FILE).write_bytes((tmp_path / "task1" / FISHER_FILE).read_bytes())
    out = tmp_path / "imm.safetensors"
    r = recipe(
        tmp_path / "r.yaml",
        method="imm",
        models=[str(tmp_path / "task1"), str(tmp_path / "task2")],
        output=str(out),
    )
    assert main(["merge", str(r)]) == 2
    assert "not the Fisher computed for" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    "method", ["imm", "mean-imm", "task-arithmetic", "ties", "dare", "dare-ties", "slerp"]
)
def test_example_recipes_name_known_methods(method):
    path = Path(__file__).resolve().parents[2] / "experiments" / "merge" / f"{method}.yaml"
    content = yaml.safe_load(path.read_text())
    assert content["method"] == method and len(content["models"]) == 2 and content["output"]


def test_parameter_values_out_of_range_are_refused_before_loading(tmp_path, capsys):
    base, a = unet(0), unet(1)
    fb, fa = save(tmp_path / "base.safetensors", base), save(tmp_path / "a.safetensors", a)
    out = tmp_path / "o.safetensors"
    for method, params, message in (
        ("ties", {"k": 0}, "params: ties: k must be a percentage in (0, 100], got 0"),
        ("dare", {"p": 1.0}, "params: dare: p must be a drop probability in [0, 1), got 1.0"),
        ("ties", {"trim": "layer"}, "params: ties: trim must be one of tensor, model, got 'layer'"),
    ):
        r = recipe(
            tmp_path / "r.yaml", method=method, models=[str(fa)], base=str(fb), params=params, output=str(out)
        )
        assert main(["merge", str(r)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not out.exists()


def test_imm_eps_does_not_depend_on_the_override_groups(tmp_path):
    """An override that changes nothing gives the same merge: ε is on the scale of all Fishers."""
    source_run(tmp_path, "task1", 1)
    source_run(tmp_path, "task2", 2)
    models = [str(tmp_path / "task1"), str(tmp_path / "task2")]
    plain, split = tmp_path / "plain.safetensors", tmp_path / "split.safetensors"
    assert (
        main(
            [
                "merge",
                str(
                    recipe(
                        tmp_path / "a.yaml",
                        method="imm",
                        models=models,
                        params={"eps": 0.5},
                        output=str(plain),
                    )
                ),
            ]
        )
        == 0
    )
    r = recipe(
        tmp_path / "b.yaml",
        method="imm",
        models=models,
        params={"eps": 0.5},
        overrides=[{"match": "encoder.0.*", "params": {}}],
        output=str(split),
    )
    assert main(["merge", str(r)]) == 0
    a, b = load_file(str(plain)), load_file(str(split))
    for n in a:
        torch.testing.assert_close(a[n], b[n], msg=n)
