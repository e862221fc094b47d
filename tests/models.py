"""Small models built by the tests."""

import math

import torch
from torch import nn


class FlatLinear(nn.Module):
    """Flatten + linear + tanh: not translation invariant, so windows are told apart."""

    def __init__(self, shape, classes=4, dtype=torch.float64):
        super().__init__()
        self.linear = nn.Linear(math.prod(shape), classes, dtype=dtype)
        self.mix = nn.Linear(classes, classes, dtype=dtype)

    def forward(self, x):
        return self.mix(torch.tanh(self.linear(x.flatten(1))))


class TwoInput(nn.Module):
    """Two inputs of different shapes and one extra scalar argument."""

    def __init__(self, shape_a, shape_b, classes=3):
        super().__init__()
        self.a = FlatLinear(shape_a, classes)
        self.b = FlatLinear(shape_b, classes)

    def forward(self, xa, xb, scale=1.0):
        return self.a(xa) * scale + self.b(xb) ** 2


def init_bn(model):
    """Non-trivial BatchNorm statistics and affine parameters, so BatchNorm is not the identity."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model
