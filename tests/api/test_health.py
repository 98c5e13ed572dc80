"""The unauthenticated surfaces: liveness, readiness, metrics, the OpenAPI document and docs."""

from __future__ import annotations

import re
from typing import Any

from tests.api_helpers import Api, assert_error, dequeue, new_task


def test_healthz_and_readyz(client: Any) -> None:
    live = client.get("/healthz")
    assert live.status_code == 200
    assert live.get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json() == {"status": "ready", "checks": {"database": "ok"}}


def test_a_database_outage_is_503_not_500(app: Any, client: Any, admin_token: str) -> None:
    from fleet_common.db import Database

    down = Database("postgresql://postgres@127.0.0.1:1/fleet")  # nothing listens on port 1
    app.extensions["fleet"].db = down
    try:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.get_json()["status"] == "unavailable"
        assert ready.get_json()["checks"]["database"].startswith("unavailable")
        assert client.get("/healthz").status_code == 200  # alive, just not ready
        listing = Api(client, admin_token).get("/tasks")
        assert_error(listing, 503, "database_unavailable")
    finally:
        down.dispose()


def gauge(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}\{{{re.escape(wanted)}\}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{{{wanted}}} not in the exposition"
    return float(match.group(1))


def test_metrics_count_tasks_and_agents(client: Any, admin_token: str) -> None:
    api = Api(client, admin_token)
    for n in range(3):
        new_task(api, title=f"t{n}")
    reg = api.register("a1")
    assert dequeue(api, reg["agent_token"]) is not None

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    assert "# TYPE fleet_tasks gauge" in text
    assert gauge(text, "fleet_tasks", status="queued") == 2
    assert gauge(text, "fleet_tasks", status="dispatched") == 1
    assert gauge(text, "fleet_tasks", status="completed") == 0
    assert gauge(text, "fleet_queue_depth", requirements="_") == 2
    assert gauge(text, "fleet_agents", status="online", desired_state="active") == 1
    assert "fleet_dispatch_latency_seconds_bucket" in text


def test_openapi_and_docs(client: Any) -> None:
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    doc = spec.get_json()
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"] == "Fleet"
    for path in ("/api/v1/tasks", "/api/v1/tasks/dequeue", "/api/v1/agents/register"):
        assert path in doc["paths"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert docs.mimetype == "text/html"
    assert "swagger-ui" in docs.get_data(as_text=True)


def test_openapi_says_which_operations_need_no_token(client: Any) -> None:
    doc = client.get("/openapi.json").get_json()
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/api/v1/agents/register"]["post"]["security"] == []
    assert "security" not in doc["paths"]["/api/v1/tasks"]["post"]
