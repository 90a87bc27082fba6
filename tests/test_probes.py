import pytest
import torch
from dglm.engine.probes import (
    MAX_CONTROL_SCALE,
    Control,
    Probe,
    ProbeSet,
    load_probes,
    save_probes,
    train_probe,
)


def _separable(gen, n=200, d=16):
    direction = torch.randn(d, generator=gen)
    x = torch.randn(n, d, generator=gen)
    y = (x @ direction > 0).long()
    return x, y


def test_train_binary_probe_is_accurate(gen):
    x, y = _separable(gen)
    p = train_probe("s", x, y, ("neg", "pos"))
    assert p.rows == 1
    acc = (torch.tensor([p.labels.index(l) for l in p.predict(x)]) == y).float().mean()
    assert acc > 0.95


def test_one_vs_rest_probe(gen):
    centers = torch.randn(3, 8, generator=gen) * 4
    y = torch.randint(0, 3, (300,), generator=gen)
    x = centers[y] + torch.randn(300, 8, generator=gen) * 0.5
    p = train_probe("topic", x, y, ("a", "b", "c"))
    assert p.rows == 3
    acc = (torch.tensor([p.labels.index(l) for l in p.predict(x)]) == y).float().mean()
    assert acc > 0.9
    assert p.target_rows("b") == [(1, 1.0)]


def test_save_load_roundtrip(tmp_path, gen):
    x, y = _separable(gen)
    p = train_probe("sentiment", x, y, ("negative", "positive"))
    p = Probe(p.name, p.labels, p.weight, p.bias, {"test_accuracy": 0.9})
    save_probes(tmp_path / "p.safetensors", [p])
    (q,) = load_probes(tmp_path / "p.safetensors")
    assert q.labels == p.labels and q.metrics == p.metrics
    torch.testing.assert_close(q.weight, p.weight)


def test_batch_targets_and_composition(gen):
    a = Probe("a", ("no", "yes"), torch.randn(1, 4, generator=gen), torch.zeros(1))
    t = Probe("t", ("x", "y", "z"), torch.randn(3, 4, generator=gen), torch.zeros(3))
    ps = ProbeSet([a, t], 4, default_scale=7.0)
    assert ps.weight.shape == (4, 4)
    targets, scales = ps.batch_targets(
        [[Control("a", "yes", 5.0), Control("t", "z", 2.0)], [], [Control("a", "no")]]
    )
    assert targets.tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    # a control without a scale takes the set's default (the bundle's control_scale)
    assert scales.tolist() == [[5, 0, 0, 2], [0, 0, 0, 0], [7, 0, 0, 0]]


def test_control_parse():
    assert Control.parse("sentiment=positive:20") == Control("sentiment", "positive", 20.0)
    assert Control.parse("toxicity=low") == Control("toxicity", "low", None)
    for bad in ["sentiment", "=x", "a=b:c"]:
        with pytest.raises(ValueError):
            Control.parse(bad)


def test_probe_errors(gen):
    p = Probe("a", ("no", "yes"), torch.randn(1, 4, generator=gen), torch.zeros(1))
    with pytest.raises(ValueError, match="dimension 4"):
        ProbeSet([p], 8)
    ps = ProbeSet([p], 4)
    with pytest.raises(ValueError, match="unknown probe 'b'"):
        ps.validate([Control("b", "yes")])
    with pytest.raises(ValueError, match="not a label"):
        ps.validate([Control("a", "maybe")])
    with pytest.raises(ValueError, match="labels"):
        Probe("a", ("no",), torch.randn(1, 4), torch.zeros(1))
    with pytest.raises(ValueError, match="non-finite"):
        Probe("a", ("no", "yes"), torch.full((1, 4), float("inf")), torch.zeros(1))


@pytest.mark.parametrize("scale", [1e30, -1e7, float("inf"), float("nan"), "big", True, [1.0]])
def test_control_scale_must_be_a_bounded_number(scale):
    with pytest.raises(ValueError, match=r"controls: the scale of probe 'sentiment' must be"):
        Control("sentiment", "positive", scale)


def test_control_scale_range():
    assert Control("a", "yes", MAX_CONTROL_SCALE).scale == MAX_CONTROL_SCALE
    assert Control("a", "yes", -MAX_CONTROL_SCALE).scale == -MAX_CONTROL_SCALE  # steers away
    assert Control("a", "yes", 20).scale == 20.0 and isinstance(
        Control("a", "yes", 20).scale, float
    )
    with pytest.raises(ValueError, match="controls: the scale of probe 'a'"):
        Control.parse("a=yes:1e30")
    with pytest.raises(ValueError, match="control scale must be a number, got 'big'"):
        Control.parse("a=yes:big")


def test_load_probes_names_a_bad_file(tmp_path, gen):
    p = Probe("a", ("no", "yes"), torch.randn(1, 4, generator=gen), torch.zeros(1))
    path = tmp_path / "p.safetensors"
    save_probes(path, [p])
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], data[:5], b"not a safetensors file"):
        path.write_bytes(broken)
        with pytest.raises(ValueError, match="p.safetensors: not a readable probes file"):
            load_probes(path)
    with pytest.raises(ValueError, match="missing.safetensors"):
        load_probes(tmp_path / "missing.safetensors")
