"""Every bad CAP_* value stops the process with one line naming the variable."""

import subprocess
import sys
from pathlib import Path

import pytest

from app.config import ConfigError, load_settings

GOOD_URI = "mongodb://m0,m1,m2/certautopilot?replicaSet=rs0&readPreference=primaryPreferred&w=majority"


def test_defaults_and_the_documented_replica_set_uri() -> None:
    settings = load_settings({"CAP_MONGO_URI": GOOD_URI})
    assert settings.mongo_db == "certautopilot"
    assert settings.job_lease_seconds == 60
    assert settings.scheduler_lease_seconds == 15
    assert settings.scheduler_renew_seconds == 5
    assert settings.scheduler_retry_seconds == 2
    assert settings.log_level == "INFO"
    assert settings.worker_metrics_port == 0  # workers serve no metrics unless asked
    assert load_settings({"CAP_WORKER_METRICS_PORT": "9809"}).worker_metrics_port == 9809
    assert load_settings({"CAP_WORKER_METRICS_PORT": "0"}).worker_metrics_port == 0
    assert settings.metrics_certificate_series == "per-certificate"
    assert load_settings({"CAP_METRICS_CERTIFICATE_SERIES": "Aggregate"}
                         ).metrics_certificate_series == "aggregate"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"CAP_MONGO_URI": "http://m0/db"}, "CAP_MONGO_URI"),
        ({"CAP_MONGO_URI": "mongodb://"}, "CAP_MONGO_URI"),
        ({"CAP_MONGO_URI": "mongodb://host:notaport/db"}, "CAP_MONGO_URI"),
        ({"CAP_MONGO_URI": "mongodb://h/db?replicaSet=rs0&w=banana&wtimeoutMS=-4"},
         "CAP_MONGO_URI"),
        ({"CAP_JOB_LEASE_SECONDS": "-5"}, "CAP_JOB_LEASE_SECONDS"),
        ({"CAP_JOB_LEASE_SECONDS": "abc"}, "CAP_JOB_LEASE_SECONDS"),
        ({"CAP_SCHEDULER_LEASE_SECONDS": "0"}, "CAP_SCHEDULER_LEASE_SECONDS"),
        ({"CAP_SCHEDULER_RENEW_SECONDS": "20"}, "CAP_SCHEDULER_RENEW_SECONDS"),
        ({"CAP_LOG_LEVEL": "LOUD"}, "CAP_LOG_LEVEL"),
        ({"CAP_LOG_FORMAT": "xml"}, "CAP_LOG_FORMAT"),
        ({"CAP_KEK_FILE": "/nonexistent/kek"}, "CAP_KEK_FILE"),
        ({"CAP_KEK_DIR": "/nonexistent/dir"}, "CAP_KEK_DIR"),
        ({"CAP_API_BIND": "8000"}, "CAP_API_BIND"),
        ({"CAP_JOB_MAX_ATTEMPTS": "0"}, "CAP_JOB_MAX_ATTEMPTS"),
        ({"CAP_DEV_MONGO_PORT": "70000"}, "CAP_DEV_MONGO_PORT"),
        ({"CAP_WORKER_METRICS_PORT": "-1"}, "CAP_WORKER_METRICS_PORT"),
        ({"CAP_WORKER_METRICS_PORT": "metrics"}, "CAP_WORKER_METRICS_PORT"),
        ({"CAP_MONGO_DB": "bad.name"}, "CAP_MONGO_DB"),
        ({"CAP_METRICS_CERTIFICATE_SERIES": "per-cert"}, "CAP_METRICS_CERTIFICATE_SERIES"),
    ],
)
def test_bad_value_names_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert info.value.variable == variable
    assert variable in str(info.value) and "expected" in str(info.value)


def test_two_kek_sources_are_refused(tmp_path: Path) -> None:
    kek = tmp_path / "k"
    kek.write_text("x")
    with pytest.raises(ConfigError) as info:
        load_settings({"CAP_KEK_FILE": str(kek), "CAP_KEK_COMMAND": "echo x"})
    assert "CAP_KEK_FILE" in str(info.value) and "CAP_KEK_COMMAND" in str(info.value)


def test_cli_prints_one_line_and_exits_2_on_malformed_uri() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate"],
        env={"CAP_MONGO_URI": "mongo://oops", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "CAP_MONGO_URI" in lines[0] and "mongodb://" in lines[0]
