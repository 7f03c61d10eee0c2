"""Spec fuzzing: random YAML and random mutations of the shipped search spaces never raise
anything but the project's one-line SpecError naming a key path."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sweeper.spec import SpecError, parse_yaml, validate

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "search_spaces").glob("*.yaml"))]
# A refusal starts with a key path (`grid.batch_size[1]:`), `<root>:` or the file name.
_PART = r"(\[\d+\]|\['(?:[^'\\]|\\.)*'\]|\[\"(?:[^\"\\]|\\.)*\"\])"
KEY_PATH = re.compile(
    rf"^(<root>|<spec>|([A-Za-z_][\w-]*|{_PART})(\.[A-Za-z_][\w-]*|{_PART})*):")

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def check(doc: Any) -> None:
    try:
        validate(doc)
    except SpecError as e:
        msg = str(e)
        assert "\n" not in msg, msg
        assert KEY_PATH.match(msg), msg


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=10), values, max_size=6))
def test_random_documents(doc: dict) -> None:
    check(doc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(SHIPPED))), st.data())
def test_random_mutations_of_shipped_spaces(which: int, data: st.DataObject) -> None:
    doc = copy.deepcopy(SHIPPED[which])
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.sampled_from(paths(doc)[1:]))
        parent = doc
        for key in target[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[target[-1]] = data.draw(values)
        elif action == "delete":
            del parent[target[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(min_size=1, max_size=8))] = data.draw(values)
        if not paths(doc)[1:]:
            break
    check(doc)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_yaml_text(text: str) -> None:
    try:
        doc = parse_yaml(text)
    except SpecError as e:
        assert "\n" not in str(e)
        return
    check(doc)


def test_python_object_tags_never_construct() -> None:
    for tag in ("!!python/object/apply:os.system ['true']", "!!python/name:os.system",
                "!!python/object:collections.OrderedDict {}"):
        try:
            parse_yaml(f"name: {tag}\n")
        except SpecError as e:
            assert "invalid YAML" in str(e)
        else:  # pragma: no cover - the safe loader never gets here
            raise AssertionError(tag)


def test_no_eval_or_imports_from_spec() -> None:
    src = "\n".join(p.read_text() for p in (ROOT / "sweeper").glob("*.py"))
    assert not re.search(r"(?<![.\w])(eval|exec)\(|importlib\.import_module|__import__\(", src)
    assert "yaml.load(" not in src and "yaml.unsafe_load" not in src
