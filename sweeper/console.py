"""What a sweep prints: the known-harmless messages of Ray and transformers are dropped by
their logger (or, for Python warnings, by category and module), never by editing output;
`--verbose` keeps everything.

`quiet_process()` runs in the CLI process and, as Ray's `worker_process_setup_hook`, in every
Ray worker process of the sweep (Tune trials, Train controllers and workers, cache tasks),
so the lines are never written rather than written and hidden. Errors and warnings that
matter still show: each filter names one message of one logger.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from typing import Any

# (logger, message pattern): messages that say nothing about the user's sweep.
HARMLESS: tuple[tuple[str, str], ...] = (
    # transformers builds a default SiglipTextConfig (vocab 32000, CLIP's bos/eos ids) to
    # diff every SigLIP config against when it saves, loads or prints one: its own defaults
    # disagree, whatever the checkpoint says (the hub's google/siglip-* too).
    ("transformers.configuration_utils",
     r"^Model config: (bos|eos)_token_id must be `None` or an integer within the vocabulary "
     r"\(between 0 and 31999\), got 4940[67]\."),
    # Training preprocesses with sweeper.data.transform (checked against the PIL backend);
    # which backend AutoProcessor picks for itself changes nothing here.
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back"),
    # The CLI prints its own dashboard line and says how to get the token.
    ("ray._private.authentication.authentication_token_setup",
     r"^Token authentication is enabled for this Ray cluster"),
    # Ray Train's controller asks the autoscaler for a trial's resources; on a busy machine
    # the request times out now and then, which Ray itself calls "safe to ignore".
    ("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
     r"^Failed to send resource request for .* it's safe to ignore this error"),
    # Tune's traceback of a failed trial wraps the worker's, which Ray Train prints itself;
    # the CLI prints the error's first line, and status.json keeps the whole of it.
    ("ray.tune.execution.tune_controller", r"^Trial task failed for trial "),
)


class _Harmless(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def _drop_exit_during_shutdown(hook: Any) -> Any:
    """An unraisable hook that drops the SystemExit Ray's SIGTERM handler raises inside
    garbage collection while Tune ends a finished trial's process (printed as "Exception
    ignored in: <function WeakSet...>"); anything else goes to `hook`."""

    def unraisable(info: Any) -> None:
        if isinstance(info.exc_value, SystemExit):
            return
        hook(info)

    unraisable.sweeper_quiet = True  # type: ignore[attr-defined]
    return unraisable


def _train_context_logger() -> str:
    """The name of the logger Ray Train's worker context writes "Reporting training result"
    to: the module's file path (`logging.getLogger(__file__)`), outside `ray.train`, so
    `RunConfig(logging_config=...)` does not reach it."""
    import ray

    return os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal",
                        "execution", "context.py")


def quiet_process() -> None:
    """Drop the known-harmless messages in this process (idempotent)."""
    every = (*HARMLESS, (_train_context_logger(), r"^Reporting training result \d+: "))
    for name, pattern in every:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Harmless) and f.pattern.pattern == pattern
                   for f in logger.filters):
            logger.addFilter(_Harmless(pattern))
    # Ray Data's own internals use an option it has deprecated; nothing of ours does.
    warnings.filterwarnings("ignore", message=r".*ExecutionOptions\.exclude_resources",
                            module=r"ray\.data")
    if not getattr(sys.unraisablehook, "sweeper_quiet", False):
        sys.unraisablehook = _drop_exit_during_shutdown(sys.unraisablehook)


def dashboard_banner(info: dict[str, Any], dashboard_host: str, token_auth: bool) -> str:
    """What the CLI prints about the dashboard (`info` from `orchestration.init_ray`): its
    URL, and how to get the access token when the cluster asks for one."""
    url = info.get("dashboard_url")
    if not url:
        return ("Ray dashboard: none on this cluster (start the head with "
                "--include-dashboard=true): Train runs are not listed, and the placement "
                "groups of trials stopped early may leak (ray-project/ray#54305)")
    lines = [f"Ray dashboard: {url}"]
    if token_auth:
        lines.append("  It asks for the cluster's access token: `ray get-auth-token` prints "
                     "it (stored in ~/.ray/auth_token); API clients send "
                     "'Authorization: Bearer <token>'.")
    if info.get("local") and dashboard_host not in ("127.0.0.1", "localhost", "::1"):
        lines.append(f"  Listening on {dashboard_host}: reachable from other machines.")
    return "\n".join(lines)


def trial_ending(status: dict[str, Any], last: dict[str, Any]) -> str:
    """How a trial that Tune saw complete ended, in a few words: its status.json `status`
    and the last result Tune holds."""
    # Imported here: the setup hook that imports this module runs in every Ray process.
    from sweeper.sink import first_error_line

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    state = status.get("status") or "terminated"
    if state == "diverged":
        return f"diverged: {first_error_line(status.get('error')) or 'non-finite loss'}"
    early = " (stopped early)" if status.get("stopped_early") else ""
    return (f"{state}{early}: val top-1 {pct(last.get('val_top1'))}, best "
            f"{pct(status.get('best_val_top1'))} at step {status.get('best_step', '-')}")
