"""Stage datasets in MLflow (the digest is the md5 DVC itself computes) and which records are traced."""

from __future__ import annotations

from pathlib import Path

from oel.paths import ProjectPaths
from oel.tracking import dvc_md5, stage_files


def dvc_own_md5(path: Path) -> str:
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import localfs

    odb = HashFileDB(localfs, str(path.parent / ".odb"))
    _, _, obj = build(odb, str(path), localfs, "md5", dry_run=True)
    return obj.hash_info.value


def test_md5_of_a_file_and_a_folder_is_dvcs(tmp_path):
    folder = tmp_path / "stores"
    (folder / "grid").mkdir(parents=True)
    (folder / "grid" / "store-0.md").write_text("- EXPERIENCE ITEM: go right\n")
    (folder / "grid" / "store-10.md").write_bytes(b"crlf\r\nline\n")
    (folder / "a.json").write_text("{}")
    assert dvc_md5(folder / "a.json") == dvc_own_md5(folder / "a.json")
    assert dvc_md5(folder) == dvc_own_md5(folder)
    assert dvc_md5(folder).endswith(".dir")


def test_every_stage_names_its_data_inputs_and_outputs():
    paths = ProjectPaths(Path("/p")).round("r2")
    files = {stage: stage_files(stage, paths, "r1") for stage in ("collect", "extract", "consolidate", "distill",
                                                                   "eval")}
    assert files["collect"] == {"input": [Path("/p/models/r1")], "output": [paths.trajectories]}
    assert paths.distill_rows in files["consolidate"]["output"] and paths.distill_rows in files["distill"]["input"]
    assert files["eval"]["input"][0] == Path("/p/models/r2")


def test_trace_sampling_spreads_over_the_records_and_off_traces_nothing():
    from oel.config import TrackingParams
    from oel.traces import pick

    records = list(range(100))
    assert pick(records, TrackingParams(traces="all")) == records
    assert pick(records, TrackingParams(traces="off")) == []
    assert pick(records, TrackingParams(traces="sample", trace_sample=4)) == [0, 25, 50, 75]
    assert pick(records[:3], TrackingParams(traces="sample", trace_sample=4)) == [0, 1, 2]
