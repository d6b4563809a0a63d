"""Where an MLflow artifact can be read in place, by any process of a cluster, without
downloading it: the location strings of ``analysis.object_store``.

- ``s3://…`` artifact URIs are read from the store directly.
- ``mlflow-artifacts:/…`` (a server started with ``--serve-artifacts``): from the store
  directly when ``MLFLOW_ARTIFACTS_DESTINATION`` names the server's
  ``--artifacts-destination`` (the variable the server itself reads) and that is ``s3://``
  or a local path; otherwise through the server, over HTTP with Range requests. The server
  answers those, but when its own store is remote it fetches the whole object from the
  store for every request: correct, and costly for large masks.
- ``file://`` and plain paths: the local file (a cluster needs it on shared storage).
- Anything else (``gs://``, ``wasbs://``, ``dbfs:/``, ``models:/``): None, the caller
  downloads.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from rlsparsity.analysis.object_store import is_remote, local_path

DESTINATION_ENV = "MLFLOW_ARTIFACTS_DESTINATION"


def artifact_location(artifact_uri: str, path: str, tracking_uri: str) -> str | None:
    """The readable location of artifact ``path`` under a run's ``artifact_uri``, or None."""
    return uri_location(f"{artifact_uri.rstrip('/')}/{path.lstrip('/')}", tracking_uri)


def uri_location(uri: str, tracking_uri: str) -> str | None:
    """The readable location of an artifact URI (``runs:/`` resolved through the tracking
    server), a plain path, or None when it can only be downloaded."""
    scheme = urlsplit(uri).scheme
    if scheme in ("", "file"):
        return local_path(uri)
    if scheme == "s3":
        return uri
    if scheme in ("http", "https"):
        u = urlsplit(uri)  # no credentials in a location (see _proxied)
        return u._replace(netloc=u.netloc.rpartition("@")[2]).geturl()
    if scheme == "runs":
        from mlflow.tracking.artifact_utils import get_artifact_uri
        from mlflow.utils.uri import parse_runs_uri

        run_id, path = parse_runs_uri(uri)
        return uri_location(get_artifact_uri(run_id, path, tracking_uri=tracking_uri), tracking_uri)
    if scheme == "mlflow-artifacts":
        return _proxied(uri, tracking_uri)
    return None


def _proxied(uri: str, tracking_uri: str) -> str:
    dest = os.environ.get(DESTINATION_ENV)
    rel = unquote(urlsplit(uri).path).lstrip("/")
    if dest:
        direct = f"{dest.rstrip('/')}/{rel}"
        if direct.startswith("s3://"):
            return direct
        if not is_remote(direct) and urlsplit(direct).scheme in ("", "file"):
            return local_path(direct)
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    # Credentials in the tracking URI stay out of the location, which travels in the tasks'
    # arguments: readers authenticate from MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN.
    url = urlsplit(MlflowArtifactsRepository.resolve_uri(uri, tracking_uri))
    return url._replace(netloc=url.netloc.rpartition("@")[2]).geturl()


def read_through_server(location: str) -> bool:
    """Whether reads of ``location`` go through an MLflow server (see the module docstring)."""
    return location.startswith(("http://", "https://"))
