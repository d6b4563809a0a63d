"""Finding runs in MLflow: `search_runs` page by page, for experiments of any size."""

from __future__ import annotations

from typing import Any


def search_all_runs(client: Any, experiment_id: str, filter_string: str, order_by: list[str] | None = None) -> list[Any]:
    """Every run of `experiment_id` that matches `filter_string` (MLflow's pages are at most
    1000 runs; a plain `search_runs` call returns the first page only)."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs
