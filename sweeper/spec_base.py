"""The building blocks of the spec tree (`sweeper.spec`): the strict, frozen model every
section derives from, numbers that refuse YAML booleans, filesystem options without
credentials, and the one-line refusal. Imports nothing of sweeper."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict


def _not_bool(v: Any) -> Any:
    # YAML `yes`/`true` is a boolean, which Python (and pydantic's lax mode) would take as 1.
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got the boolean {str(v).lower()}")
    return v


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]


class SpecError(ValueError):
    """A refused search space. `str(err)` is one line: `key.path: what is wrong`."""

    def __init__(self, message: str) -> None:
        # Keys and values come from user YAML and may hold newlines: keep the promise of
        # one line whatever they contain.
        super().__init__(" ".join(str(message).splitlines()))


class Strict(BaseModel):
    """A spec section: unknown keys refused, frozen, `.inf`/`.nan` refused."""

    # allow_inf_nan: `.inf` and `.nan` are YAML floats, and no key of ours means them.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


def _filesystem_options(v: dict[str, Any] | None) -> dict[str, Any] | None:
    """A `storage_filesystem` / `data.filesystem` mapping: a `type`, and no credentials."""
    # The spec is copied into sweep.json in the bucket: credentials stay in the
    # environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS) or the cloud's own files.
    for key in v or {}:
        if re.search(r"secret|password|token|access_key|credential", str(key), re.I):
            raise ValueError(f"{key}: credentials do not belong in the spec; set them "
                             "in the environment (AWS_ACCESS_KEY_ID, ...)")
    if v is not None and not isinstance(v.get("type"), str):
        raise ValueError("needs a `type` (s3, gcs, hdfs, local or fsspec)")
    return v


FilesystemOptions = Annotated[dict[str, Any] | None, AfterValidator(_filesystem_options)]
