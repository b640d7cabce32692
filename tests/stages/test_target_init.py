"""Target initialisations on equal terms: S after every registered init under both
``transfer.specific`` settings, the δ learning rate, and the seeded train/val draws."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from tmerge.data.splits import brats_splits
from tmerge.errors import ConfigError
from tmerge.merge import AdaptiveMerge, imm_merge
from tmerge.merge.imm import fisher_epsilon
from tmerge.merge.methods import METHODS
from tmerge.modules.segmentation import OptimConfig, SegmentationModule, param_groups
from tmerge.nets import Isensee2017, head_names, layer_groups, partition
from tmerge.sources import Source
from tmerge.stages.configs import TargetStageConfig, TransferConfig, VectorMergeConfig
from tmerge.stages.inits import INITS, initialise, vector_candidates
from tmerge.stages.target import run_config


def build(in_channels: int = 4, n_classes: int = 3) -> torch.nn.Module:
    return Isensee2017(in_channels, n_classes, base_filters=2, depth=2, dropout=0.0)


def source(seed: int) -> Source:
    """A source of 2 input channels (as HCP) with every tensor, norms included, set at random. It
    has as many outputs as the target, so that its heads fit and only the rule keeps them out."""
    torch.manual_seed(seed)
    net = build(in_channels=2, n_classes=3)
    state = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    fused, _ = partition(net)
    fisher = {n: torch.rand_like(state[n]) + 0.1 for n in fused}
    return Source(f"task{seed}", state, {}, fisher)


@pytest.mark.parametrize("specific", ["reinit", "keep"])
@pytest.mark.parametrize("name", list(INITS))
def test_specific_parameters_after_every_init(name: str, specific: str) -> None:
    sources = [source(1), source(2)]
    cfg = TargetStageConfig(init=name, transfer=TransferConfig(specific=specific))
    init = INITS[name]
    torch.manual_seed(0)
    fresh = build().state_dict()
    torch.manual_seed(0)
    net = build()
    used = sources if init.merges else sources[:1]
    used_any = bool(init.sources(TargetStageConfig()))  # none: no source at all
    base = source(0).state if init.base else None
    start = initialise(cfg, init, net, used, base)
    _, spec = partition(net)
    heads = set(head_names(net, spec))
    norms = [n for n in spec if n not in heads]
    state = start.net.state_dict()
    assert norms and heads
    for n in heads:  # always re-created for the target's classes
        assert torch.equal(state[n], fresh[n]), n
    for n in norms:
        if specific == "reinit" or not used_any:
            expected = fresh[n]  # γ = 1, β = 0, exactly as built
        elif not init.merges:
            expected = used[0].state[n]
        else:  # merges: the mean of the sources' norms
            expected = (used[0].state[n] + used[1].state[n]) / 2
        torch.testing.assert_close(state[n], expected, msg=f"{name}/{specific}: {n}")
    kept_expected = [] if specific == "reinit" or not used_any else norms
    assert sorted(start.specific_kept) == sorted(kept_expected)


def test_merged_inits_normalise_fishers_and_mean_variants_have_none() -> None:
    sources = [source(1), source(2)]
    for name in ("imm", "timm"):
        start = initialise(TargetStageConfig(init=name), INITS[name], build(), sources)
        assert start.fishers is not None and start.layers
        for f, s in zip(start.fishers, sources, strict=True):
            for n, v in f.items():  # per_tensor (the default): every tensor sums to 1
                assert float(v.sum()) == pytest.approx(1.0, rel=1e-5), n
                torch.testing.assert_close(v, s.fisher[n] / s.fisher[n].sum())
    for name in ("mean-imm", "mean-timm"):
        assert initialise(TargetStageConfig(init=name), INITS[name], build(), sources).fishers is None
    # The first convolution (2 HCP channels vs 4) is never among the merged layers.
    start = initialise(TargetStageConfig(init="timm"), INITS["timm"], build(), sources)
    assert (
        "encoder.0.conv.conv" not in start.layers
        and len(start.layers) == len(layer_groups(build(), partition(build())[0])) - 1
    )


@pytest.mark.parametrize("name", ["imm", "mean-imm"])
def test_imm_inits_are_eq2_with_uniform_alpha_and_the_runs_eps(name: str) -> None:
    """Through the methods' table, P is exactly eq. 2 at uniform α with ε = adaption.eps × the
    mean entry of the normalised Fishers (all of them), the ε T-IMM adapts with."""
    sources = [source(1), source(2)]
    start = initialise(TargetStageConfig(init=name), INITS[name], build(), sources)
    eps = fisher_epsilon(start.fishers, TargetStageConfig().adaption.eps)
    assert start.eps == eps
    expected = imm_merge(
        [s.state for s in sources], start.fishers, torch.tensor([0.5, 0.5]), layers=start.layers, eps=eps
    )
    state = start.net.state_dict()
    for n, v in expected.items():
        assert torch.equal(state[n], v), n


@pytest.mark.parametrize("name", ["task-arithmetic", "ties", "dare", "dare-ties", "slerp"])
def test_task_vector_inits_merge_p_by_their_method(name: str) -> None:
    """P is the method's merge of the sources (θ₀ = the base) on the mergeable layers; the first
    convolution (2 HCP channels vs 4) keeps its fresh initialisation."""
    sources, base = [source(1), source(2)], source(0).state
    cfg = TargetStageConfig(init=name)
    torch.manual_seed(0)
    fresh = build().state_dict()
    torch.manual_seed(0)
    start = initialise(cfg, INITS[name], build(), sources, base)
    state = start.net.state_dict()
    names = [n for ns in start.layers.values() for n in ns]
    params = vector_candidates(cfg, name)[0]
    expected = METHODS[name].run(
        [{n: s.state[n] for n in names} for s in sources], {n: base[n] for n in names}, None, **params
    )
    for n in names:
        torch.testing.assert_close(state[n], expected[n], msg=n)
    assert torch.equal(state["encoder.0.conv.conv.weight"], fresh["encoder.0.conv.conv.weight"])


def test_ties_init_trims_over_all_merged_layers_with_merge_trim_model() -> None:
    """merge.trim=model: one threshold over every tensor of P (the merged layers), as
    :func:`tmerge.merge.task_vectors.ties` computes it, and not the per-tensor result."""
    from tmerge.merge.task_vectors import ties

    sources, base = [source(1), source(2)], source(0).state
    states = {}
    for scope in ("tensor", "model"):
        cfg = TargetStageConfig(init="ties", merge=VectorMergeConfig(trim=scope))
        start = initialise(cfg, INITS["ties"], build(), sources, base)
        names = [n for ns in start.layers.values() for n in ns]
        expected = ties(
            [{n: s.state[n] for n in names} for s in sources], {n: base[n] for n in names}, trim=scope
        )
        states[scope] = start.net.state_dict()
        for n in names:
            torch.testing.assert_close(states[scope][n], expected[n], msg=n)
    assert any(not torch.equal(states["tensor"][n], states["model"][n]) for n in names)


def test_vector_candidates_are_the_grid_of_the_methods_parameters() -> None:
    cfg = TargetStageConfig(merge=VectorMergeConfig(lam=[0.5, 1.0], k=[10.0, 20.0, 50.0], seed=3))
    ties_grid = vector_candidates(cfg, "ties")
    assert len(ties_grid) == 6 and {"k": 10.0, "lam": 0.5, "trim": "tensor"} in ties_grid
    # merge.trim is one value for every candidate, not a grid
    model = TargetStageConfig(merge=VectorMergeConfig(k=[10.0, 20.0], trim="model"))
    assert {c["trim"] for c in vector_candidates(model, "dare-ties")} == {"model"}
    assert vector_candidates(cfg, "dare") == [
        {"p": 0.5, "lam": 0.5, "seed": 3},
        {"p": 0.5, "lam": 1.0, "seed": 3},
    ]
    assert vector_candidates(cfg, "slerp") == [{"t": 0.5}]
    with pytest.raises(ConfigError, match="merge.lam: expected a list of one value or a small grid"):
        VectorMergeConfig(lam=[])


def test_vector_merge_values_are_checked_when_the_config_is_made() -> None:
    for key, value, expected in (
        ("k", [0.0], "merge.k: k must be a percentage in (0, 100], got 0.0"),
        ("p", [0.5, 1.0], "merge.p: p must be a drop probability in [0, 1), got 1.0"),
        ("t", [2.0], "merge.t: t must be a number in [0, 1], got 2.0"),
        ("trim", "layer", "merge.trim: trim must be one of tensor, model, got 'layer'"),
    ):
        with pytest.raises(ConfigError, match=re.escape(expected)):
            VectorMergeConfig(**{key: value})


def test_transfer_specific_is_validated() -> None:
    with pytest.raises(ConfigError, match="transfer.specific: expected one of reinit, keep, got 'copy'"):
        TransferConfig(specific="copy")


def test_param_groups_split_by_prefix() -> None:
    a, b, frozen = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    frozen.requires_grad_(False)
    groups = param_groups(
        [("net.w", a), ("net.mixing.delta", b), ("net.p", frozen)], 1e-3, 1e-5, {"net.mixing.": 0.1}
    )
    assert [g["name"] for g in groups] == ["default", "net.mixing."]
    assert groups[0]["params"] == [a] and groups[0]["lr"] == 1e-3 and groups[0]["weight_decay"] == 1e-5
    assert groups[1]["params"] == [b] and groups[1]["lr"] == 0.1 and groups[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="no trainable parameter under the prefix"):
        param_groups([("net.w", a)], 1e-3, 0.0, {"net.mixng.": 0.1})


def test_delta_moves_by_its_own_learning_rate() -> None:
    """Adam moves a parameter with a constant gradient by exactly lr per step (bias-corrected
    moments: m̂/√v̂ = sign g); so after k steps δ has moved k·delta_lr and S k·lr."""
    torch.manual_seed(0)
    net = build(in_channels=2, n_classes=2)
    fused, specific = partition(net)
    layers = layer_groups(net, fused)
    states = [{k: torch.randn_like(v) for k, v in net.state_dict().items()} for _ in range(2)]
    adaptive = AdaptiveMerge(net, states, None, layers)
    module = SegmentationModule(
        adaptive,
        output_mode="softmax",
        class_names=["a"],
        patch_size=8,
        optim=OptimConfig(lr=1e-3, weight_decay=0.0),
        group_lrs={"net.mixing.": 0.05},
    )
    module.trainer = type("T", (), {"estimated_stepping_batches": 10})()  # read by "poly" only
    optimizer = module.configure_optimizers()["optimizer"]
    delta = adaptive.mixing.delta
    norm = dict(net.named_parameters())[next(n for n in specific if "norm" in n)]
    before_delta, before_norm = delta.detach().clone(), norm.detach().clone()
    k = 7
    for _ in range(k):
        optimizer.zero_grad()
        delta.grad = torch.full_like(delta, -2.0)  # constant: δ climbs
        norm.grad = torch.full_like(norm, 3.0)  # constant: γ falls
        optimizer.step()
    torch.testing.assert_close(
        delta.detach() - before_delta, torch.full_like(delta, k * 0.05), atol=1e-6, rtol=1e-4
    )
    torch.testing.assert_close(
        norm.detach() - before_norm, torch.full_like(norm, -k * 1e-3), atol=1e-7, rtol=1e-4
    )


SUBJECTS = [f"Brats18_{i:03d}" for i in range(120)]


def draws(cfg: TargetStageConfig) -> dict[tuple[int, str], dict]:
    """The splits every (seed, init) run of a sweep over ``cfg`` gets."""
    out = {}
    for seed in cfg.seeds:
        for init in cfg.inits:
            data = run_config(cfg, init, seed).data
            out[seed, init] = brats_splits(SUBJECTS, 4, seed=data.seed, draw_seed=data.draw_seed)
    return out


def test_seeded_draws_same_across_inits_differ_across_seeds_fixed_test_set() -> None:
    cfg = TargetStageConfig(inits=list(INITS), seeds=[0, 1, 2])
    got = draws(cfg)
    test = got[0, "none"]["test"]
    for seed in cfg.seeds:
        first = got[seed, cfg.inits[0]]
        assert len(first["train"]) == 8 and len(first["val"]) == 2
        for init in cfg.inits:
            assert got[seed, init]["train"] == first["train"] and got[seed, init]["val"] == first["val"]
            assert got[seed, init]["test"] == test  # the test set never moves
            assert not set(got[seed, init]["train"] + got[seed, init]["val"]) & set(test)
    picked = [tuple(got[seed, "timm"]["train"] + got[seed, "timm"]["val"]) for seed in cfg.seeds]
    assert len(set(picked)) == 3  # every seed draws other train/val subjects
    # An explicit data.draw_seed pins the draw for every seed.
    pinned = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, draw_seed=5))
    assert len({tuple(v["train"]) for v in draws(pinned).values()}) == 1
