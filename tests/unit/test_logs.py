import json
import logging

from app.logs import JsonFormatter, RedactingFilter, redact


def test_redact_masks_private_keys_and_bearer_tokens() -> None:
    text = ("key -----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY----- "
            "Authorization: Bearer abcdefghijklmnop")
    cleaned = redact(text)
    assert "PRIVATE KEY-----" not in cleaned and "MHcCAQEE" not in cleaned
    assert "abcdefghijklmnop" not in cleaned


def test_json_formatter_writes_one_object_per_record() -> None:
    record = logging.makeLogRecord({"msg": "hello %s", "args": ("world",), "levelname": "INFO",
                                    "name": "x", "job_id": "j1"})
    RedactingFilter().filter(record)
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["message"] == "hello world" and entry["job_id"] == "j1"
