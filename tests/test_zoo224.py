"""The 224² zoo benchmark sorts models correctly and summarises honestly (#20)."""

import torchvision

from benchmarks.zoo224 import mixing_modules, summary, table


def test_squeeze_excitation_and_attention_are_found_plain_cnns_are_not():
    models = torchvision.models
    assert mixing_modules(models.efficientnet_b0()) == ["SqueezeExcitation"]
    assert "EncoderBlock" in mixing_modules(models.vit_b_32(image_size=64))
    assert mixing_modules(models.mobilenet_v3_small()) == ["SqueezeExcitation"]
    for plain in (models.resnet18(), models.densenet121(), models.convnext_tiny()):
        assert mixing_modules(plain) == []


def test_summary_counts_only_cnns_and_takes_the_median():
    rows = [
        {"model": "a", "mixing": "", "kept": "incremental", "speedup": 2.0},
        {"model": "b", "mixing": "", "kept": "incremental", "speedup": 1.5},
        {"model": "c", "mixing": "", "kept": "dense", "speedup": 1.0},
        {"model": "d", "mixing": "SqueezeExcitation"},
    ]
    text = summary(rows)
    assert "3 CNNs" in text and "left out: d" in text
    assert "**2 of 3 (67 %)**" in text and "**1.50x**" in text
    rows[2].update(
        choice="dense", reason="too few windows", dense_ms=1.0, incremental_ms=None, decide_s=0.1
    )
    assert "dense: too few windows" in table(rows[2:3])
