"""Which cluster train is part of (steps.network.distributed): TF_CONFIG checked, or local workers."""

from __future__ import annotations

import re

import pytest

from steps.core.config import ConfigError
from steps.core.loader import load_config
from steps.network import distributed

pytestmark = pytest.mark.unit


def test_tf_config_is_checked_and_not_given_with_local_workers():
    config = load_config({"train.workers": "2"})
    with pytest.raises(ConfigError, match="train.workers: 2 with TF_CONFIG set"):
        distributed.resolve(config, {"TF_CONFIG": distributed.Cluster(("a:1", "b:2"), 0).tf_config()})
    for text, problem in [
        ("{not json", "TF_CONFIG: expected {'cluster'"),
        ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}', "only 'worker'"),
        ('{"cluster": {"worker": ["a:1", "b"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
        ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}', r"in \[0, 1\], got 2"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(problem) if "[" not in problem else problem):
            distributed.from_tf_config(text)
    one = load_config({})
    assert distributed.resolve(one, {}) is None  # one worker: trained exactly as without a cluster
    local = distributed.resolve(load_config({"train.workers": "3"}), {})
    assert local is not None and local.chief and len(set(local.workers)) == 3
    assert distributed.is_worker({"TF_CONFIG": local.tf_config(2)}) and not distributed.is_worker({})


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"ema": 0.99}, "keeps an average of its weights (ema)"),
        ({"start_size": 96, "start_epochs": 1}, "trains its first epochs smaller (start_size)"),
    ],
)
def test_a_set_the_workers_cannot_train_is_refused_on_several_workers_only(changes, refusal):
    import dataclasses

    config = load_config({"train.workers": "2"})
    name = config.train.hparams[0]
    changed = dataclasses.replace(config.hparam_sets[name], **changes)
    config = dataclasses.replace(config, hparam_sets={**config.hparam_sets, name: changed})
    with pytest.raises(ConfigError, match=re.escape(f"train.hparams: set '{name}' {refusal}")):
        distributed.resolve(config, {})
    one = dataclasses.replace(config, train=dataclasses.replace(config.train, workers=1))
    assert distributed.resolve(one, {}) is None
