"""Job registry, backoff, broker settings and CAP_EXTRA_HANDLER_MODULES, without a server."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from app.config import ConfigError, load_settings
from app.handlers import load_handlers
from app.jobs import RetryLater, register_handler
from app.jobs.broker import BROKER_APPNAME, broker_url, celery_config
from app.jobs.lifecycle import backoff_seconds, valid_job_id
from app.jobs.registry import get_handler, valid_kind


def test_register_handler_validates_kind_and_refuses_a_second_owner() -> None:
    @register_handler("unit.kind_a", max_attempts=2, backoff_base_seconds=1,
                      backoff_max_seconds=4)
    def handle(ctx):
        return None

    spec = get_handler("unit.kind_a")
    assert spec is not None and spec.fn is handle and spec.max_attempts == 2
    register_handler("unit.kind_a", max_attempts=2)(handle)  # same function: a re-import

    with pytest.raises(ValueError, match="already handled"):
        @register_handler("unit.kind_a")
        def other(ctx):
            return None

    for bad in ("", "Upper.case", "has space", "trailing.", "x" * 101, "a-b"):
        with pytest.raises(ValueError):
            register_handler(bad)
    with pytest.raises(ValueError):
        register_handler("unit.kind_b", max_attempts=0)
    with pytest.raises(ValueError):
        register_handler("unit.kind_b", backoff_base_seconds=10, backoff_max_seconds=1)


def test_valid_kinds_and_job_ids() -> None:
    assert valid_kind("certificates.issue") and valid_kind("jobs.reap")
    assert not valid_kind(42) and not valid_kind(None) and not valid_kind("Jobs.Reap")
    assert valid_job_id("6b0a13a5517e1a3f50536f93")
    assert not valid_job_id("6B0A13A5517E1A3F50536F93") and not valid_job_id("x" * 24)
    assert not valid_job_id(None) and not valid_job_id(["6b0a13a5517e1a3f50536f93"])


def test_the_worker_loads_every_handler_module_and_names_one_that_fails() -> None:
    kinds = load_handlers()
    assert "jobs.reap" in kinds
    with pytest.raises(RuntimeError, match="no_such_module_for_jobs"):
        load_handlers(["tests.no_such_module_for_jobs"])


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    for attempt, nominal in ((1, 5.0), (2, 10.0), (3, 20.0), (4, 40.0)):
        values = [backoff_seconds(attempt, 5.0, 600.0) for _ in range(200)]
        assert all(nominal * 0.5 <= v < nominal for v in values)
        assert max(values) - min(values) > nominal * 0.2  # jittered, not constant
    assert all(300 <= backoff_seconds(20, 5.0, 600.0) < 600 for _ in range(50))


def test_retry_later_carries_its_delay_and_refuses_a_negative_one() -> None:
    exc = RetryLater(12.5, "dns not propagated")
    assert exc.delay_seconds == 12.5 and "dns not propagated" in str(exc)
    with pytest.raises(ValueError):
        RetryLater(-1, "no")


def test_broker_is_the_same_cluster_with_its_own_database_and_appname() -> None:
    settings = load_settings({
        "CAP_MONGO_URI": "mongodb://m0,m1,m2/certautopilot?replicaSet=rs0&w=majority",
        "CAP_BROKER_DB": "cap_broker", "CAP_MONGO_TIMEOUT_MS": "4000"})
    url = broker_url(settings)
    parts = urlsplit(url)
    assert parts.netloc == "m0,m1,m2" and parts.path == "/cap_broker"
    query = parse_qs(parts.query)
    assert query["replicaSet"] == ["rs0"] and query["w"] == ["majority"]
    assert query["appName"] == [BROKER_APPNAME]
    assert query["serverSelectionTimeoutMS"] == ["4000"]
    config = celery_config(settings)
    assert config["worker_prefetch_multiplier"] == 1
    assert config["broker_transport_options"] == {"ttl": True}
    assert config["result_backend"] is None and config["task_ignore_result"] is True


def test_extra_handler_modules_setting() -> None:
    base = {"CAP_MONGO_URI": "mongodb://h/db?replicaSet=rs0"}
    assert load_settings(base).extra_handler_modules == ()
    settings = load_settings({**base, "CAP_EXTRA_HANDLER_MODULES":
                              " tests.helpers.job_kinds, my_ops.jobs "})
    assert settings.extra_handler_modules == ("tests.helpers.job_kinds", "my_ops.jobs")
    with pytest.raises(ConfigError) as info:
        load_settings({**base, "CAP_EXTRA_HANDLER_MODULES": "tests/helpers/job_kinds.py"})
    assert info.value.variable == "CAP_EXTRA_HANDLER_MODULES"
