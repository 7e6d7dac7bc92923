import pytest
import torch
from torch.nn import functional as F

import geodnn
from geodnn.model import MAX_DEPTH, ChainConfig, option_problems


def test_chain_has_stem_hidden_and_head():
    model = geodnn.build_model(bands=4, classes=3, depth=5, width=8)
    specs = [layer.spec for layer in model.layers]
    assert len(specs) == 7
    assert specs[0].in_channels == 4 and specs[-1].out_channels == 3
    assert specs[-1].kernel_size == 1 and not specs[-1].activation
    assert all(s.activation for s in specs[:-1])


def test_receptive_radius_is_sum_of_layer_radii():
    config = ChainConfig(bands=1, classes=2, depth=6, kernel_size=3, dilations=(1, 2, 4))
    # stem 1 + hidden (1+2+4)*2 + head 0
    assert config.receptive_radius == 1 + 14


def test_receptive_radius_matches_measured_influence():
    model = geodnn.build_model(
        bands=1, classes=2, depth=4, width=4, dilations=(1, 3), seed=1, init="kaiming"
    )
    r = model.receptive_radius
    size = 2 * r + 9
    x = (torch.rand(1, 1, size, size) + 1.0).requires_grad_()
    centre = size // 2
    model(x)[0, 1, centre, centre].backward()
    touched = (x.grad[0, 0].abs() > 0).nonzero()
    extent = (touched - centre).abs().max().item()
    assert extent == r


def test_very_deep_model_builds_and_keeps_activations_finite():
    model = geodnn.build_model(bands=3, classes=2, depth=128, width=8)
    out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 2, 32, 32)
    assert torch.isfinite(out).all()
    assert out.std() > 1e-3


def test_forward_valid_equals_centre_of_same_forward_on_padded_input():
    model = geodnn.build_model(bands=2, classes=2, depth=3, width=4, seed=3)
    r = model.receptive_radius
    x = torch.randn(1, 2, 20 + 2 * r, 17 + 2 * r)
    valid = model.forward_valid(x)
    assert valid.shape[-2:] == (20, 17)
    same = model(x)[..., r:-r, r:-r]
    torch.testing.assert_close(valid, same, atol=1e-5, rtol=1e-5)


def test_nodata_reads_as_band_mean():
    model = geodnn.build_model(bands=1, classes=2, depth=1, width=2)
    model.set_normalization([100.0], [10.0])
    x = torch.full((1, 1, 5, 5), float("nan"))
    assert torch.equal(model.normalize(x), torch.zeros_like(x))


@pytest.mark.parametrize(
    "options", [{"classes": 1}, {"kernel_size": 2}, {"init": "zeros"}, {"dilations": ()}]
)
def test_bad_options_raise_clear_error(options):
    kwargs = {"bands": 1, "classes": 2, **options}
    key = next(iter(options))
    with pytest.raises(ValueError, match=rf"invalid model option.*: {key} = .* must be"):
        geodnn.build_model(**kwargs)


def test_option_problems_name_each_bad_key_and_pass_good_or_unknown_ones():
    bad = {"dilations": [1, True], "depth": MAX_DEPTH + 1, "width": 0, "init": "dirac"}
    problems = option_problems(bad)
    assert [p.split(" = ")[0] for p in problems] == ["dilations", "depth", "width"]
    assert option_problems({"kernel_size": 5, "dilations": [1, 2], "seed": 3}) == []


def test_float64_input_and_the_class_limit():
    model = geodnn.build_model(bands=2, classes=3, depth=1, width=4, seed=0)
    x = torch.rand(1, 2, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(model(x), model(x.float()))
    with pytest.raises(ValueError, match="classes"):
        ChainConfig(bands=1, classes=256)  # 255 is the ignore index


def test_cpu_activations_are_channels_last_and_equal_the_nchw_chain():
    """On the CPU every 4-D activation is channels_last (oneDNN's fast layout), even after a
    one-band input whose layout is ambiguous; the logits equal a plain NCHW evaluation."""
    torch.manual_seed(0)
    model = geodnn.build_model(bands=1, classes=2, depth=3, width=8)
    seen = []
    for layer in model.layers:
        layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    x = torch.randn(2, 1, 24, 24)
    logits = model(x)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in seen)
    assert not seen[0].is_contiguous()  # really NHWC, not an ambiguous shape
    ref = model.normalize(x)
    for layer in model.layers:
        conv = layer.conv
        pad = layer.spec.radius
        ref = F.conv2d(
            ref.contiguous(), conv.weight, conv.bias, padding=pad, dilation=conv.dilation
        )
        ref = layer.activate(ref)
    assert torch.allclose(logits, ref, atol=1e-5)
