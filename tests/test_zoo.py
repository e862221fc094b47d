"""A CI-sized subset of the zoo (``benchmarks/zoo.py``): ``auto`` equals dense on real designs.

The full zoo (every torchvision model, timm and MONAI networks) is a benchmark; these cases cover
the designs that went wrong before the engine checked itself (MONAI's guarded skip connections),
plain CNNs that run incrementally, squeeze-excitation, a segmentation head and a video model.
"""

import pytest

from benchmarks.zoo import FLOAT32_TOLERANCE, all_cases, run_case

CI_MODELS = (
    "resnet18",
    "squeezenet1_1",
    "mobilenet_v3_small",
    "lraspp_mobilenet_v3_large",
    "BasicUNet-2d",
    "BasicUNet-3d",
    "UNet-2d",
    "AttentionUnet-2d",  # auto runs it incrementally, after the self-check
)


# One thread: the engines' chunk sizes and timings, as a user on one core would see them.
pytestmark = pytest.mark.usefixtures("one_thread")


def _cases():
    seen = set()
    cases = []
    for case in all_cases():
        if case.name in CI_MODELS and case.name not in seen:
            seen.add(case.name)
            cases.append(case)
    return cases


@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c.family}-{c.name}")
def test_auto_and_forced_incremental_equal_dense(case):
    if case.family == "monai":
        pytest.importorskip("monai")
    row = run_case(case)
    assert not row.failure, row.failure
    assert row.ok, (row.engine, row.reason, row.error32, row.forced32, row.refused)
    assert row.engine in ("dense", "incremental") and row.reason
    if row.engine == "dense":
        assert row.error32 == 0.0
    else:
        assert "verified against the model" in row.reason
        assert row.error32 <= FLOAT32_TOLERANCE or row.error64 is not None


def test_the_zoo_names_each_model_once_per_family():
    names = [(c.family, c.name) for c in all_cases()]
    assert len(names) == len(set(names))
    families = {c.family for c in all_cases()}
    assert {"torchvision", "torchvision-seg", "torchvision-video"} <= families
