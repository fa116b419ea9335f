"""Model specs round-trip through JSON and build the architecture they describe."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from z0inf_pipeline.errors import InputError
from z0inf_pipeline.training import ModelSpec, build_model


@pytest.mark.parametrize(
    ("spec", "linear_shapes"),
    [
        (ModelSpec("logreg", (64,), 10), [(10, 64)]),
        (ModelSpec("mlp", (30,), 2, hidden=(16, 8)), [(16, 30), (8, 16), (2, 8)]),
        (ModelSpec("cnn", (1, 8, 8), 10, hidden=(32,)), [(32, 32 * 4 * 4), (10, 32)]),
    ],
)
def test_specs_build_their_architecture_and_round_trip(spec, linear_shapes):
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    model = build_model(spec)
    assert [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)] == linear_shapes
    out = model(torch.zeros(5, *spec.input_shape))
    assert out.shape == (5, spec.num_classes)


def test_same_seed_same_initial_weights():
    spec = ModelSpec("mlp", (64,), 10)
    torch.manual_seed(7)
    a = build_model(spec).state_dict()
    torch.manual_seed(7)
    b = build_model(spec).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="rnn", input_shape=(4,), num_classes=2), "model kind 'rnn'"),
        (dict(kind="cnn", input_shape=(64,), num_classes=10), "cnn needs"),
        (dict(kind="mlp", input_shape=(4,), num_classes=1), "at least 2"),
        (dict(kind="mlp", input_shape=(4,), num_classes=2, hidden=(0,)), "must be positive"),
    ],
)
def test_bad_specs_are_rejected(kwargs, message):
    with pytest.raises(InputError, match=message):
        ModelSpec(**kwargs)
    with pytest.raises(InputError, match="malformed"):
        ModelSpec.from_dict({"kind": "mlp"})
