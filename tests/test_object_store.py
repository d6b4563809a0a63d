"""Reading masks where they live (issue 16), without a cluster: the byte positions of rows
against pyarrow's own buffers, where an artifact URI is read from, and the errors of a
store that cannot be read. The S3 store and the multi-node run: test_overlap_multinode.py."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from test_overlap import brute_force, random_masks, write_mask

from rlsparsity.analysis.artifact_locations import artifact_location, uri_location
from rlsparsity.analysis.object_store import coalesce, open_source
from rlsparsity.analysis.overlap import OverlapError, compute_overlap, rows
from rlsparsity.analysis.overlap.layout import _layout_of, _read_layout


def test_row_positions_are_pyarrows_buffers(tmp_path) -> None:
    """The rows' byte ranges parsed from the footer and batch headers (overlap/ipc.py, what
    remote reads use) are those of pyarrow's zero-copy buffers in the memory map (what local
    reads use), and hold exactly each row's bits (an empty tensor's row included)."""
    rng = np.random.default_rng(0)
    path = write_mask(tmp_path / "m.arrow", random_masks(rng, 0.3))
    with open_source(str(path)) as src:
        parsed, mapped = _layout_of(src, parse=True), _layout_of(src, parse=False)
    np.testing.assert_array_equal(parsed.nbytes, mapped.nbytes)
    some = parsed.nbytes > 0  # where an empty row "is" does not matter
    np.testing.assert_array_equal(parsed.pos[some], mapped.pos[some])
    np.testing.assert_array_equal(parsed.changed, mapped.changed)
    assert parsed.tensor == mapped.tensor
    raw = path.read_bytes()
    with pa.memory_map(str(path)) as f:
        bits = [b.as_py() for b in pa.ipc.open_file(f).read_all().column("bits")]
    assert len(bits) == len(parsed.pos) and any(not b for b in bits)
    for r, want in enumerate(bits):
        assert raw[parsed.pos[r] : parsed.pos[r] + parsed.nbytes[r]] == want
    assert coalesce([(0, 10), (12, 5), (100, 1), (101, 0)], hole=2, limit=100) == [(0, 17), (100, 1)]
    assert coalesce([(0, 10), (12, 5)], hole=2, limit=15) == [(0, 10), (12, 5)]


def test_where_artifacts_are_read(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("MLFLOW_ARTIFACTS_DESTINATION", raising=False)
    server = "http://127.0.0.1:5000"
    run = "mlflow-artifacts:/3/abc/artifacts"
    path = "masks/final.arrow"
    assert artifact_location("s3://b/root/3/abc/artifacts", path, server) == "s3://b/root/3/abc/artifacts/masks/final.arrow"
    assert artifact_location((tmp_path / "a").as_uri(), path, server) == str(tmp_path / "a" / path)
    assert artifact_location(str(tmp_path / "a"), path, server) == str(tmp_path / "a" / path)
    # Through the server, unless the server's destination is given: then the store itself.
    assert artifact_location(run, path, server) == f"{server}/api/2.0/mlflow-artifacts/artifacts/3/abc/artifacts/{path}"
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", "s3://bucket/prefix/")
    assert artifact_location(run, path, server) == f"s3://bucket/prefix/3/abc/artifacts/{path}"
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "dest"))
    assert artifact_location(run, path, server) == str(tmp_path / "dest" / "3/abc/artifacts" / path)
    # A tracking URI's credentials stay out of the location (it travels to the tasks).
    monkeypatch.delenv("MLFLOW_ARTIFACTS_DESTINATION")
    assert artifact_location(run, path, "http://u:pw@127.0.0.1:5000") == artifact_location(run, path, server)
    # Stores the tasks cannot read in place are downloaded.
    assert uri_location("gs://b/k/final.arrow", server) is None


def test_a_store_that_cannot_be_read_is_named(monkeypatch, tmp_path) -> None:
    rng = np.random.default_rng(1)
    good = write_mask(tmp_path / "good.arrow", random_masks(rng, 0.3))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws/credentials
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on 9
    uri = "s3://mlflow/sweep/final.arrow"
    with pytest.raises(OverlapError, match="remote: .*store at http://127.0.0.1:9 needs AWS_ACCESS_KEY_ID"):
        compute_overlap([good, uri], ["good", "remote"], use_ray=False, use_cache=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with pytest.raises(OverlapError, match=f"remote: cannot open {uri} \\(S3 endpoint http://127.0.0.1:9\\): .*connect"):
        compute_overlap([good, uri], ["good", "remote"], use_ray=False, use_cache=False)


@pytest.mark.slow
def test_masks_through_an_mlflow_server_with_range_requests(mlflow_server, tmp_path, monkeypatch) -> None:
    """A server whose artifacts are local answers Range requests: the tasks read their rows
    through it, a small window at a time, and the result is the local run's. The server's
    ETag changes on every request, so its masks are verified on every run."""
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_ARTIFACTS_DESTINATION", raising=False)
    monkeypatch.setattr(rows, "WINDOW_BYTES", 3 * 32 << 10)  # several windows per task
    monkeypatch.setattr(rows, "MIN_REQUEST_BYTES", 32 << 10)
    rng = np.random.default_rng(2)
    arrays = [random_masks(rng, d) for d in (0.1, 0.5, 0.9)]
    local = [write_mask(tmp_path / f"r{k}.arrow", a, target=f"t{k}") for k, a in enumerate(arrays)]
    client = MlflowClient(mlflow_server)
    run = client.create_run(client.create_experiment(f"ranges-{tmp_path.name}"))
    for p in local:
        client.log_artifact(run.info.run_id, str(p), "masks")
    urls = [artifact_location(run.info.artifact_uri, f"masks/{p.name}", mlflow_server) for p in local]
    assert all(u.startswith(f"{mlflow_server}/api/2.0/mlflow-artifacts/artifacts/") for u in urls)
    res = compute_overlap(urls, ["a", "b", "c"], use_ray=False, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(res.tensor_inter, brute_force(arrays)[1])
    remote = res.stats["remote"]
    assert remote["task_bits"] == 3 * int(_read_layout(str(local[0]), "a").nbytes.sum())
    assert remote["task_requests"] >= 3 * 2  # a window per pack of rows, the next one fetched ahead
    assert remote["task_bytes"] <= 1.05 * remote["task_bits"] + 3 * (64 << 10)  # each row fetched once
    again = compute_overlap(urls, ["a", "b", "c"], use_ray=False, cache_dir=tmp_path / "cache")
    assert again.stats["pairs_cached"] == 3 and again.stats["verified"] == ["a", "b", "c"]
    memo = tmp_path / "cache" / "verified.json"
    assert not memo.exists() or json.loads(memo.read_text()) == {}
