"""Exact incremental occlusion for CNNs (Krypton-style), 1D to 3D.

An occlusion window changes only a box of each convolution's output. This module traces the model
once with :mod:`torch.fx`, runs the clean input once keeping the activations a box reads, and
then, for a chunk of ``B`` windows, propagates per node only the changed box of each window, all
windows of the chunk batched together:

- A changed activation is a :class:`Patch`: the clean activation (stored once, ``N`` examples), a
  fixed-size box of new values per window ``(B * N, C, *size)`` and each box's start ``(B, d)``.
  Boxes have one size per node and chunk (starts are clamped so the box stays inside the map;
  recomputing some unchanged values is still exact), so a chunk is one batched tensor.
- The one primitive is :func:`gather`: the values of the patched map at per-window absolute
  coordinates, the patch inside its box and the clean activation elsewhere, with out-of-range
  coordinates mapped per padding mode (constant fill, reflect, replicate, circular).
- Convolution and max/avg pooling gather the input context of their output box and run with
  padding 0; pointwise ops (eval BatchNorm, activations, eval Dropout) keep the box; constant
  padding shifts it; add/sub/mul/div and channel concat gather every operand on the union box.
- Today's CNNs (#20): transposed convolutions and integer upsampling gather their input context
  and crop each window's output box; eval ``F.batch_norm`` and LayerNorm / Linear over
  non-spatial dimensions are pointwise in space; a :class:`Moved` is a patch seen through
  permutes, transposes, views and unsqueezes that keep the batch first and the spatial
  dimensions in order (channels last, channel shuffle), split / chunk / sliced along channels;
  shape facts (``x.ndim``, ``x.dtype``) and the checks built on them are static.
- Several inputs (#20): one placeholder per tensor; each swept input's patch starts at its own
  placeholder, and what depends only on the other inputs keeps its clean activations, read on
  the boxes where it meets a patch (a per-example gate broadcast over space included). An input
  that is not spatial, or whose path reaches an unknown op, is swept densely through the model.
- Ops that mix the whole map (global pooling, Linear over space, flatten, normalisation over
  space, ...) and boxes covering most of their map switch to dense: full patched maps
  ``(B * N, ...)`` are materialised and the rest of the graph runs as in the model.
- Any other op (attention modules, einsum, ...) makes the model unsupported: the caller falls
  back to the dense engine (``engine="auto"``) or raises (``engine="incremental"``).

The result equals the dense engine up to float rounding: the same ops on the same values. The
trace is a copy of the model's arithmetic, so :func:`choose_engine` checks it against the real
model on every call before a sweep uses it (:mod:`extra_attrib._verify`), and refuses in-place
writes that a later node would observe (:mod:`extra_attrib._aliasing`).

The package's files are its layers, each depending only on those above it:

- ``_ops``: what each operation is (the tables that sort nodes into rules, layer facts, cost).
- ``_keep``: which clean activations a sweep keeps (those a box reads around it); the others are
  placeholders, recomputed from their inputs when read.
- ``_boxes``: changed values (:class:`Patch`, :class:`Moved`), gathering, and box geometry.
- ``_rules`` and ``_rules_moved``: one rule per operation, classic CNN layers and today's.
- ``_aliasing``, ``_program``: tracing without side effects, in-place analysis, planning, the
  clean and patched runs, and the program cache keyed by the model's fingerprint.
- ``_verify``, ``_sweep``: the self-check against the real model, the evaluator the sweep calls
  and the choice between engines.
"""

from extra_attrib._incremental._boxes import (
    Moved,
    Patch,
    changed_span,
    gather,
    input_patch,
    materialise,
    output_box,
    output_span,
    source_index,
)
from extra_attrib._incremental._ops import ELEMENT_COST, UnsupportedModel
from extra_attrib._incremental._program import (
    DENSE_FRACTION,
    IncrementalProgram,
    model_fingerprint,
    program_for,
)
from extra_attrib._incremental._sweep import (
    ACTIVATION_BUDGET_BYTES,
    MIN_PREDICTED_GAIN,
    EngineChoice,
    IncrementalSweep,
    central_box,
    choose_engine,
    declined_model,
    examples_per_group,
)
from extra_attrib._incremental._verify import VerificationFailed, verify_incremental

__all__ = [
    "ACTIVATION_BUDGET_BYTES",
    "DENSE_FRACTION",
    "ELEMENT_COST",
    "MIN_PREDICTED_GAIN",
    "EngineChoice",
    "IncrementalProgram",
    "IncrementalSweep",
    "Moved",
    "Patch",
    "UnsupportedModel",
    "VerificationFailed",
    "central_box",
    "changed_span",
    "choose_engine",
    "declined_model",
    "examples_per_group",
    "gather",
    "input_patch",
    "materialise",
    "model_fingerprint",
    "output_box",
    "output_span",
    "program_for",
    "source_index",
    "verify_incremental",
]
