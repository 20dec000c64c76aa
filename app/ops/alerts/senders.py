"""Sending one alert message to one channel: a webhook POST or an SMTP email.

``send(db, channel, message, timeout)`` returns nothing or raises ``SendError`` with a
message that names the channel's display target, never its URL, secret or password
(request libraries put the full URL into their exceptions; those are not passed on).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import smtplib
import ssl
import time
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

import requests
from pymongo.database import Database

from app.db import Doc
from app.ops.alerts import channels

SIGNATURE_HEADER = "X-CertAutoPilot-Signature"
TIMESTAMP_HEADER = "X-CertAutoPilot-Timestamp"
EVENT_HEADER = "X-CertAutoPilot-Event"
DELIVERY_HEADER = "X-CertAutoPilot-Delivery"


class SendError(Exception):
    """The channel did not take the message (safe to log and store)."""


def text_of(message: Doc) -> str:
    event = str(message.get("event", "firing")).upper()
    return f"[CertAutoPilot {event}] {message.get('summary', '')}"


def webhook_body(channel: Doc, message: Doc) -> bytes:
    text = text_of(message)
    if channel.get("format") == "slack":
        body: Doc = {"text": text, "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}}]}
    else:
        body = {"text": text, "source": "certautopilot", **message}
    return json.dumps(body, sort_keys=True, default=str, separators=(",", ":")).encode()


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, "<timestamp>.<body>") (what receivers
    recompute; the timestamp lets them refuse replays)."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def _send_webhook(db: Database[Doc], channel: Doc, message: Doc, timeout: float) -> None:
    url, secret = channels.open_webhook(db, channel)
    body = webhook_body(channel, message)
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "User-Agent": "CertAutoPilot-alerts",
               EVENT_HEADER: str(message.get("event")),
               DELIVERY_HEADER: str(message.get("delivery_id") or ""),
               TIMESTAMP_HEADER: timestamp}
    if secret:
        headers[SIGNATURE_HEADER] = signature(secret, timestamp, body)
    verify: Any = channel.get("ca_file") or True
    target = channel.get("target")
    try:
        response = requests.post(url, data=body, headers=headers, timeout=timeout,
                                 verify=verify, allow_redirects=False)
    except requests.RequestException as exc:
        raise SendError(f"webhook {target}: {exc.__class__.__name__} (no answer)") from None
    finally:
        del url, secret
    if not 200 <= response.status_code < 300:
        raise SendError(f"webhook {target}: HTTP {response.status_code}")


def email_of(channel: Doc, message: Doc) -> EmailMessage:
    mail = EmailMessage()
    mail["Subject"] = text_of(message)[:200]
    mail["From"] = channel["sender"]
    mail["To"] = ", ".join(channel["to"])
    mail["Message-ID"] = make_msgid(domain="certautopilot")
    mail["X-CertAutoPilot-Event"] = str(message.get("event"))
    if message.get("alert_id"):
        mail["X-CertAutoPilot-Alert"] = str(message["alert_id"])
    lines = [text_of(message), ""]
    for key in ("rule", "threshold", "subject", "project_id", "opened_at", "resolved_at"):
        if message.get(key) not in (None, ""):
            lines.append(f"{key}: {message[key]}")
    details = message.get("details")
    if details:
        lines += ["", json.dumps(details, indent=2, sort_keys=True, default=str)]
    mail.set_content("\n".join(lines) + "\n")
    return mail


def _send_email(channel: Doc, message: Doc, timeout: float) -> None:
    context = ssl.create_default_context(cafile=channel.get("ca_file"))
    password = os.environ.get(channel["password_env"]) if channel.get("password_env") else None
    if channel.get("password_env") and not password:
        raise SendError(f"email {channel.get('target')}: {channel['password_env']} is not "
                        "set in this process")
    host, port = channel["host"], int(channel["port"])
    try:
        if channel.get("tls") == "tls":
            client: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=timeout,
                                                    context=context)
        else:
            client = smtplib.SMTP(host, port, timeout=timeout)
        with client:
            client.ehlo()
            if channel.get("tls") != "tls":
                if not client.has_extn("starttls"):
                    raise SendError(f"email {channel.get('target')}: the server does not "
                                    "offer STARTTLS (refusing to send in plaintext)")
                client.starttls(context=context)
                client.ehlo()
            if channel.get("username"):
                client.login(channel["username"], password or "")
            client.send_message(email_of(channel, message))
    except SendError:
        raise
    except smtplib.SMTPAuthenticationError as exc:
        raise SendError(f"email {channel.get('target')}: authentication refused "
                        f"({exc.smtp_code})") from None
    except (smtplib.SMTPException, OSError, ssl.SSLError) as exc:
        raise SendError(f"email {channel.get('target')}: {exc.__class__.__name__}: "
                        f"{str(exc)[:200]}") from None
    finally:
        del password


def send(db: Database[Doc], channel: Doc, message: Doc, *, timeout: float) -> None:
    if channel.get("type") == channels.WEBHOOK:
        _send_webhook(db, channel, message, timeout)
    elif channel.get("type") == channels.SMTP:
        _send_email(channel, message, timeout)
    else:
        raise SendError(f"channel {channel.get('name')}: unknown type {channel.get('type')!r}")
