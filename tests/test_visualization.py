"""extra_attrib.visualization: every plot runs headless and writes a PNG; bad input raises."""

import numpy as np
import pytest
import torch
from matplotlib import pyplot as plt  # the Agg backend is set in conftest.py
from matplotlib.figure import Figure

from extra_attrib.visualization import (
    plot_1d_attribution,
    plot_attribution,
    plot_attribution_grid,
    plot_image_attribution,
    plot_volume_slices,
    to_hwc_numpy,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
H, W = 20, 24


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def blob(h=H, w=W, cy=8.0, cx=10.0):
    yy, xx = np.mgrid[:h, :w]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 20.0) - 0.5 * np.exp(
        -((yy - 15) ** 2 + (xx - 4) ** 2) / 10.0
    )


@pytest.fixture
def image_chw():
    return torch.rand(3, H, W)


@pytest.fixture
def attr_nchw():
    return torch.from_numpy(blob()).float().expand(1, 3, H, W).clone()


def heat_image(fig):
    """The heat-map panel of a three-panel figure (axes: image, heat map, overlay, colour bar)."""
    return fig.axes[1].images[0]


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------


def test_three_panel_from_tensors_writes_png(tmp_path, image_chw, attr_nchw):
    path = tmp_path / "three.png"
    fig = plot_image_attribution(image_chw[None], attr_nchw, title="x", save_path=path)
    assert isinstance(fig, Figure)
    assert_png(path)
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles == ["Image", "Attribution", "Overlay"]
    assert len(fig.axes) == 4  # three panels and a colour bar


def test_three_panel_from_hwc_uint8_and_2d_attr(tmp_path):
    image = (np.random.default_rng(0).random((H, W, 3)) * 255).astype(np.uint8)
    path = tmp_path / "hwc.png"
    plot_image_attribution(image, blob(), save_path=path)
    assert_png(path)


def test_chw_tensor_and_hwc_array_give_the_same_map(image_chw, attr_nchw):
    a = heat_image(plot_image_attribution(image_chw, attr_nchw)).get_array()
    b = heat_image(
        plot_image_attribution(image_chw.permute(1, 2, 0).numpy(), attr_nchw[0].permute(1, 2, 0))
    ).get_array()
    np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(a, 3 * blob(), rtol=1e-6)  # channels summed


def test_grayscale_and_rgba_images(tmp_path):
    plot_image_attribution(np.random.rand(H, W), blob(), save_path=tmp_path / "g.png")
    plot_image_attribution(
        np.random.rand(4, H, W).astype(np.float32), blob(), save_path=tmp_path / "rgba.png"
    )
    assert_png(tmp_path / "g.png")
    assert_png(tmp_path / "rgba.png")


def test_default_scale_is_symmetric_and_clipped_at_the_percentile():
    attr = blob()
    attr[0, 0] = 100.0  # one outlier
    fig = plot_image_attribution(np.random.rand(H, W, 3), attr)
    norm = heat_image(fig).norm
    expected = np.percentile(np.abs(attr), 99.0)
    assert norm.vmin == pytest.approx(-expected) and norm.vmax == pytest.approx(expected)
    assert fig.axes[-1].get_label() == "<colorbar>"
    fig100 = plot_image_attribution(np.random.rand(H, W, 3), attr, clip_percentile=100)
    assert heat_image(fig100).norm.vmax == pytest.approx(100.0)


@pytest.mark.parametrize(
    "sign, low, high",
    [
        ("all", -1, 1),
        ("positive", 0, 1),
        ("negative", -1, 0),
        ("absolute", 0, 1),
        ("absolute_value", 0, 1),
    ],
)
def test_sign_views(sign, low, high):
    attr = np.linspace(-2.0, 1.0, H * W).reshape(H, W)
    fig = plot_image_attribution(np.random.rand(H, W, 3), attr, sign=sign, clip_percentile=100)
    image = heat_image(fig)
    limit = abs(image.norm.vmin) + abs(image.norm.vmax) if sign != "all" else image.norm.vmax
    assert np.sign(image.norm.vmin) == np.sign(low) and np.sign(image.norm.vmax) == np.sign(high)
    shown = np.asarray(image.get_array())
    if sign == "positive":
        assert shown.min() == 0 and limit == pytest.approx(1.0)
    elif sign == "negative":
        assert shown.max() == 0 and limit == pytest.approx(2.0)
    elif sign.startswith("absolute"):
        assert shown.min() >= 0 and limit == pytest.approx(2.0)


def test_all_zero_and_nan_attributions_draw(tmp_path):
    image = np.random.rand(H, W, 3)
    plot_image_attribution(image, np.zeros((H, W)), save_path=tmp_path / "zero.png")
    attr = blob()
    attr[2, 3] = np.nan
    plot_image_attribution(image, attr, save_path=tmp_path / "nan.png")
    assert_png(tmp_path / "zero.png")
    assert_png(tmp_path / "nan.png")


@pytest.mark.parametrize("method", ["heat_map", "blended_heat_map", "original_image"])
def test_single_panel_into_user_axes(tmp_path, method, image_chw, attr_nchw):
    fig = Figure(figsize=(6, 3))
    ax_left, ax_right = fig.subplots(1, 2)
    out = plot_attribution(
        attr_nchw,
        image_chw,
        method=method,
        ax=ax_right,
        title=method,
        save_path=tmp_path / "one.png",
    )
    assert out is fig
    assert ax_right.get_title() == method and len(ax_right.images) >= 1
    assert not ax_left.images
    assert_png(tmp_path / "one.png")


def test_heat_map_without_image(tmp_path, attr_nchw):
    plot_attribution(attr_nchw, method="heat_map", save_path=tmp_path / "heat.png")
    assert_png(tmp_path / "heat.png")


def test_figures_stay_out_of_pyplot(image_chw, attr_nchw):
    before = plt.get_fignums()
    plot_image_attribution(image_chw, attr_nchw)
    plot_attribution(attr_nchw, image_chw)
    assert plt.get_fignums() == before


def test_three_panel_into_given_axes(image_chw, attr_nchw):
    fig = Figure()
    axes = fig.subplots(1, 3)
    assert plot_image_attribution(image_chw, attr_nchw, axes=axes) is fig
    assert all(ax.images for ax in axes)


def test_display_ranges_by_dtype(attr_nchw):
    def shown(image):
        return np.asarray(plot_image_attribution(image, attr_nchw).axes[0].images[0].get_array())

    dark = np.full((H, W, 3), 0.25)
    np.testing.assert_allclose(shown(dark), 0.25)  # floats in [0, 1] keep their look
    np.testing.assert_allclose(shown((dark * 255).astype(np.uint8)), 63 / 255)
    wide = np.random.rand(H, W, 3) * 2.0  # floats beyond [0, 1]: min-max, not / 255
    assert shown(wide).max() == pytest.approx(1.0)
    assert shown(torch.full((3, H, W), 128, dtype=torch.uint8)).max() == pytest.approx(128 / 255)


def test_normalised_model_input_is_rescaled_for_display(attr_nchw):
    x = torch.randn(1, 3, H, W) * 2  # like a normalised model input
    shown = plot_image_attribution(x, attr_nchw).axes[0].images[0].get_array()
    assert float(np.min(shown)) == pytest.approx(0.0) and float(np.max(shown)) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------
# Grid
# ------------------------------------------------------------------------------------------


def test_grid_rows_images_columns_methods(tmp_path):
    images = torch.rand(2, 3, H, W)
    maps = {
        "Occlusion": torch.randn(2, 3, H, W),
        "Tiled": [blob(), -blob()],
        "Saliency": np.random.rand(2, H, W, 3),
    }
    path = tmp_path / "grid.png"
    fig = plot_attribution_grid(
        images, maps, row_titles=["cat", "cup"], title="t", save_path=path, dpi=50
    )
    assert_png(path)
    assert len(fig.axes) == 2 * 4
    assert [ax.get_title() for ax in fig.axes[:4]] == ["Image", "Occlusion", "Tiled", "Saliency"]
    assert fig.axes[0].get_ylabel() == "cat" and fig.axes[4].get_ylabel() == "cup"


def test_grid_without_image_column_with_colorbars_and_one_image(tmp_path):
    fig = plot_attribution_grid(
        [np.random.rand(H, W, 3)],
        {"A": [blob()], "B": blob()[None]},
        show_image=False,
        colorbar=True,
        method="heat_map",
        save_path=tmp_path / "g.png",
    )
    assert_png(tmp_path / "g.png")
    assert len(fig.axes) == 2 + 2  # two panels, two colour bars


@pytest.mark.parametrize(
    "maps, match",
    [
        ({"A": [blob()]}, "holds 1 maps, expected 2"),
        ({"A": [blob(), blob(H + 1, W)]}, "does not match the image's spatial size"),
        ([blob(), blob()], "must be a dict"),
    ],
)
def test_grid_bad_attributions(maps, match):
    with pytest.raises((ValueError, TypeError), match=match):
        plot_attribution_grid(torch.rand(2, 3, H, W), maps)


def test_grid_bad_row_titles_and_method():
    with pytest.raises(ValueError, match="row_titles holds 1 labels, expected 2"):
        plot_attribution_grid(torch.rand(2, 3, H, W), {"A": [blob(), blob()]}, row_titles=["a"])
    with pytest.raises(ValueError, match="method='masked_image'"):
        plot_attribution_grid(
            torch.rand(2, 3, H, W), {"A": [blob(), blob()]}, method="masked_image"
        )


# ------------------------------------------------------------------------------------------
# 1D
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["band", "twin"])
def test_1d_single_channel(tmp_path, style):
    t = np.linspace(0, 6, 200)
    path = tmp_path / f"{style}.png"
    fig = plot_1d_attribution(
        np.sin(t), np.exp(-((t - 2) ** 2)), x=t, style=style, title="sine", save_path=path
    )
    assert_png(path)
    assert fig.axes[0].get_title() == "sine"
    if style == "band":  # coloured background cells and a colour bar, no second y axis
        assert len(fig.axes[0].collections) == 1 and len(fig.axes) == 2
        assert fig.axes[1].get_label() == "<colorbar>"
    else:  # the attribution as filled curves on a twin y axis, no colour bar
        assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "attribution"
        assert len(fig.axes[1].collections) == 2


def test_1d_multichannel_tensor_with_batch_dim_and_shared_attr(tmp_path):
    signal = torch.randn(1, 3, 100)
    fig = plot_1d_attribution(
        signal, torch.randn(100), channel_labels=["a", "b", "c"], save_path=tmp_path / "multi.png"
    )
    assert_png(tmp_path / "multi.png")
    assert [ax.get_ylabel() for ax in fig.axes[:3]] == ["a", "b", "c"]


def test_1d_channels_last_and_user_axes(tmp_path):
    fig = Figure()
    axes = fig.subplots(2, 1)
    out = plot_1d_attribution(
        np.random.randn(50, 2),
        np.random.randn(50, 2),
        channels_last=True,
        ax=axes,
        sign="absolute",
        save_path=tmp_path / "cl.png",
    )
    assert out is fig
    assert_png(tmp_path / "cl.png")


@pytest.mark.parametrize(
    "signal, attr, kwargs, match",
    [
        (np.zeros(50), np.zeros(49), {}, "attr has 1 channel"),
        (np.zeros((2, 50)), np.zeros((3, 50)), {}, "expected the signal's 2 channel"),
        (np.zeros((2, 3, 50)), np.zeros(50), {}, "signal has shape"),
        (np.zeros(1), np.zeros(1), {}, "at least 2 steps"),
        (np.zeros(50), np.zeros(50), {"x": np.zeros(50)}, "strictly increasing"),
        (np.zeros(50), np.zeros(50), {"style": "bars"}, "style='bars'"),
        (np.zeros((2, 50)), np.zeros(50), {"channel_labels": ["a"]}, "channel_labels holds 1"),
        (np.zeros((2, 50)), np.zeros(50), {"ax": Figure().subplots()}, "expected one per channel"),
    ],
)
def test_1d_bad_input(signal, attr, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_1d_attribution(signal, attr, **kwargs)


# ------------------------------------------------------------------------------------------
# 3D
# ------------------------------------------------------------------------------------------


def volume_blob(d=10, h=12, w=14):
    z, y, x = np.mgrid[:d, :h, :w]
    return np.exp(-((z - 5) ** 2 + (y - 6) ** 2 + (x - 7) ** 2) / 8.0)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_volume_slices_along_each_axis(tmp_path, axis):
    vol = volume_blob()
    path = tmp_path / f"vol{axis}.png"
    fig = plot_volume_slices(vol, vol - 0.3, axis=axis, n_slices=3, title="v", save_path=path)
    assert_png(path)
    assert len(fig.axes) == 2 * 3 + 1  # attribution row, overlay row, colour bar


def test_volume_channels_batch_tensor_explicit_slices_and_no_volume(tmp_path):
    vol = torch.from_numpy(volume_blob()).float()[None, None].expand(1, 2, 10, 12, 14)
    fig = plot_volume_slices(vol, vol * 2, slices=[0, 4, -1], save_path=tmp_path / "a.png")
    assert [ax.get_title() for ax in fig.axes[:3]] == ["D = 0", "D = 4", "D = 9"]
    fig = plot_volume_slices(None, volume_blob(), n_slices=20, save_path=tmp_path / "b.png")
    assert len(fig.axes) == 10 + 1  # n_slices capped at the depth; one row
    assert_png(tmp_path / "a.png")
    assert_png(tmp_path / "b.png")


def test_volume_scale_is_shared_across_slices():
    vol = volume_blob()
    fig = plot_volume_slices(vol, vol, n_slices=4, clip_percentile=100)
    norms = {(im.norm.vmin, im.norm.vmax) for ax in fig.axes[:4] for im in ax.images}
    assert norms == {(-vol.max(), vol.max())}


@pytest.mark.parametrize(
    "volume, attr, kwargs, match",
    [
        (None, np.zeros((4, 5)), {}, "attr has shape"),
        (np.zeros((4, 5, 6)), np.zeros((4, 5, 7)), {}, "does not match volume"),
        (None, np.zeros((4, 5, 6)), {"axis": 3}, "axis=3"),
        (None, np.zeros((4, 5, 6)), {"n_slices": 0}, "n_slices=0"),
        (None, np.zeros((4, 5, 6)), {"slices": [4]}, r"slices=\[4\]"),
        (None, np.zeros((4, 5, 6)), {"slices": []}, "non-empty"),
    ],
)
def test_volume_bad_input(volume, attr, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_volume_slices(volume, attr, **kwargs)


# ------------------------------------------------------------------------------------------
# Shared validation and helpers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image, attr, kwargs, match",
    [
        (np.zeros((2, 3, H, W)), blob(), {}, "image has shape"),
        (np.zeros((H, W, 5)), blob(), {}, "1, 3 or 4 channels"),
        (np.zeros((H, W, 3)), blob(H, W + 1), {}, "does not match the image's spatial size"),
        (np.zeros((H, W, 3)), np.zeros((5, H, W + 1)), {}, "does not match"),
        (np.zeros((H, W, 3)), np.zeros((2, 3, H, W)), {}, "attr has shape"),
        (np.zeros((H, W, 3)), blob(), {"sign": "both"}, "sign='both'"),
        (np.zeros((H, W, 3)), blob(), {"clip_percentile": 0}, "clip_percentile=0"),
        (np.zeros((H, W, 3)), blob(), {"clip_percentile": 101}, "clip_percentile=101"),
        (np.zeros((H, W, 3)), blob(), {"alpha": 1.5}, "alpha=1.5"),
        (np.zeros((H, W, 3)), blob(), {"titles": ("a", "b")}, "titles must hold 3"),
        (np.zeros((H, W, 3)), blob(), {"cmap": "no_such_map"}, "cmap='no_such_map'"),
    ],
)
def test_image_bad_input(image, attr, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plot_image_attribution(image, attr, **kwargs)


def test_plot_attribution_bad_method_and_missing_image():
    with pytest.raises(ValueError, match="method='masked_image'.*visualize_image_attr"):
        plot_attribution(blob(), np.zeros((H, W)), method="masked_image")
    with pytest.raises(ValueError, match="image is required"):
        plot_attribution(blob())


def test_non_numeric_input_is_a_type_error():
    with pytest.raises(TypeError, match="attr must be a real-valued"):
        plot_attribution(np.array([["a", "b"], ["c", "d"]]), method="heat_map")
    with pytest.raises(TypeError, match="real-valued"):
        plot_attribution(torch.zeros(H, W, dtype=torch.complex64), method="heat_map")


def test_to_hwc_numpy_layouts():
    assert to_hwc_numpy(torch.zeros(1, 3, H, W)).shape == (H, W, 3)
    assert to_hwc_numpy(np.zeros((H, W, 3))).shape == (H, W, 3)
    assert to_hwc_numpy(np.zeros((H, W))).shape == (H, W, 1)
    # ambiguous (3, 4, 3): tensors are channels-first, arrays channels-last
    assert to_hwc_numpy(torch.zeros(3, 4, 3)).shape == (4, 3, 3)
    assert to_hwc_numpy(np.zeros((3, 4, 1))).shape == (3, 4, 1)


# The five public plots share one validation of sign / clip_percentile / alpha / cmap.
FIVE_PLOTS = {
    "plot_attribution": lambda **kw: plot_attribution(blob(), np.zeros((H, W)), **kw),
    "plot_image_attribution": lambda **kw: plot_image_attribution(np.zeros((H, W)), blob(), **kw),
    "plot_attribution_grid": lambda **kw: plot_attribution_grid(
        [np.zeros((H, W))], {"m": [blob()]}, **kw
    ),
    "plot_1d_attribution": lambda **kw: plot_1d_attribution(np.zeros(8), np.arange(8.0), **kw),
    "plot_volume_slices": lambda **kw: plot_volume_slices(None, volume_blob(), **kw),
}


@pytest.mark.parametrize("plot", list(FIVE_PLOTS), ids=list(FIVE_PLOTS))
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sign": "both"}, r"sign='both' must be one of 'all', 'positive'"),
        ({"sign": None}, "sign=None must be one of"),
        ({"clip_percentile": 0}, r"clip_percentile=0 must be a number in \(0, 100\]"),
        ({"clip_percentile": float("nan")}, "clip_percentile=nan must be a number"),
        ({"clip_percentile": True}, "clip_percentile=True must be a number"),
        ({"alpha": -0.1}, r"alpha=-0.1 must be a number in \[0, 1\]"),
        ({"alpha": "0.5"}, "alpha='0.5' must be a number"),
        ({"cmap": "no_such_map"}, "cmap='no_such_map' must be a matplotlib Colormap"),
    ],
)
def test_every_plot_checks_the_style_arguments_alike(plot, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FIVE_PLOTS[plot](**kwargs)


@pytest.mark.parametrize("plot", list(FIVE_PLOTS), ids=list(FIVE_PLOTS))
def test_every_plot_accepts_captum_sign_name_and_the_bounds(plot):
    assert isinstance(FIVE_PLOTS[plot](sign="absolute_value", clip_percentile=100, alpha=0), Figure)


# ------------------------------------------------------------------------------------------
# Degenerate data and paths (issue #9, item 12)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: plot_image_attribution(np.zeros((3, 0, 0)), np.zeros((3, 0, 0))), "image"),
        (lambda: plot_image_attribution(np.zeros((0, W)), np.zeros((0, W))), "image"),
        (lambda: plot_attribution(np.zeros((0, 0)), method="heat_map"), "attr"),
        (lambda: plot_attribution(np.zeros((H, W)), np.zeros((H, 0))), "image"),
        (
            lambda: plot_attribution_grid([np.zeros((4, 0))], {"m": [np.zeros((4, 0))]}),
            r"images\[0\]",
        ),
        (
            lambda: plot_attribution_grid([np.zeros((4, 4))], {"m": [np.zeros((4, 0))]}),
            r"attributions\['m'\]\[0\]",
        ),
        (lambda: plot_volume_slices(np.zeros((0, 4, 4)), np.zeros((0, 4, 4))), "attr"),
        (lambda: plot_volume_slices(None, np.zeros((4, 4, 0))), "attr"),
        (lambda: plot_1d_attribution(np.zeros((0, 5)), np.zeros(5)), "signal"),
    ],
)
def test_zero_size_input_is_a_value_error_naming_it(call, name):
    with pytest.raises(ValueError, match=rf"^{name} has shape .*at least one element"):
        call()


@pytest.mark.parametrize("style", ["band", "twin"])
@pytest.mark.parametrize(
    "signal",
    [
        np.array([0.0, 1.0, np.inf, 2.0, -1.0]),
        np.array([-np.inf, 1.0, 2.0, 3.0, 4.0]),
        np.full(5, np.nan),
        np.full(5, np.inf),
        np.array([np.nan, np.inf, -np.inf, np.nan, np.nan]),
    ],
)
def test_1d_signal_with_inf_or_all_nan_draws(tmp_path, style, signal):
    path = tmp_path / "s.png"
    fig = plot_1d_attribution(signal, np.linspace(-1, 1, 5), style=style, save_path=path)
    assert_png(path)
    low, high = fig.axes[0].get_ylim()
    assert np.isfinite([low, high]).all() and low < high
    finite = signal[np.isfinite(signal)]
    if finite.size:  # the finite part of the signal stays in view
        assert low < finite.min() and finite.max() < high


@pytest.mark.parametrize("style", ["band", "twin"])
@pytest.mark.parametrize(
    "attr", [np.full(5, np.nan), np.array([np.inf, -np.inf, 1.0, np.nan, 0.0])]
)
def test_1d_attribution_with_inf_or_all_nan_draws(tmp_path, style, attr):
    plot_1d_attribution(np.arange(5.0), attr, style=style, save_path=tmp_path / "a.png")
    assert_png(tmp_path / "a.png")


def test_save_path_in_a_missing_folder_is_created(tmp_path, image_chw, attr_nchw):
    path = tmp_path / "new" / "deeper" / "view.png"
    plot_image_attribution(image_chw, attr_nchw, save_path=path)
    assert_png(path)
    plot_1d_attribution(np.arange(5.0), np.ones(5), save_path=str(tmp_path / "s" / "1d.png"))
    assert_png(tmp_path / "s" / "1d.png")


def test_save_path_under_a_plain_file_names_save_path(tmp_path, image_chw, attr_nchw):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"save_path='.*file\.txt.view\.png': cannot create"):
        plot_image_attribution(image_chw, attr_nchw, save_path=blocker / "view.png")
