"""Schema fuzzing: schemathesis against the app's own ``/openapi.json`` (JSON and
multipart bodies, query and path parameters), in process on the pipeline double.

Every generated request must get a documented status with a body matching the
documented schema and content type, and never a 5xx: 13 operations x 30 cases.
(Hypothesis is driven directly: schemathesis' pytest plugin does not load under pytest 9.)
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server.harness import fake_app  # noqa: E402

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
OPERATIONS = [
    "DELETE /v1/loras/{name}",
    "DELETE /v1/videos/{video_id}",
    "GET /health",
    "GET /metrics",
    "GET /outputs/{name}",
    "GET /ready",
    "GET /v1/loras",
    "GET /v1/models",
    "GET /v1/models/{model_id}",
    "GET /v1/videos",
    "GET /v1/videos/{video_id}",
    "GET /v1/videos/{video_id}/content",
    "POST /v1/images/edits",
    "POST /v1/images/generations",
    "POST /v1/loras",
    "POST /v1/videos",
]
CASES = 30
FAST = {  # limits small enough that every valid request runs in milliseconds on the double
    "max_output_pixels": 64 * 64,
    "max_steps": 3,
    "max_n": 2,
    "max_frames": 5,
    "max_queue_size": 64,
    "batch_wait_ms": 0,
}


@pytest.fixture(scope="module")
def operations(tmp_path_factory):
    client = fake_app(str(tmp_path_factory.mktemp("fuzz")), step_s=0.0, **FAST)
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", _without_lifespan(client.app))
        yield {op.label: op for op in (r.ok() for r in schema.get_all_operations())}
    finally:
        client.close()


def _without_lifespan(app):
    """The app for schemathesis' per-call test client: the lifespan already ran once
    (in ``fake_app``); running it per call would shut the engine down after each."""

    async def asgi(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await app(scope, receive, send)

    return asgi


def test_every_route_is_documented(operations):
    assert sorted(operations) == OPERATIONS


@pytest.mark.parametrize("label", OPERATIONS)
def test_api_conforms_to_its_schema(operations, label):
    @given(case=operations[label].as_strategy())
    @settings(
        max_examples=CASES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case):
        response = case.call_and_validate(checks=CHECKS)
        statuses.append(response.status_code)

    statuses: list[int] = []
    run()
    assert statuses  # hypothesis really sent requests
