"""The manifest format: round trip, validation messages, atomic writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from rnnserve.manifest import Manifest, ManifestError, StateSpec, load_manifest, write_atomic


def _manifest(**changes: object) -> Manifest:
    fields: dict[str, object] = dict(
        name="m",
        version="1",
        cell="gru",
        input_kind="features",
        input_name="x",
        input_size=3,
        output_kind="regression",
        output_name="y",
        output_size=2,
        states=[StateSpec(name="h", input="h0", output="hn", shape=[2, 8])],
    )
    fields.update(changes)
    return Manifest(**fields)  # type: ignore[arg-type]


def test_round_trip(tmp_path: Path) -> None:
    m = _manifest(sequence_lens="sequence_lens", metrics={"rmse": 0.5})
    m.save(tmp_path)
    assert load_manifest(tmp_path) == m


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"input_kind": "pixels"}, "input_kind 'pixels'"),
        ({"states": []}, "at least one state"),
        ({"input_kind": "tokens"}, "needs its vocabulary"),
        ({"input_kind": "tokens", "vocabulary": ["a"]}, "vocabulary has 1 entries"),
        ({"states": [StateSpec("h", "h0", "hn", [0, 8])]}, "must be positive"),
        ({"name": "a/b"}, "folder name"),
    ],
)
def test_invalid_manifests_say_what_to_fix(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        _manifest(**changes).validate()


def test_unknown_fields_and_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path)
    data = _manifest().to_dict() | {"colour": "blue"}
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="unknown manifest fields: colour"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_write_atomic_leaves_whole_files_readable_by_others(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    old = os.umask(0o022)
    try:
        write_atomic(target, b"abc")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"abc"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    with pytest.raises(TypeError):
        write_atomic(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
