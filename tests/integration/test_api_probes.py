"""/healthz and /readyz on the app factory."""

from app import create_app
from app.config import load_settings


def test_healthz_and_readyz(migrated_db, settings) -> None:
    client = create_app(settings).test_client()
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.json
    assert ready.json["checks"]["database"]["ok"] is True


def test_readyz_is_503_with_reason_when_database_is_unreachable(cap_env) -> None:
    settings = load_settings({**cap_env, "CAP_MONGO_URI": "mongodb://127.0.0.1:1/x",
                              "CAP_MONGO_TIMEOUT_MS": "300"})
    response = create_app(settings).test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json["checks"]["database"]["ok"] is False
    assert "unreachable" in response.json["checks"]["database"]["error"]


def test_unknown_route_uses_the_error_envelope(settings) -> None:
    response = create_app(settings).test_client().get("/nope")
    assert response.status_code == 404
    assert set(response.json) == {"code", "status", "message", "errors"}
