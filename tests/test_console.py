"""The console filters drop exactly the known-harmless messages, by logger."""

from __future__ import annotations

import logging
import sys
import types
import warnings
from pathlib import Path

from sweeper import console


def _passes(logger_name: str, message: str) -> bool:
    """Whether a record of `message` on `logger_name` gets past the logger's filters."""
    logger = logging.getLogger(logger_name)
    record = logger.makeRecord(logger_name, logging.WARNING, __file__, 1, message, (), None)
    return bool(logger.filter(record))


def test_harmless_messages_are_dropped_and_others_kept() -> None:
    console.quiet_process()
    console.quiet_process()  # idempotent: one filter per logger
    cfg = "transformers.configuration_utils"
    assert sum(isinstance(f, console._Harmless) for f in logging.getLogger(cfg).filters) == 1
    default = ("Model config: bos_token_id must be `None` or an integer within the vocabulary "
               "(between 0 and 31999), got 49406. This may result in unexpected behavior.")
    assert not _passes(cfg, default)
    # The same warning about a real checkpoint's own ids is not HF's default: it shows.
    assert _passes(cfg, default.replace("31999), got 49406", "99), got 120"))
    train = console._train_context_logger()
    assert not _passes(train, "Reporting training result 2: TrainingReport(...) from rank 0")
    assert _passes(train, "Some other Ray Train message")
    tune = "ray.tune.execution.tune_controller"
    assert not _passes(tune, "Trial task failed for trial t1")
    assert _passes(tune, "Trial t1 cannot resume")
    scaling = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
    assert not _passes(scaling, "Failed to send resource request for train-1. If this only "
                       "happens transiently during network partition or CPU being overloaded,"
                       " it's safe to ignore this error. If this error persists, file a ...")
    assert _passes("transformers.modeling_utils", default)  # only the logger named


def test_ray_data_deprecation_is_ignored_other_warnings_shown() -> None:
    console.quiet_process()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        console.quiet_process()  # re-adds its filter in front of "default"
        warnings.warn_explicit("`ExecutionOptions.exclude_resources` is deprecated",
                               DeprecationWarning, "execution_options.py", 436,
                               module="ray.data._internal.execution.interfaces")
        warnings.warn_explicit("something else", DeprecationWarning, "x.py", 1,
                               module="ray.data._internal.x")
    assert [str(w.message) for w in seen] == ["something else"]


def test_unraisable_system_exit_is_dropped_others_reach_the_hook() -> None:
    got: list[object] = []
    hook = console._drop_exit_during_shutdown(got.append)
    hook(types.SimpleNamespace(exc_value=SystemExit(1)))
    other = types.SimpleNamespace(exc_value=ValueError("x"))
    hook(other)
    assert got == [other]
    console.quiet_process()
    assert getattr(sys.unraisablehook, "sweeper_quiet", False)


def test_pretraining_the_tiny_model_shows_no_progress_bar(tmp_path, capfd) -> None:
    """Saving the tiny preset prints no "Writing model shards" bar, and the bar setting of
    the process is left as it was."""
    from transformers.utils import logging as hf_logging

    from sweeper.prepare import resolve_checkpoint
    from sweeper.spec import ModelSpec, TinyModelSpec
    from tests.conftest import TINY

    hf_logging.enable_progress_bar()
    tiny = TinyModelSpec(**{**TINY, "pretrain_epochs": 1, "pretrain_per_class": 2})
    path = resolve_checkpoint(ModelSpec(pretrained="tiny", tiny=tiny), str(tmp_path))
    out = capfd.readouterr()
    assert (Path(path) / "config.json").is_file()
    assert "Writing model shards" not in out.out + out.err
    assert "it/s" not in out.out + out.err
    assert hf_logging.is_progress_bar_enabled()
