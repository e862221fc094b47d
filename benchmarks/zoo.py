"""The zoo: ``engine="auto"`` against ``engine="dense"`` on every model we can build here.

Every torchvision classification, segmentation and video model (random weights, small inputs),
a selection of timm and MONAI networks. Per model, in one process, one thread:

- the ``auto`` map and, where ``auto`` ran incrementally, the dense map of the same call
  (float32); their error is the largest absolute difference over the dense map's largest
  absolute value, or over :data:`MAP_FLOOR` of the model's largest output where the map is
  smaller (0 where ``auto`` ran densely: its map is the dense map);
- the map of a forced ``engine="incremental"``, its error against the dense map the same way,
  or the reason it refused the model;
- where the float32 error exceeds :data:`FLOAT32_TOLERANCE`, both again in float64, where it must
  be within :data:`FLOAT64_TOLERANCE` (float32 cancellation is then the cause);
- which engine ``auto`` picked and why (``last_engine_reason``);
- the seconds of each call and, for ``auto``, of its self-check against the model (one run on a
  shared machine: indicative only).

``python -m benchmarks.zoo`` runs everything (about 15 minutes on 2 shared CPU cores) and writes
the table to ``benchmarks/results/zoo.md``; ``--models a,b`` runs some, ``--families`` picks
families, ``--check-cost`` measures the self-check's share of realistic full sweeps instead.
:func:`run_case` is also the test of record in ``tests/test_zoo.py`` (a CI-sized subset).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torchvision
from torch import nn

import extra_attrib.tiled_occlusion as tiled_occlusion
from extra_attrib import TiledOcclusion
from extra_attrib._incremental import _sweep as incremental_sweep

RESULTS = os.path.join("benchmarks", "results", "zoo.md")
#: ``auto`` must equal dense within this fraction of the map's scale in float32 ...
FLOAT32_TOLERANCE = 1e-4
#: ... or, where float32 cancellation is the cause, within this one in float64.
FLOAT64_TOLERANCE = 1e-9
#: Models left out: hundreds of millions of parameters (random initialisation alone takes most
#: of a minute here), or a fixed input size far beyond the zoo's.
SKIPPED = {
    "vit_h_14": "632M parameters",
    "regnet_y_128gf": "645M parameters",
    "vit_l_16": "304M parameters",
    "vit_l_32": "306M parameters",
    "mvit_v1_b": "needs 16x224x224 clips",
    "mvit_v2_s": "needs 16x224x224 clips",
    "s3d": "needs 224x224 frames",
}


@dataclass
class Case:
    """One zoo entry: how to build the model and what to explain.

    Attributes:
        family (str): ``"torchvision"``, ``"torchvision-seg"``, ``"torchvision-video"``,
            ``"timm"`` or ``"monai"``.
        name (str): The model's name in its library.
        build (callable): Returns the model (random weights, float32, eval mode).
        shape (tuple of int): Input shape ``(N, C, *S)``.
        window (tuple of int): Occlusion window per non-batch dimension.
        k (tuple of int): Windows per element per dimension.
        target (Any): What to explain.
    """

    family: str
    name: str
    build: Callable[[], nn.Module]
    shape: Tuple[int, ...]
    window: Tuple[int, ...]
    k: Tuple[int, ...]
    target: Any = 0


class _Out(nn.Module):
    """A segmentation model's ``"out"`` map (torchvision returns a dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _image(size: int = 64) -> Dict[str, Any]:
    """Window 24, k 2 (a quarter of the window at 224², where a model needs that size)."""
    window = 24 if size < 200 else 112
    return dict(shape=(1, 3, size, size), window=(3, window, window), k=(1, 2, 2))


def torchvision_cases() -> List[Case]:
    """Every torchvision classification, segmentation and video model."""
    cases = []
    models = torchvision.models
    for name in models.list_models(module=models):
        size = {"inception_v3": 96, "maxvit_t": 224}.get(name, 64)
        kwargs: Dict[str, Any] = {"num_classes": 10}
        if name in ("inception_v3", "googlenet"):
            kwargs.update(aux_logits=False, init_weights=True)
        if name.startswith("vit_"):
            kwargs["image_size"] = size
        cases.append(
            Case("torchvision", name, _builder(models.get_model, name, kwargs), **_image(size))
        )
    for name in models.list_models(module=models.segmentation):
        kwargs = {"num_classes": 4, "weights_backbone": None, "aux_loss": False}
        if name == "lraspp_mobilenet_v3_large":
            kwargs.pop("aux_loss")
        cases.append(
            Case(
                "torchvision-seg",
                name,
                _builder(models.get_model, name, kwargs, wrap=_Out),
                target=(1, 32, 32),
                **_image(64),
            )
        )
    for name in models.list_models(module=models.video):
        cases.append(
            Case(
                "torchvision-video",
                name,
                _builder(models.get_model, name, {"num_classes": 10}),
                shape=(1, 3, 8, 48, 48),
                window=(3, 8, 24, 24),
                k=(1, 1, 2, 2),
            )
        )
    return cases


TIMM_MODELS = (
    "resnet18",
    "resnet50d",
    "resnext26ts",
    "efficientnet_b0",
    "tf_efficientnet_lite0",
    "mobilenetv3_large_100",
    "mobilenetv2_100",
    "mixnet_s",
    "ghostnet_100",
    "rexnet_100",
    "regnetx_002",
    "regnety_002",
    "dla34",
    "densenet121",
    "vgg11_bn",
    "dpn68",
    "cspresnet50",
    "cspdarknet53",
    "hrnet_w18_small",
    "res2net50_14w_8s",
    "resnest14d",
    "selecsls42b",
    "xception41",
    "convnext_atto",
    "efficientvit_b0",
    "repvgg_a0",
    "mobileone_s0",
    "fbnetc_100",
    "mnasnet_100",
    "lcnet_050",
    "tinynet_e",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "poolformer_s12",
    "coat_lite_tiny",
)


def timm_cases() -> List[Case]:
    """A selection of timm networks (CNNs of many designs, a few transformers)."""
    try:
        import timm
    except ImportError:
        return []
    cases = []
    for name in TIMM_MODELS:
        kwargs: Dict[str, Any] = {"pretrained": False, "num_classes": 10}
        if name.startswith(("vit_", "deit_", "coat_")):
            kwargs["img_size"] = 64
        cases.append(Case("timm", name, _builder(timm.create_model, name, kwargs), **_image(64)))
    return cases


def monai_cases() -> List[Case]:
    """MONAI networks, 2D and 3D, classification and segmentation."""
    try:
        from monai.networks import nets
    except ImportError:
        return []
    seg2 = dict(shape=(1, 1, 64, 64), window=(1, 16, 16), k=(1, 2, 2), target=(1, 32, 32))
    seg3 = dict(
        shape=(1, 1, 32, 32, 32), window=(1, 16, 16, 16), k=(1, 2, 2, 2), target=(1, 16, 16, 16)
    )
    cls3 = dict(shape=(1, 1, 32, 32, 32), window=(1, 16, 16, 16), k=(1, 2, 2, 2), target=0)
    cls2 = dict(shape=(1, 1, 64, 64), window=(1, 24, 24), k=(1, 2, 2), target=0)
    specs: List[Tuple[str, Callable[[], nn.Module], Dict[str, Any]]] = [
        ("BasicUNet-2d", lambda: nets.BasicUNet(2, 1, 2, features=(8, 8, 16, 16, 32, 8)), seg2),
        ("BasicUNet-3d", lambda: nets.BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)), seg3),
        (
            "UNet-2d",
            lambda: nets.UNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1),
            seg2,
        ),
        (
            "UNet-3d",
            lambda: nets.UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1),
            seg3,
        ),
        ("SegResNet-2d", lambda: nets.SegResNet(2, 8, 1, 2), seg2),
        ("SegResNet-3d", lambda: nets.SegResNet(3, 8, 1, 2), seg3),
        (
            "AttentionUnet-2d",
            lambda: nets.AttentionUnet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2)),
            seg2,
        ),
        ("VNet-3d", lambda: nets.VNet(3, 1, 2), seg3),
        (
            "DenseNet121-3d",
            lambda: nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=3),
            cls3,
        ),
        (
            "DenseNet121-2d",
            lambda: nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=3),
            cls2,
        ),
        (
            "resnet10-3d",
            lambda: nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=3),
            cls3,
        ),
        (
            "resnet18-2d",
            lambda: nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=3),
            cls2,
        ),
        (
            "EfficientNetBN-b0-2d",
            lambda: nets.EfficientNetBN(
                "efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=1, num_classes=3
            ),
            cls2,
        ),
        ("HighResNet-3d", lambda: nets.HighResNet(3, 1, 2), seg3),
        (
            "DynUNet-3d",
            lambda: nets.DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16]),
            seg3,
        ),
        (
            "Classifier-2d",
            lambda: nets.Classifier((1, 64, 64), 3, channels=(4, 8, 16), strides=(2, 2, 2)),
            cls2,
        ),
        ("SENet-2d", lambda: nets.SEResNet50(spatial_dims=2, in_channels=1, num_classes=3), cls2),
        (
            "FlexibleUNet-2d",
            lambda: nets.FlexibleUNet(1, 2, "efficientnet-b0", pretrained=False, spatial_dims=2),
            seg2,
        ),
        (
            "Regressor-2d",
            lambda: nets.Regressor((1, 64, 64), (1,), channels=(4, 8), strides=(2, 2)),
            cls2,
        ),
    ]
    return [Case("monai", name, _builder(build, None, {}), **spec) for name, build, spec in specs]


def _builder(
    make: Callable[..., nn.Module],
    name: Optional[str],
    kwargs: Dict[str, Any],
    wrap: Optional[Callable[[nn.Module], nn.Module]] = None,
) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = make(name, **kwargs) if name is not None else make()
        return (wrap(model) if wrap else model).eval()

    return build


def all_cases() -> List[Case]:
    """Every zoo case, torchvision first."""
    return torchvision_cases() + timm_cases() + monai_cases()


@dataclass
class Row:
    """One zoo result."""

    case: Case
    engine: str = ""
    reason: str = ""
    error32: float = float("nan")
    error64: Optional[float] = None
    forced32: Optional[float] = None
    forced64: Optional[float] = None
    refused: str = ""
    dense_s: float = float("nan")
    auto_s: float = float("nan")
    forced_s: float = float("nan")
    check_s: float = 0.0
    failure: str = ""
    dense_fails: bool = False

    @property
    def ok(self) -> bool:
        """``auto`` equals dense, and a forced incremental equals dense or refuses."""
        if self.failure:
            return False
        return _within(self.error32, self.error64) and (
            bool(self.refused) or _within(self.forced32, self.forced64)
        )


def _within(error32: Optional[float], error64: Optional[float]) -> bool:
    """Where float64 was compared it decides (it is the exact test), else float32 does."""
    if error64 is not None:
        return error64 <= FLOAT64_TOLERANCE
    return error32 is not None and error32 <= FLOAT32_TOLERANCE


#: Errors are relative to the dense map's largest value, or to this fraction of the model's
#: largest output where the map is smaller: a random network whose output barely moves under
#: occlusion (timm RepVGG-A0 at 64²: a float64 map of 1.7e-17 from outputs of 0.14) gives a map
#: of rounding noise, which no engine can match to 1e-9 of itself.
MAP_FLOOR = 1e-6


def _output_scale(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(x)
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return max((float(t.detach().abs().max()) for t in leaves if t.numel()), default=0.0)


def _error(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    scale = max(b.abs().max().item(), floor)
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def _attribute(model: nn.Module, x: torch.Tensor, case: Case, engine: str) -> Tuple[Any, float]:
    tiled = TiledOcclusion(model)
    began = time.perf_counter()
    attr = tiled.attribute(x, target=case.target, window=case.window, k=case.k, engine=engine)
    return (attr, tiled), time.perf_counter() - began


class _CheckTimer:
    """Times the self-check (``verify_incremental``) inside ``choose_engine``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._original = getattr(incremental_sweep, "verify_incremental", None)

    def __enter__(self) -> _CheckTimer:
        if self._original is not None:
            original = self._original

            def timed(*args: Any, **kwargs: Any) -> Any:
                began = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - began

            incremental_sweep.verify_incremental = timed
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._original is not None:
            incremental_sweep.verify_incremental = self._original


def run_case(case: Case, seed: int = 0, float64: bool = False) -> Row:
    """Dense and ``auto`` maps of one case; float64 as well where float32 differs.

    Args:
        case (Case): The model and the call.
        seed (int, optional): Seed for the weights and the input. Default: 0
        float64 (bool, optional): Compare in float64 on every model, not only where float32
            differs (``--float64``). Default: False

    Returns:
        Row: The engine ``auto`` picked, why, the errors and the timings.
    """
    row = Row(case)
    try:
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = case.build()
        x = torch.randn(case.shape)
        with torch.no_grad():
            model(x)  # materialise lazy layers, fail early at an unsupported size
        floor = MAP_FLOOR * _output_scale(model, x)
        with _CheckTimer() as timer:
            (auto, tiled), row.auto_s = _attribute(model, x, case, "auto")
        row.check_s = timer.seconds
        row.engine, row.reason = tiled.last_engine, tiled.last_engine_reason
        if row.engine == "dense":  # auto's map is the dense map: no second dense sweep
            dense, row.dense_s, row.error32 = auto, row.auto_s, 0.0
        else:
            (dense, _), row.dense_s = _attribute(model, x, case, "dense")
            row.error32 = _error(auto, dense, floor)
        try:
            (forced, _), row.forced_s = _attribute(model, x, case, "incremental")
            row.forced32 = _error(forced, dense, floor)
        except ValueError as error:
            row.refused = str(error).splitlines()[0] if str(error) else "ValueError"
        if (
            float64
            or not _within(row.error32, None)
            or not (row.refused or _within(row.forced32, None))
        ):
            model64, x64 = model.double(), x.double()
            floor = MAP_FLOOR * _output_scale(model64, x64)
            (dense64, _), _ = _attribute(model64, x64, case, "dense")
            if row.engine != "dense":
                (auto64, _), _ = _attribute(model64, x64, case, "auto")
                row.error64 = _error(auto64, dense64, floor)
            if not row.refused:
                (forced64, _), _ = _attribute(model64, x64, case, "incremental")
                row.forced64 = _error(forced64, dense64, floor)
    except Exception as error:  # a row per model, whatever happens
        first = str(error).splitlines()[0] if str(error) else ""
        row.failure = f"{type(error).__name__}: {first}"[:200]
        row.dense_fails = _dense_fails(case, seed)
    return row


def _dense_fails(case: Case, seed: int) -> bool:
    """Whether the dense engine fails on ``case`` too (the model or the size is the problem)."""
    try:
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = case.build()
        _attribute(model, torch.randn(case.shape), case, "dense")
    except Exception:
        return True
    return False


def _fmt_error(error32: Optional[float], error64: Optional[float]) -> str:
    if error32 is None:
        return "-"
    text = f"{error32:.1e}"
    if error64 is not None:
        text += f" (float64 {error64:.1e})"
    return text


def table(rows: Sequence[Row]) -> str:
    """The markdown table of the zoo."""
    lines = [
        "| family | model | input | auto picks | auto error | forced incremental error | "
        "dense s | auto s | incremental s | self-check s | ok | auto's reason; incremental's "
        "refusal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r.case
        shape = "x".join(map(str, c.shape))
        if r.failure:
            forced, ok = "-", "dense fails too" if r.dense_fails else "NO"
            reason = r.failure
        else:
            forced = "refused" if r.refused else _fmt_error(r.forced32, r.forced64)
            ok = "yes" if r.ok else "NO"
            reason = r.reason + (f"; refused: {r.refused}" if r.refused else "")
        reason = reason.replace("|", "/")
        error = "-" if r.failure else _fmt_error(r.error32, r.error64)
        lines.append(
            f"| {c.family} | {c.name} | {shape} | {r.engine or '-'} | {error} | {forced} | "
            f"{r.dense_s:.2f} | {r.auto_s:.2f} | {r.forced_s:.2f} | {r.check_s:.2f} | {ok} "
            f"| {reason} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The self-check's share of realistic sweeps
# ---------------------------------------------------------------------------------------------


def _cnn3d() -> nn.Module:
    layers: List[nn.Module] = []
    c_in = 1
    for c in (16, 32, 64, 128):
        layers += [nn.Conv3d(c_in, c, 3, padding=1), nn.BatchNorm3d(c), nn.ReLU(), nn.MaxPool3d(2)]
        c_in = c
    layers += [nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(c_in, 10)]
    return nn.Sequential(*layers).eval()


CHECK_COST_CASES = (
    (
        "resnet18",
        lambda: torchvision.models.resnet18(num_classes=10).eval(),
        (1, 3, 224, 224),
        (3, 32, 32),
        (1, 4, 4),
    ),
    (
        "vgg11",
        lambda: torchvision.models.vgg11(num_classes=10).eval(),
        (1, 3, 224, 224),
        (3, 32, 32),
        (1, 4, 4),
    ),
    ("cnn3d", _cnn3d, (1, 1, 64, 64, 64), (1, 16, 16, 16), (1, 2, 2, 2)),
)


class _SweepTimer:
    """Times the occlusion sweep inside ``attribute`` and keeps its result (reused windows)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.results: List[Any] = []
        self._original = tiled_occlusion.occlusion_sweep

    def __enter__(self) -> _SweepTimer:
        original = self._original

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                result = original(*args, **kwargs)
                self.results.append(result)
                return result
            finally:
                self.seconds += time.perf_counter() - began

        tiled_occlusion.occlusion_sweep = timed  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: Any) -> None:
        tiled_occlusion.occlusion_sweep = self._original  # type: ignore[assignment]


def check_cost(repeats: int = 1) -> str:
    """Seconds of the self-check over seconds of a whole ``auto`` call, per realistic case.

    The check's windows count towards the map (#18, #20): the sweep does not evaluate them
    again. ``net`` subtracts what the sweep would have spent on them (the reused windows times
    the sweep's seconds per evaluated window) from the check's seconds.
    """
    lines = [
        "| model | input | window, k | windows | auto picks | auto call s | self-check s | share "
        "| reused | net s | net share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, build, shape, window, k in CHECK_COST_CASES:
        torch.manual_seed(0)
        model, x = build(), torch.randn(shape)
        for _ in range(repeats):
            with _CheckTimer() as timer, _SweepTimer() as sweep:
                tiled = TiledOcclusion(model)
                began = time.perf_counter()
                tiled.attribute(x, target=0, window=window, k=k)
                total = time.perf_counter() - began
            reused = sum(getattr(r, "reused", 0) for r in sweep.results)
            evaluated = max(tiled.last_perturbations - reused, 1)
            net = timer.seconds - reused * sweep.seconds / evaluated
            lines.append(
                f"| {name} | {'x'.join(map(str, shape))} | {window[-1]}, {k[-1]} | "
                f"{tiled.last_perturbations} | {tiled.last_engine} | {total:.1f} | "
                f"{timer.seconds:.2f} | {100 * timer.seconds / total:.1f} % | {reused} | "
                f"{net:.2f} | {100 * net / total:.1f} % |"
            )
            print(lines[-1], flush=True)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Speed: dense, auto and forced incremental on realistic sizes (#20)
# ---------------------------------------------------------------------------------------------

SPEED_RESULTS = os.path.join("benchmarks", "results", "zoo_speed.md")


def _monai_unet3d() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        3, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2, norm="batch"
    ).eval()  # MONAI's default norm is instance norm, which mixes the whole map


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10).eval()

    return build


def _tv(name: str) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, num_classes=10).eval()


_IMAGE224 = ((1, 3, 224, 224), (3, 32, 32), (1, 1, 1), 0)
#: (name, build, input shape, window, k, target): the representative subset of #20 at 224² and,
#: for the 3D U-Net, 64³ (its target: one voxel of class 1 at the centre).
SPEED_CASES: Tuple[Tuple[str, Callable[[], nn.Module], Tuple[int, ...], Any, Any, Any], ...] = (
    ("resnet50", _tv("resnet50"), *_IMAGE224),
    ("densenet121", _tv("densenet121"), *_IMAGE224),
    ("vgg16", _tv("vgg16"), *_IMAGE224),
    ("mobilenet_v2", _tv("mobilenet_v2"), *_IMAGE224),
    ("convnext_tiny", _tv("convnext_tiny"), *_IMAGE224),
    ("timm cspresnet50", _timm("cspresnet50"), *_IMAGE224),
    ("efficientnet_b0 (SE)", _tv("efficientnet_b0"), *_IMAGE224),
    (
        "MONAI UNet-3d (BN)",
        _monai_unet3d,
        (1, 1, 64, 64, 64),
        (1, 16, 16, 16),
        (1, 1, 1, 1),
        (1, 32, 32, 32),
    ),
)


def speed(names: Sequence[str] = (), repeats: int = 2, k: int = 1) -> str:
    """Seconds of whole calls: dense, auto (deciding included) and forced incremental.

    Each call uses a fresh :class:`TiledOcclusion` (no remembered chunk size or engine), so
    ``auto`` pays for tracing, its self-check and the timing race every time. The three calls
    are interleaved, ``repeats`` times; the table gives the fastest of each (a passing load on
    a shared machine only slows a call down) and the speed-ups over dense. ``k`` windows cover
    each element per spatial dimension (more windows per call: the cost of deciding is a
    smaller share).
    """
    lines = [
        "| model | input | window, k | windows | dense s | auto s | incremental s | auto picks "
        "| auto vs dense | incremental vs dense | auto vs the better |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, build, shape, window, _, target in SPEED_CASES:
        if names and name not in names:
            continue
        tiling = (1,) + (k,) * (len(shape) - 2)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build()
        x = torch.randn(shape)
        with torch.no_grad():
            model(x)
        times: Dict[str, List[float]] = {"dense": [], "auto": [], "incremental": []}
        picks, windows = [], 0
        for _ in range(repeats):
            for engine in times:
                tiled = TiledOcclusion(model)
                began = time.perf_counter()
                try:
                    tiled.attribute(x, target=target, window=window, k=tiling, engine=engine)
                except ValueError:
                    times[engine].append(float("nan"))
                    continue
                times[engine].append(time.perf_counter() - began)
                windows = tiled.last_perturbations
                if engine == "auto":
                    picks.append(tiled.last_engine)
        best = {e: min(t) for e, t in times.items()}
        better = min(t for t in (best["dense"], best["incremental"]) if t == t)  # not NaN
        lines.append(
            f"| {name} | {'x'.join(map(str, shape[1:]))} | {window[-1]}, {k} | {windows} | "
            f"{best['dense']:.1f} | {best['auto']:.1f} | {best['incremental']:.1f} | "
            f"{'/'.join(picks)} | {best['dense'] / best['auto']:.2f}x | "
            f"{best['dense'] / best['incremental']:.2f}x | {better / best['auto']:.2f}x |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated model names (default: all)")
    parser.add_argument("--families", default="", help="comma-separated families (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--check-cost", action="store_true", help="only the self-check's share")
    parser.add_argument(
        "--float64", action="store_true", help="compare in float64 on every model as well"
    )
    parser.add_argument(
        "--speed",
        action="store_true",
        help="only the speed table: dense, auto and incremental on 224² / 64³ (#20)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="speed: interleaved repeats")
    parser.add_argument("--k", type=int, default=1, help="speed: windows per element and dim")
    parser.add_argument("--out", default=RESULTS, help="markdown file to write ('' for none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    header = (
        f"run started {started:%Y-%m-%d %H:%M} UTC, {platform.machine()}, {args.threads} "
        f"thread(s), torch {torch.__version__}, torchvision {torchvision.__version__}; the "
        "machine was shared with other jobs, so seconds are indicative only."
    )
    if args.check_cost:
        print(check_cost())
        return
    wanted = {m for m in args.models.split(",") if m}
    if args.speed:
        text = speed(sorted(wanted), args.repeats, args.k)
        out = SPEED_RESULTS if args.out == RESULTS else args.out
        if out:
            with open(out, "w") as f:
                f.write(f"# The zoo: speed of auto against dense (#20)\n\n{header}\n\n{text}\n")
            print(f"wrote {out}", file=sys.stderr)
        return
    families = {f for f in args.families.split(",") if f}
    rows = []
    for case in all_cases():
        if (wanted and case.name not in wanted) or (families and case.family not in families):
            continue
        if case.name in SKIPPED and case.name not in wanted:
            print(f"skip {case.name}: {SKIPPED[case.name]}", flush=True)
            continue
        row = run_case(case, float64=args.float64)
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
    text = table(rows)
    summary = (
        f"{sum(r.ok for r in rows)} of {len(rows)} models: auto equals dense within "
        f"{FLOAT32_TOLERANCE:g} of the map's scale in float32 (or {FLOAT64_TOLERANCE:g} in "
        f"float64); {sum(r.engine == 'incremental' for r in rows)} ran incrementally; "
        f"{sum(bool(r.failure) and r.dense_fails for r in rows)} failed with dense too; "
        f"{sum(bool(r.failure) and not r.dense_fails for r in rows)} failed where dense works. "
        "Skipped: " + ", ".join(f"{k} ({v})" for k, v in SKIPPED.items())
    )
    print(summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# The zoo: auto against dense\n\n{header}\n\n{summary}\n\n{text}\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
