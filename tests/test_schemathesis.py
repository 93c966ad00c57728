"""Property-based API testing with schemathesis: requests generated from the server's own OpenAPI schema
(valid and invalid bodies alike) must never get a 5xx or break the server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from ternlm.keys import KeyStore
from ternlm.server import serve_subprocess

EXAMPLES = 25  # per operation; the tiny model and a 128-token context keep each generation short


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    keys_db = tmp_path_factory.mktemp("fuzz") / "keys.db"
    key = KeyStore(keys_db).create("fuzzer", "admin")[0]
    args = ["--threads", "1", "--ctx", "128", "--slots", "2", "--log-level", "error", "--keys-db", str(keys_db)]
    with serve_subprocess(args) as url:
        yield url, {"Authorization": f"Bearer {key}"}


def test_no_server_errors(server: tuple[str, dict[str, str]]) -> None:
    url, auth = server
    schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=auth)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/admin/keys"}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case: schemathesis.Case) -> None:
            if "name" in (case.path_parameters or {}):  # never revoke the fuzzer's own key
                case.path_parameters = {"name": "nobody-" + str(case.path_parameters["name"])[:20]}
            response = case.call(base_url=url, headers=auth, timeout=60)
            assert response.status_code < 500, (f"{case.method} {case.formatted_path}: {response.status_code} "
                                                f"{response.text[:300]}")

        check()
    assert httpx.get(url + "/health").status_code == 200  # and the server is still standing
