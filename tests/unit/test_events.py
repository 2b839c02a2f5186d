"""The imaging-event contract: real samples parse, bad input gets a precise reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from dlm_pipelines.events import InvalidEvent, parse_imaging_event, resolve_source
from tests.conftest import load_fixture

SYSTEMS = ("prince", "tsu-exp002", "tsu-exp003")
STITCH = load_fixture("imaging_event_stitch.json")
VIDEO = load_fixture("imaging_event_video.json")


def test_stitch_sample_parses() -> None:
    event = parse_imaging_event(STITCH, SYSTEMS)
    assert event.ref_id == "233f170c-23de-4ae2-b15b-dd1e1cb5afb3"
    assert event.timestamp == datetime(2026, 12, 1, 7, 7, 47, 205760, tzinfo=UTC)
    assert event.type == "stitch" and event.system == "prince" and event.img_count == 1
    assert event.metadata.camera.frame_size == (1, 1)
    assert event.metadata.stitching is not None and event.metadata.video is None
    assert event.object_key == "images/test-id/20261201/070747.tar"


def test_video_sample_parses_and_keys_in_utc() -> None:
    event = parse_imaging_event(VIDEO, SYSTEMS)
    # 09:15:02+01:00 is 08:15:02 UTC
    assert event.object_key == "videos/20261201_Plate042/20261201/081502.tar"
    assert event.partition_date == "2026-12-01"
    assert event.metadata.video is not None and event.metadata.video.video_nr == 3
    assert event.metadata.stitching is None


def test_bytes_fields_from_redis_parse_too() -> None:
    raw = {k.encode(): v.encode() for k, v in STITCH.items()}
    assert parse_imaging_event(raw, SYSTEMS).ref_id == STITCH["ref_id"]


def test_defaults_for_type_and_system() -> None:
    fields = {k: v for k, v in STITCH.items() if k not in ("type", "system")}
    event = parse_imaging_event(fields, SYSTEMS)
    assert (event.type, event.system) == ("stitch", "prince")


def test_overview_key_prefix() -> None:
    event = parse_imaging_event({**STITCH, "type": "overview"}, SYSTEMS)
    assert event.object_key.startswith("overview/test-id/")


def test_collision_free_key_is_deterministic_and_in_the_same_folder() -> None:
    event = parse_imaging_event(STITCH, SYSTEMS)
    assert event.collision_free_key == (
        "images/test-id/20261201/070747-233f170c-23de-4ae2-b15b-dd1e1cb5afb3.tar"
    )


def _metadata(**changes: object) -> str:
    doc = json.loads(STITCH["metadata"])
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = doc
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[leaf]
        else:
            node[leaf] = value
    return json.dumps(doc)


BAD_INPUTS = [
    ({"ref_id": None}, "missing field(s): ref_id"),
    ({"img_count": None, "metadata": None}, "missing field(s): img_count, metadata"),
    ({"ref_id": "233F170C-23DE-4AE2-B15B-DD1E1CB5AFB3"}, "ref_id: '233F170C"),
    ({"ref_id": "not-a-uuid"}, "is not a hyphenated lower-case UUID"),
    ({"experiment_id": "a/b"}, "experiment_id: 'a/b' is not a safe single path segment"),
    ({"experiment_id": ".."}, "experiment_id: '..' is not a safe"),
    ({"experiment_id": ""}, "experiment_id: '' is not a safe"),
    ({"timestamp": "2026-12-01T07:07:47"}, "has no timezone (naive)"),
    ({"timestamp": "yesterday"}, "timestamp: 'yesterday' is not ISO-8601"),
    ({"type": "movie"}, "type: 'movie' is not one of stitch, video, overview"),
    ({"system": "Prince"}, "system: 'Prince' is not a configured system"),
    ({"local_path": "/etc/passwd"}, "is absolute"),
    ({"local_path": "../other-system/x"}, "contains '..'"),
    ({"local_path": "a/../../x"}, "contains '..'"),
    ({"local_path": "."}, "names the system folder itself"),
    ({"local_path": ""}, "must be a non-empty relative path"),
    ({"local_path": "a\\b"}, "backslash"),
    ({"img_count": "ten"}, "img_count: 'ten' is not a non-negative decimal integer"),
    ({"img_count": "-1"}, "img_count: '-1'"),
    ({"metadata": "{'application': {}}"}, "metadata: not a JSON string"),
    ({"metadata": "[1, 2]"}, "metadata: must be a JSON object, got list"),
    ({"metadata": _metadata(application=KeyError)}, "metadata.application: Field required"),
    ({"metadata": _metadata(camera__exposure_time="fast")}, "metadata.camera.exposure_time"),
    ({"metadata": _metadata(camera__frame_size=[1, 2, 3])}, "metadata.camera.frame_size"),
    ({"metadata": _metadata(stitching__grid_size=None)}, "metadata.stitching.grid_size"),
    ({"metadata": _metadata(application__user=7)}, "metadata.application.user"),
]


@pytest.mark.parametrize(("changes", "reason"), BAD_INPUTS)
def test_bad_input_gets_its_reason(changes: dict[str, object], reason: str) -> None:
    fields = {k: v for k, v in STITCH.items() if changes.get(k, "") is not None}
    fields.update({k: v for k, v in changes.items() if v is not None})
    with pytest.raises(InvalidEvent) as raised:
        parse_imaging_event(fields, SYSTEMS)
    assert reason in str(raised.value)


def test_resolve_source_refuses_symlink_escape(tmp_path) -> None:
    (tmp_path / "prince").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "prince" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(InvalidEvent, match="outside"):
        resolve_source(tmp_path, "prince", "link")


def test_resolve_source_missing(tmp_path) -> None:
    (tmp_path / "prince").mkdir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(tmp_path, "prince", "nothing-here")


def test_resolve_source_inside(tmp_path) -> None:
    (tmp_path / "prince" / "Images" / "a").mkdir(parents=True)
    assert (
        resolve_source(tmp_path, "prince", "Images/a") == (tmp_path / "prince/Images/a").resolve()
    )


@pytest.mark.parametrize("link_at", ["Images", "Images/a", "Images/a/b"])
def test_resolve_source_refuses_a_symlink_at_any_level(tmp_path, link_at: str) -> None:
    """A linked folder in the middle of local_path could point at another event's data,
    even inside the system folder."""
    real = tmp_path / "prince" / "Real" / "a" / "b"
    real.mkdir(parents=True)
    link = tmp_path / "prince" / link_at
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(tmp_path / "prince" / "Real" / link_at.removeprefix("Images").lstrip("/"))
    with pytest.raises(InvalidEvent, match="crosses a symlink"):
        resolve_source(tmp_path, "prince", "Images/a/b")


def _with_extra(extra: object) -> dict[str, object]:
    """STITCH with `extra` under an unknown metadata key (allowed, and checked)."""
    metadata = json.loads(str(STITCH["metadata"]))
    metadata["extra"] = extra
    return {**STITCH, "metadata": json.dumps(metadata)}


def _nested(levels: int, leaf: object) -> object:
    for _ in range(levels):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (_nested(30, "x"), None),  # the leaf at depth 32: the limit
        (_nested(31, "x"), "nested deeper than 32 levels"),
        (_nested(31, []), "nested deeper than 32 levels"),  # an empty list counts
        ({"caf\u00e9 \u2603": ["na\u00efve", "\U0001f52c"]}, None),  # not ASCII, valid
        ({"\ud800": 1}, "NUL or a lone surrogate"),  # in a key
        (["ok", "a\udfffb"], "NUL or a lone surrogate"),
        ({"k": "a\x00b"}, "NUL or a lone surrogate"),
    ],
)
def test_metadata_depth_and_strings_are_checked_everywhere(extra: object, reason: str) -> None:
    fields = _with_extra(extra)
    if reason is None:
        parse_imaging_event(fields, SYSTEMS)
        return
    with pytest.raises(InvalidEvent, match=reason):
        parse_imaging_event(fields, SYSTEMS)
