"""Fixtures shared by the sharded-training tests: the tasks and the uninterrupted in-process run."""

from __future__ import annotations

import pytest
from shardkit import STEPS, shard_config

from moe.tasks.family import make_family
from moe.train import Trainer


@pytest.fixture(scope="session")
def data():
    return make_family(2, 200, seed=0)


@pytest.fixture(scope="session")
def reference(data, tmp_path_factory):
    """The oracle: the final checkpoint of the uninterrupted in-process run of shard_config()."""
    out = tmp_path_factory.mktemp("inproc")
    result = Trainer(shard_config(), data, out, echo=lambda s: None).train()
    assert result.step == STEPS
    return result.checkpoint
