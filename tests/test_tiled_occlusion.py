import io
import math

import pytest
import torch
from captum.attr import NoiseTunnel, Occlusion
from captum.testing.helpers.basic_models import (
    BasicModel3,
    BasicModel_ConvNet_One_Conv,
    BasicModel_MultiLayer,
    BasicModel_MultiLayer_MultiInput,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from extra_attrib import TiledOcclusion
from extra_attrib.tiled_occlusion import resolve_tiling
from tests._reference import brute_force
from tests.models import FlatLinear, TwoInput


@st.composite
def problems(draw):
    """Random shape (1D-4D), window and k, shapes not multiples of the stride."""
    d = draw(st.integers(1, 4))
    max_s = {1: 13, 2: 9, 3: 6, 4: 4}[d]
    shape, window, k = [], [], []
    for _ in range(d):
        s = draw(st.integers(1, max_s))
        kk = draw(st.integers(1, 3))
        t = draw(st.integers(1, 3))
        if kk * t > s:
            kk, t = 1, s
        shape.append(s)
        window.append(kk * t)
        k.append(kk)
    n = draw(st.integers(1, 3))
    ppe = draw(st.sampled_from([None, 1, 2, 7, 10**6]))
    return n, tuple(shape), tuple(window), tuple(k), ppe


@given(problems())
@settings(max_examples=40, deadline=None)
def test_equals_brute_force_reference(problem):
    n, shape, window, k, ppe = problem
    model = FlatLinear(shape)
    x = torch.randn(n, *shape, dtype=torch.float64)
    target = torch.randint(0, 4, (n,))
    ours = TiledOcclusion(model).attribute(
        x, target=target, window=window, k=k, baselines=0.5, perturbations_per_eval=ppe
    )
    expected = torch.stack(
        [brute_force(model, x[i : i + 1], window, k, int(target[i]), 0.5)[0] for i in range(n)]
    )
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "shape,window", [((13,), (4,)), ((3, 10, 7), (3, 3, 2)), ((2, 5, 4, 6), (1, 2, 4, 3))]
)
def test_k1_equals_captum_occlusion_with_stride_window(shape, window):
    model = FlatLinear(shape)
    x = torch.randn(2, *shape, dtype=torch.float64)
    ours = TiledOcclusion(model).attribute(x, target=1, window=window, k=1)
    theirs = Occlusion(model).attribute(x, target=1, sliding_window_shapes=window, strides=window)
    # Captum computes in float32 internally; agreement to its precision.
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "shape,window,k",
    [((20,), (6,), (3,)), ((1, 12, 12), (1, 4, 4), (1, 2, 2)), ((8, 9), (4, 3), (4, 3))],
)
def test_equals_overlapping_captum_occlusion_away_from_borders(shape, window, k):
    model = FlatLinear(shape)
    x = torch.randn(2, *shape, dtype=torch.float64)
    stride = tuple(w // kk for w, kk in zip(window, k))
    ours = TiledOcclusion(model).attribute(x, target=2, window=window, k=k)
    theirs = (
        Occlusion(model)
        .attribute(x, target=2, sliding_window_shapes=window, strides=stride)
        .double()
    )
    inner = (slice(None),) + tuple(
        slice(w - t, s - (w - t) - (s - w) % t) for s, w, t in zip(shape, window, stride)
    )
    assert ours[inner].numel() > 0
    torch.testing.assert_close(ours[inner], theirs[inner], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ours, theirs, atol=1e-3), "borders should differ from Captum"


# Captum's own expected values (tests/attr/test_occlusion.py), cases where stride == window.
def test_captum_expected_multilayer():
    net = BasicModel_MultiLayer()
    inp = torch.tensor([[20.0, 50.0, 30.0]])
    for ppe in (1, 2, 3):
        attr = TiledOcclusion(net).attribute(inp, target=0, window=1, perturbations_per_eval=ppe)
        torch.testing.assert_close(attr, torch.tensor([[80.0, 200.0, 120.0]]))
    attr = TiledOcclusion(net).attribute(inp, target=0, window=(2,))
    torch.testing.assert_close(attr, torch.tensor([[280.0, 280.0, 120.0]]))
    inp2 = torch.tensor([[2.0, 10.0, 3.0], [20.0, 50.0, 30.0]])
    attr = TiledOcclusion(net).attribute(inp2, target=0, window=1)
    torch.testing.assert_close(attr, torch.tensor([[8.0, 35.0, 12.0], [80.0, 200.0, 120.0]]))


def test_captum_expected_multi_input_with_baselines():
    net = BasicModel_MultiLayer_MultiInput()
    inp1 = torch.tensor([[23.0, 100.0, 0.0], [20.0, 50.0, 30.0]])
    inp2 = torch.tensor([[20.0, 50.0, 30.0], [0.0, 100.0, 0.0]])
    inp3 = torch.tensor([[0.0, 100.0, 10.0], [2.0, 10.0, 3.0]])
    expected = (
        [[444.0, 444.0, 444.0], [328.0, 328.0, 328.0]],
        [[68.0, 188.0, 108.0], [-12.0, 388.0, -12.0]],
        [[368.0, 368.0, 24.0], [0.0, 0.0, -12.0]],
    )
    attr = TiledOcclusion(net).attribute(
        (inp1, inp2, inp3),
        target=0,
        window=((3,), (1,), (2,)),
        baselines=(torch.tensor([[1.0, 4, 7], [3.0, 6, 9]]), 3.0, torch.tensor([[4.0], [6]])),
        additional_forward_args=(1,),
    )
    for a, e in zip(attr, expected):
        torch.testing.assert_close(a, torch.tensor(e))
    attr = TiledOcclusion(net).attribute(
        (inp1, inp2),
        target=0,
        window=((3,), (1,)),
        additional_forward_args=(inp3, 1),
        perturbations_per_eval=2,
    )
    torch.testing.assert_close(attr[0], torch.tensor([[492.0, 492.0, 492.0], [400.0] * 3]))
    torch.testing.assert_close(attr[1], torch.tensor([[80.0, 200.0, 120.0], [0.0, 400.0, 0.0]]))


def test_captum_expected_conv_and_int_inputs():
    net = BasicModel_ConvNet_One_Conv()
    inp = torch.arange(16, dtype=torch.float).view(1, 1, 4, 4)
    attr = TiledOcclusion(net).attribute(
        (inp, torch.ones((1, 1, 4, 4))), target=0, window=((1, 4, 4), (1, 4, 4))
    )
    torch.testing.assert_close(attr[0], 67 * torch.ones_like(inp))
    torch.testing.assert_close(attr[1], 13 * torch.ones_like(inp))
    attr = TiledOcclusion(net).attribute(
        (inp, torch.ones((1, 1, 4, 1))), target=0, window=((1, 2, 4), (1, 1, 1))
    )
    expected = torch.tensor([17.0, 17.0, 67.0, 67.0]).view(1, 1, 4, 1).expand(1, 1, 4, 4)
    torch.testing.assert_close(attr[0], expected)
    ints = TiledOcclusion(BasicModel3()).attribute(
        (torch.tensor([[-10], [3]]), torch.tensor([[-5], [1]])), window=1
    )
    torch.testing.assert_close(ints[0], torch.tensor([[0.0], [1.0]]))
    torch.testing.assert_close(ints[1], torch.tensor([[0.0], [-1.0]]))
    assert ints[0].dtype.is_floating_point


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("batch", [None, 3])
def test_noise_tunnel(nt_type, batch):
    model = FlatLinear((2, 6, 6))
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    tiled = TiledOcclusion(model)
    plain = tiled.attribute(x, target=torch.tensor([0, 3]), window=(2, 4, 4), k=(1, 2, 2))
    out = NoiseTunnel(tiled).attribute(
        x,
        nt_type=nt_type,
        nt_samples=5,
        nt_samples_batch_size=batch,
        stdevs=1e-9,
        target=torch.tensor([0, 3]),
        window=(2, 4, 4),
        k=(1, 2, 2),
    )
    assert out.shape == x.shape and out.dtype == x.dtype
    if nt_type == "smoothgrad":
        torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)
    elif nt_type == "smoothgrad_sq":
        torch.testing.assert_close(out, plain**2, rtol=1e-5, atol=1e-6)
    else:
        assert float(out.abs().max()) < 1e-6


def test_noise_tunnel_tuple_inputs_and_real_noise():
    model = TwoInput((5,), (2, 3))
    xs = (torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 2, 3, dtype=torch.float64))
    out = NoiseTunnel(TiledOcclusion(model)).attribute(
        xs, nt_samples=4, stdevs=0.5, target=1, window=((2,), (2, 3)), k=((2,), 1)
    )
    assert [o.shape for o in out] == [x.shape for x in xs]
    assert all(torch.isfinite(o).all() for o in out)


def test_tuple_inputs_match_reference_per_tensor():
    model = TwoInput((7,), (3, 4))
    xa = torch.randn(3, 7, dtype=torch.float64)
    xb = torch.randn(3, 3, 4, dtype=torch.float64)
    attr_a, attr_b = TiledOcclusion(model).attribute(
        (xa, xb),
        target=2,
        window=((4,), (2, 2)),
        k=((2,), (2, 1)),
        additional_forward_args=(0.5,),
        perturbations_per_eval=4,
    )
    ref_a = brute_force(lambda a: model(a, xb, 0.5), xa, (4,), (2,), 2)
    ref_b = brute_force(lambda b: model(xa, b, 0.5), xb, (2, 2), (2, 1), 2)
    torch.testing.assert_close(attr_a, ref_a)
    torch.testing.assert_close(attr_b, ref_b)


@pytest.mark.parametrize(
    "baseline_shape", [(2, 1, 1, 1), (3, 1, 1), (1, 3, 1, 1), (3, 5, 6), (2, 3, 5, 6)]
)
def test_tensor_baselines_match_reference(baseline_shape):
    shape = (3, 5, 6)
    model = FlatLinear(shape)
    x = torch.randn(2, *shape, dtype=torch.float64)
    base = torch.randn(baseline_shape, dtype=torch.float64)
    ours = TiledOcclusion(model).attribute(
        x, target=0, window=(3, 2, 4), k=(1, 2, 2), baselines=base
    )
    ref = brute_force(model, x, (3, 2, 4), (1, 2, 2), 0, base.expand_as(x))
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_baseline_stays_inside_its_window(bad):
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.nan_to_num(x, nan=0.0, posinf=0.0).flatten(1)[:, :3]

    x = torch.randn(2, 1, 8, 8)
    TiledOcclusion(Recorder()).attribute(
        x, target=0, window=(1, 4, 4), k=(1, 2, 2), baselines=bad, perturbations_per_eval=3
    )
    for batch in seen[1:]:
        non_finite = ~torch.isfinite(batch)
        per_row = non_finite.flatten(1).sum(1)
        assert int(per_row.max()) <= 16  # one window at most per copy
        assert torch.equal(batch[~non_finite], batch[~non_finite])  # the rest is finite data
        rows = batch.reshape(-1, 2, 1, 8, 8)
        for copy in rows:
            clean = torch.isfinite(copy)
            assert torch.equal(copy[clean], x[clean])


def test_float64_and_float16_dtypes_kept():
    model = FlatLinear((6,))
    x = torch.randn(2, 6, dtype=torch.float64)
    assert TiledOcclusion(model).attribute(x, target=0, window=2).dtype == torch.float64
    half_model = FlatLinear((6,), dtype=torch.float32)
    x32 = torch.randn(2, 6)
    out = TiledOcclusion(lambda z: half_model(z.float())).attribute(
        x32.half(), target=0, window=2, k=2
    )
    assert out.dtype == torch.float16


@pytest.mark.parametrize("score", ["softmax", "log_softmax", "callable"])
def test_score_variants(score):
    model = FlatLinear((9,))
    x = torch.randn(2, 9, dtype=torch.float64)
    fn = {
        "softmax": lambda o: torch.softmax(o, 1),
        "log_softmax": lambda o: torch.log_softmax(o, 1),
        "callable": lambda o: o**2,
    }[score]
    arg = fn if score == "callable" else score
    ours = TiledOcclusion(model).attribute(x, target=1, window=3, k=3, score=arg)
    torch.testing.assert_close(ours, brute_force(model, x, (3,), (3,), 1, score=fn))


def test_log_softmax_sign_convention():
    # Occluding the only informative feature lowers log P(target): positive attribution.
    model = nn.Linear(4, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 0]]))
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    attr = TiledOcclusion(model).attribute(x, target=0, window=1, score="log_softmax")
    assert attr[0, 0] > 0 and torch.all(attr[0, 1:] == 0)


def test_target_none_explains_predicted_class_or_single_output():
    model = FlatLinear((8,))
    x = torch.randn(3, 8, dtype=torch.float64)
    pred = model(x).argmax(1)
    tiled = TiledOcclusion(model)
    torch.testing.assert_close(
        tiled.attribute(x, window=2, k=2), tiled.attribute(x, target=pred, window=2, k=2)
    )
    scalar = lambda z: model(z)[:, 0]  # noqa: E731
    torch.testing.assert_close(
        tiled.attribute(x, target=0, window=2), TiledOcclusion(scalar).attribute(x, window=2)
    )


def test_target_forms_agree():
    model = FlatLinear((8,))
    x = torch.randn(2, 8, dtype=torch.float64)
    t = TiledOcclusion(model)
    per_example = t.attribute(x, target=torch.tensor([1, 2]), window=4, k=2)
    listed = t.attribute(x, target=[1, 2], window=4, k=2)
    torch.testing.assert_close(per_example, listed)
    torch.testing.assert_close(
        t.attribute(x, target=torch.tensor(3), window=4), t.attribute(x, target=3, window=4)
    )
    three_d = lambda z: model(z).reshape(-1, 2, 2)  # noqa: E731
    torch.testing.assert_close(
        TiledOcclusion(three_d).attribute(x, target=(1, 0), window=4),
        t.attribute(x, target=2, window=4),
    )


def test_attribute_multi_equals_per_target_calls():
    model = FlatLinear((2, 7, 5))
    x = torch.randn(2, 2, 7, 5, dtype=torch.float64)
    t = TiledOcclusion(model)
    targets = [0, torch.tensor([3, 1]), None]
    # A fixed chunk size: the automatic one is tuned by timing, so the pass count could vary.
    kw = dict(window=(2, 4, 2), k=(1, 2, 2), baselines=0.1, perturbations_per_eval=3)
    multi = t.attribute_multi(x, targets, **kw)
    assert multi.shape == (3, *x.shape)
    evaluations = t.last_evaluations
    for i, target in enumerate(targets):
        torch.testing.assert_close(multi[i], t.attribute(x, target=target, **kw))
        assert t.last_evaluations == evaluations  # one sweep, whatever the number of targets


def test_attribute_multi_tuple_inputs():
    model = TwoInput((6,), (2, 2))
    xs = (torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 2, 2, dtype=torch.float64))
    multi = TiledOcclusion(model).attribute_multi(xs, [0, 2], window=((3,), 1), k=((3,), 1))
    assert isinstance(multi, tuple) and multi[0].shape == (2, 2, 6)
    single = TiledOcclusion(model).attribute(xs, target=2, window=((3,), 1), k=((3,), 1))
    torch.testing.assert_close(multi[1][1], single[1])


def test_window_clipping_and_int_forms():
    shapes = [(3, 20, 30)]
    (g,) = resolve_tiling(shapes, 16, 4)
    assert g.window == (3, 16, 16) and g.k == (1, 4, 4)
    (g,) = resolve_tiling(shapes, (3, 40, 8), (1, 2, 2))
    assert g.window == (3, 20, 8) and g.k == (1, 2, 2)
    ga, gb = resolve_tiling([(4,), (2, 6)], 2, ((2,), (1, 2)))
    assert ga.k == (2,) and gb.k == (1, 2) and gb.window == (2, 2)


def test_window_larger_than_input_spans_it():
    model = FlatLinear((5,))
    x = torch.randn(1, 5, dtype=torch.float64)
    whole = TiledOcclusion(model).attribute(x, target=0, window=50, k=4)
    assert torch.allclose(whole, whole[0, 0].expand_as(whole))


def test_model_is_left_untouched():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(0.0), nn.Flatten(), nn.LazyLinear(3)
    )
    x = torch.randn(2, 1, 6, 6)
    model(x)
    model.train()
    model[1].eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    with pytest.warns(UserWarning, match="training mode"):
        TiledOcclusion(model).attribute(x, target=0, window=(1, 3, 3), k=(1, 3, 3))
    assert [m.training for m in model.modules()] == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_model_writing_into_its_input_does_not_corrupt_results():
    base = FlatLinear((10,))

    def inplace_model(z):
        out = base(z)
        z.mul_(0.0).add_(123.0)  # a model that scribbles over its input
        return out

    x = torch.randn(2, 10, dtype=torch.float64)
    ours = TiledOcclusion(inplace_model).attribute(
        x, target=1, window=4, k=2, perturbations_per_eval=3
    )
    torch.testing.assert_close(ours, brute_force(base, x, (4,), (2,), 1))


def test_progress_bar_counts_forward_passes(capsys):
    import sys

    model = FlatLinear((12,))
    x = torch.randn(1, 12, dtype=torch.float64)
    err = io.StringIO()
    old = sys.stderr
    sys.stderr = err
    try:
        t = TiledOcclusion(model)
        t.attribute(x, target=0, window=4, k=2, perturbations_per_eval=3, show_progress=True)
    finally:
        sys.stderr = old
    evals = 1 + math.ceil((12 // 2 + 1) / 3)
    assert t.last_evaluations == evals
    assert f"{evals}/{evals}" in err.getvalue()


def test_later_calls_reuse_the_tuned_chunk_size():
    model = FlatLinear((3, 12, 12))
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    rows = []

    def counted(batch):
        rows.append(batch.shape[0])
        return model(batch)

    t = TiledOcclusion(counted)
    kw = dict(target=1, window=(3, 4, 4), k=(1, 2, 2), engine="dense")
    first = t.attribute(x, **kw)
    assert len(t._chunk_memo) == 1
    chosen = next(iter(t._chunk_memo.values()))
    rows.clear()
    again = t.attribute(x, **kw)
    # The trials start from half the earlier choice: none of the smaller sizes run.
    assert rows[0] == 2 and min(rows[1:-1]) == 2 * max(chosen // 2, 1)
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(first, brute_force(model, x, (3, 4, 4), (1, 2, 2), 1))
    # Another shape tunes afresh; another object knows nothing of this one's choice.
    t.attribute(x[:1], **kw)
    assert len(t._chunk_memo) == 2
    assert TiledOcclusion(counted)._chunk_memo == {}


def test_unchanged_windows_are_skipped_without_changing_the_result():
    model = FlatLinear((16,))
    x = torch.randn(2, 16, dtype=torch.float64)
    x[:, :8] = 0.0
    t = TiledOcclusion(model)
    attr = t.attribute(x, target=0, window=4, k=2, perturbations_per_eval=1)
    assert t.last_skipped == 4  # windows [0,2), [0,4), [2,6), [4,8)
    assert t.last_evaluations == 1 + 9 - 4
    torch.testing.assert_close(attr, brute_force(model, x, (4,), (2,), 0))


BAD = [
    (dict(window=3, k=2), ValueError, r"window\[0\]=3 .*not divisible by k\[0\]=2"),
    (dict(window=4, k=0), ValueError, r"k=0 must be >= 1"),
    (dict(window=4, k=(1, 2)), ValueError, r"k=\(1, 2\) has 2 entries.*1 non-batch"),
    (dict(window=(2, 2)), ValueError, r"window=\(2, 2\) has 2 entries"),
    (dict(window=2.0), TypeError, r"window=2.0 must be an int"),
    (dict(window=None), TypeError, r"window is required"),
    (dict(window=2, target=9), ValueError, r"target=9 is out of range"),
    (dict(window=2, target=[1]), ValueError, r"list of 1 targets for 2 examples"),
    (dict(window=2, target=(1, 1)), ValueError, r"target=\(1, 1\) does not index"),
    (dict(window=2, baselines=torch.zeros(3)), ValueError, r"baselines has shape \(3,\)"),
    (dict(window=2, baselines="zero"), TypeError, r"baselines must be a number"),
    (dict(window=2, score="prob"), ValueError, r"score='prob' is not supported"),
    (dict(window=2, perturbations_per_eval=0), ValueError, r"perturbations_per_eval=0"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD)
def test_bad_arguments_are_named(kwargs, error, match):
    model = FlatLinear((8,))
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(error, match=match):
        TiledOcclusion(model).attribute(x, **kwargs)


def test_bad_inputs_and_models_are_named():
    model = FlatLinear((8,))
    with pytest.raises(ValueError, match="is empty"):
        TiledOcclusion(model).attribute(torch.zeros(0, 8), window=2)
    with pytest.raises(ValueError, match="0 to 4 more dimensions"):
        TiledOcclusion(model).attribute(torch.zeros(1, 1, 1, 1, 1, 8), window=2)
    with pytest.raises(ValueError, match="first dimension must follow the input batch"):
        TiledOcclusion(lambda z: model(z).sum(0, keepdim=True)).attribute(
            torch.zeros(2, 8, dtype=torch.float64), target=0, window=2
        )
    with pytest.raises(ValueError, match="needs a class dimension"):
        TiledOcclusion(lambda z: model(z)[:, 0]).attribute(
            torch.zeros(2, 8, dtype=torch.float64), window=2, score="softmax"
        )
    with pytest.raises(ValueError, match="does not fit 2 input tensors"):
        TiledOcclusion(TwoInput((8,), (8,))).attribute(
            (torch.zeros(1, 8), torch.zeros(1, 8)), window=(2, 2, 2)
        )
    with pytest.raises(TypeError, match="forward_func must be callable"):
        TiledOcclusion(3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = FlatLinear((3, 9, 9))
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    kw = dict(
        target=torch.tensor([0, 2]),
        window=(3, 4, 4),
        k=(1, 2, 2),
        baselines=torch.zeros(3, 1, 1, dtype=torch.float64),
    )
    cpu = TiledOcclusion(model).attribute(x, **kw)
    kw["target"] = kw["target"].cuda()
    kw["baselines"] = kw["baselines"].cuda()
    gpu = TiledOcclusion(model.cuda()).attribute(x.cuda(), **kw)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float64
    torch.testing.assert_close(gpu.cpu(), cpu)


def test_progress_total_is_exact_with_automatic_chunks():
    import sys

    model = FlatLinear((40,))
    x = torch.randn(1, 40, dtype=torch.float64)
    err = io.StringIO()
    old, sys.stderr = sys.stderr, err
    try:
        t = TiledOcclusion(model)
        t.attribute(x, target=0, window=4, k=4, show_progress=True)
    finally:
        sys.stderr = old
    evals = t.last_evaluations
    assert f"{evals}/{evals}" in err.getvalue().replace("\r", "\n").splitlines()[-1]


# ----------------------------------------------------------------------------- hardening (#9)


@pytest.mark.parametrize(
    "dtype, baseline, shown",
    [
        (torch.int64, 0.5, "0.5"),
        (torch.uint8, -1, "-1"),
        (torch.uint8, 300, "300"),
        (torch.uint8, torch.tensor([[-1.0]]), "-1.0"),
        (torch.int32, torch.tensor([2.5, 1.0]).reshape(2, 1), "2.5"),
        (torch.bool, 0.5, "0.5"),
        (torch.float16, 1e6, "1000000.0"),
    ],
)
def test_baselines_the_input_dtype_cannot_hold_raise(dtype, baseline, shown):
    x = torch.ones(2, 3, dtype=dtype)
    with pytest.raises(ValueError, match=rf"baselines holds {shown}.*{dtype}"):
        TiledOcclusion(lambda v: v.float()).attribute(x, target=0, window=1, baselines=baseline)


def test_integer_input_with_representable_baseline_is_exact():
    x = torch.tensor([[10, 200, 3]], dtype=torch.uint8)
    attr = TiledOcclusion(lambda v: v.double() * 2).attribute(
        x, target=(1,), window=1, baselines=255.0
    )
    torch.testing.assert_close(attr, torch.tensor([[0.0, -110.0, 0.0]], dtype=torch.float64))


def test_show_progress_must_be_a_bool():
    with pytest.raises(TypeError, match="show_progress='yes' must be a bool"):
        TiledOcclusion(lambda v: v).attribute(torch.rand(2, 3), window=1, show_progress="yes")


def test_attribute_future_is_not_implemented_like_captum():
    with pytest.raises(NotImplementedError, match="TiledOcclusion"):
        TiledOcclusion(lambda v: v).attribute_future()


@pytest.mark.parametrize(
    "score, got",
    [
        (lambda o: o.sum(), r"shape \(\)"),
        (lambda o: 3.0, "float"),
        (lambda o: o[:1], r"shape \(1, 3\)"),
    ],
)
def test_bad_score_callable_is_named(score, got):
    with pytest.raises(ValueError, match=rf"score=.*lambda.* returned {got}.*one row per example"):
        TiledOcclusion(lambda v: v).attribute(torch.rand(2, 3), target=0, window=1, score=score)


def test_scalar_inputs_shape_n_one_feature_each():
    # Captum's test_simple_multi_input_0d: inputs of shape (N,), each scalar one feature
    def f(a, b):
        return torch.stack([a * 2 + b**2, a - b], dim=1)

    a, b = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    base = torch.full((4,), 0.5, dtype=torch.float64)
    expected = (f(a, b)[:, 0] - f(base, b)[:, 0], f(a, b)[:, 0] - f(a, base)[:, 0])
    for window, k in ((1, 1), (((), ()), ((), ())), (3, 2)):
        got = TiledOcclusion(f).attribute((a, b), target=0, window=window, k=k, baselines=0.5)
        assert got[0].shape == (4,)
        torch.testing.assert_close(got, expected)
    mixed = TiledOcclusion(lambda v, w: v + w.sum(1)).attribute(
        (a, torch.ones(4, 2, dtype=torch.float64)), window=((), 1), baselines=(base, 0.0)
    )
    torch.testing.assert_close(mixed[0], a - 0.5)
    with pytest.raises(ValueError, match="window"):
        TiledOcclusion(f).attribute((a, b), target=0, window=0)
