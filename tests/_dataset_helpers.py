"""Tiny models, datasets and a script for the explain_dataset / CLI tests.

Run as a script (``python -m tests._dataset_helpers STORE [--kill-after CALLS]``, also under
torchrun) it explains :func:`make_dataset` with :func:`make_method` into STORE and prints
``rank R computed C items: SUMMARY``; with ``--kill-after`` the process SIGKILLs itself in the
middle of the model's CALLS-th forward pass (a second after it starts); with ``--kill-at-step
NAME`` it SIGKILLs itself right after step NAME of the store's creation (``_store.create``).
"""

import argparse
import os
import signal
import time

import numpy as np
import torch
from torch import nn

from extra_attrib import TiledOcclusion, explain_dataset

SHAPE = (2, 8, 8)
CLASSES = 3
N_ITEMS = 10
ATTRIBUTE_KWARGS = {"window": 4, "k": 2, "perturbations_per_eval": 5}


class TinyNet(nn.Module):
    """Conv + linear, float64, deterministic weights; optionally dies after ``kill_after`` calls."""

    def __init__(self, shape=SHAPE, classes=CLASSES, seed=0, kill_after=None):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(shape) - 1]
        self.conv = conv(shape[0], 3, 3, padding=1, dtype=torch.float64)
        self.head = nn.Linear(3 * int(np.prod(shape[1:])), classes, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        self.calls = 0
        self.rows = 0
        self.kill_after = kill_after

    def forward(self, x):
        self.calls += 1
        self.rows += x.shape[0]
        if self.kill_after is not None and self.calls >= self.kill_after:
            time.sleep(1.0)  # let the background writer land the earlier batches
            os.kill(os.getpid(), signal.SIGKILL)
        if torch.isnan(x).any():
            raise ValueError("the model refuses NaN inputs")
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class CountingMethod:
    """A Captum method wrapper that counts the items it attributes (not a Captum class)."""

    def __init__(self, method):
        self.attribution_method = method
        self.items = 0

    def attribute(self, inputs, **kwargs):
        self.items += inputs.shape[0]
        return self.attribution_method.attribute(inputs, **kwargs)


class ItemsDataset(torch.utils.data.Dataset):
    """``n`` random items of ``shape`` with labels; chosen indices raise or hold NaN."""

    def __init__(self, n=N_ITEMS, shape=SHAPE, corrupt=(), nan=(), seed=1, with_labels=True):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn((n, *shape), generator=gen, dtype=torch.float64)
        self.labels = torch.arange(n) % CLASSES
        self.corrupt, self.nan, self.with_labels = set(corrupt), set(nan), with_labels

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        if index in self.corrupt:
            raise OSError(f"item {index} is corrupt")
        x = self.x[index].clone()
        if index in self.nan:
            x[0, 0] = float("nan")
        return (x, int(self.labels[index])) if self.with_labels else x


def item_paths(n=N_ITEMS):
    """Names for ``dataset.paths`` (no files behind them: the store only records them)."""
    return [f"item_{i:03d}.pt" for i in range(n)]


def make_method(model=None):
    return TiledOcclusion(model if model is not None else TinyNet().eval())


def factory():
    """For ``--model tests._dataset_helpers:factory``: a tiny RGB classifier and its transform."""
    model = TinyNet(shape=(3, 16, 16), classes=4).float().eval()

    def transform(image):
        array = np.asarray(image.convert("RGB").resize((16, 16)), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    return model, transform


def factory_model_only():
    return TinyNet(shape=(3, 224, 224), classes=4).float().eval()


def factory_that_raises():
    raise RuntimeError("no weights here")


def factory_with_argument(path):
    return factory()


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--kill-after", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--kill-at-step", default=None)
    parser.add_argument("--paths", action="store_true", help="give the dataset a paths list")
    parser.add_argument("--no-resume", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # the classes by their importable names, not __main__'s: they are part of the fingerprint
    from extra_attrib import _store
    from tests import _dataset_helpers as helpers

    if args.kill_at_step is not None:

        def step(name):
            if name == args.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)

        _store._creation_step = step
    model = helpers.TinyNet(kill_after=args.kill_after).eval()
    method = helpers.CountingMethod(helpers.make_method(model))
    dataset = helpers.ItemsDataset()
    if args.paths:
        dataset.paths = item_paths()
    summary = explain_dataset(
        method,
        dataset,
        args.store,
        batch_size=args.batch_size,
        dtype=torch.float64,
        show_progress=False,
        resume=not args.no_resume,
        **ATTRIBUTE_KWARGS,
    )
    print(
        f"rank {os.environ.get('RANK', '0')} computed {method.items} items: {summary}", flush=True
    )


if __name__ == "__main__":
    main()
