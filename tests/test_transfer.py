"""Parameter transfer helpers: input-channel mapping between sources and targets."""

from __future__ import annotations

import pytest
import torch


def test_map_input_channels_reuses_and_rescales_filters():
    from tmerge.transfer import map_input_channels

    w = torch.arange(2 * 2 * 1.0).reshape(2, 2, 1)  # (C_out=2, C_in=2, k=1)
    target = {"w": torch.zeros(2, 4, 1), "other": torch.zeros(3)}
    out = map_input_channels({"w": w, "other": torch.ones(3)}, target, [0, 0, 1, 1], rescale=True)
    assert out["w"].shape == (2, 4, 1)
    assert torch.equal(out["w"][:, 0], w[:, 0] / 2) and torch.equal(out["w"][:, 3], w[:, 1] / 2)
    assert torch.equal(out["other"], torch.ones(3))  # same shape: untouched
    fisher = map_input_channels({"w": w}, target, [0, 0, 1, 1], rescale=False)
    assert torch.equal(fisher["w"][:, 1], w[:, 0])
    with pytest.raises(ValueError, match="channel_map: .* names source channel 3"):
        map_input_channels({"w": w}, target, [0, 1, 2, 3], rescale=True)


def test_negative_channel_map_is_refused_and_the_stages_name_the_key():
    """Pure code refuses the map with a ValueError; the stages raise it as the config error."""
    from tmerge.errors import ConfigError
    from tmerge.sources import map_channels
    from tmerge.transfer import map_input_channels

    tensors, target = {"w": torch.ones(2, 2, 1)}, {"w": torch.zeros(2, 4, 1)}
    said = r"channel_map: expected source-channel indices >= 0"
    with pytest.raises(ValueError, match=said) as refused:
        map_input_channels(tensors, target, [0, -1, 1, 1], rescale=True)
    assert not isinstance(refused.value, ConfigError)
    with pytest.raises(ConfigError, match=said):
        map_channels(tensors, target, [0, -1, 1, 1], rescale=True, names=None)
