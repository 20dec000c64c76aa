"""A small ACME client on top of certbot's ``acme`` package.

``acme.client.ClientNetwork`` does the protocol's hard parts (JWS signing, nonces,
problem documents); this module adds what an order that must survive any crash needs:

- step-sized calls (``new_order`` returns the order URL before anything else is fetched,
  so the caller can persist it at once);
- ``badNonce`` retried at once, several times (the package retries only once);
- errors turned into ``AcmeProblem`` with the HTTP status and ``Retry-After`` kept;
- a fast poll loop (``poll``) that starts at ~20 ms, backs off and honours
  ``Retry-After`` (``ClientV2.poll_and_finalize`` sleeps a whole second per round);
- request metrics (``app.metrics.ACME_REQUESTS``) by CA and endpoint.

Clients are cached per thread and (directory, account key): a worker reuses its TLS
connection, the directory and the nonce pool across orders.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import josepy as jose
import requests
from acme import challenges, messages
from acme import errors as acme_errors
from acme.client import ClientNetwork
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from app.acme.errors import (
    AcmeError,
    AcmeNetworkError,
    AcmeProblem,
    AcmeProtocolError,
    AcmeTimeout,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = "CertAutoPilot (acme-python)"
BAD_NONCE_RETRIES = 8
DIRECTORY_TTL_SECONDS = 3600.0


class NewOrderWithReplaces(messages.NewOrder):
    """newOrder with RFC 9773's ``replaces`` (the ARI CertID of the certificate renewed)."""

    replaces: str | None = jose.field("replaces", omitempty=True)


def parse_retry_after(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - now).total_seconds())


def jwk_for(private_key_pem: bytes) -> tuple[jose.JWK, jose.JWASignature]:
    """The account key as a JWK and the JWS algorithm it signs with."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algs: dict[str, jose.JWASignature] = {
            "secp256r1": jose.ES256, "secp384r1": jose.ES384, "secp521r1": jose.ES512}
        alg = algs.get(key.curve.name)
        if alg is None:
            raise AcmeError(f"unsupported account key curve {key.curve.name}")
        return jose.JWKEC(key=key), alg
    if isinstance(key, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=key), jose.RS256
    raise AcmeError("unsupported account key type (EC P-256/P-384 or RSA expected)")


def _problem_json(error: messages.Error) -> dict[str, Any]:
    body: dict[str, Any] = {"type": error.typ, "detail": error.detail or error.title or ""}
    if error.identifier is not None:
        body["identifier"] = {"type": str(error.identifier.typ), "value": error.identifier.value}
    if error.subproblems:
        body["subproblems"] = [_problem_json(sub) for sub in error.subproblems]
    return body


def _endpoint_label(directory: dict[str, Any] | None, url: str) -> str:
    if directory:
        for name in ("newNonce", "newAccount", "newOrder", "revokeCert", "keyChange",
                     "renewalInfo"):
            value = directory.get(name)
            if isinstance(value, str) and (url == value or (
                    name == "renewalInfo" and url.startswith(value))):
                return name
    path = urlsplit(url).path.lower()
    for marker, label in (("final", "finalize"), ("authz", "authorization"),
                          ("chal", "challenge"), ("cert", "certificate"),
                          ("order", "order"), ("acct", "account"), ("account", "account"),
                          ("dir", "directory")):
        if marker in path:
            return label
    return "other"


class _Network(ClientNetwork):
    """``ClientNetwork`` that remembers the last response (for Retry-After and status)
    and counts requests in the metrics."""

    def __init__(self, key: jose.JWK | None, alg: jose.JWASignature, verify: bool | str,
                 timeout: int) -> None:
        super().__init__(key, alg=alg, verify_ssl=verify,  # type: ignore[arg-type]
                         user_agent=USER_AGENT, timeout=timeout)
        self.last_response: requests.Response | None = None
        self.directory_json: dict[str, Any] | None = None
        self.ca_label = ""

    def _send_request(self, method: str, url: str, *args: Any,
                      **kwargs: Any) -> requests.Response:
        from app import metrics

        endpoint = _endpoint_label(self.directory_json, url)
        started = time.monotonic()
        self.last_response = None
        try:
            response = super()._send_request(method, url, *args, **kwargs)
        except requests.RequestException:
            metrics.ACME_REQUESTS.labels(self.ca_label, endpoint, "error").inc()
            raise
        status = str(response.status_code)
        metrics.ACME_REQUESTS.labels(self.ca_label, endpoint, status).inc()
        metrics.ACME_REQUEST_DURATION.labels(self.ca_label, endpoint, status).observe(
            time.monotonic() - started)
        self.last_response = response
        return response

    def close(self) -> None:
        self.session.close()


@dataclass
class OrderState:
    """One read of an order: its URL, JSON body and the Retry-After the CA asked for."""

    url: str
    body: dict[str, Any]
    retry_after: float | None = None

    @property
    def status(self) -> str:
        return str(self.body.get("status", ""))


@dataclass(frozen=True)
class PollSchedule:
    """Fast start, exponential backoff, Retry-After honoured, bounded by a deadline."""

    first: float = 0.02
    factor: float = 1.6
    maximum: float = 2.0
    timeout: float = 120.0

    def delays(self) -> Callable[[float | None], float]:
        state = {"next": self.first}

        def next_delay(retry_after: float | None) -> float:
            delay = state["next"]
            state["next"] = min(self.maximum, delay * self.factor)
            if retry_after is not None:
                # The CA knows best when to ask again; never poll earlier than it said.
                delay = max(delay, retry_after)
            return delay * random.uniform(0.9, 1.1)

        return next_delay


def poll(fetch: Callable[[], tuple[T, float | None]], done: Callable[[T], bool], *,
         what: str, schedule: PollSchedule | None = None, url: str | None = None) -> T:
    """Call ``fetch()`` until ``done(value)``; sleep per ``schedule`` between calls."""
    schedule = schedule or PollSchedule()
    deadline = time.monotonic() + schedule.timeout
    next_delay = schedule.delays()
    while True:
        value, retry_after = fetch()
        if done(value):
            return value
        delay = next_delay(retry_after)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AcmeTimeout(what, url)
        time.sleep(min(delay, remaining))


class AcmeClient:
    """An account's view of one CA directory."""

    def __init__(self, directory_url: str, account_key_pem: bytes | None = None, *,
                 account_url: str | None = None, ca_bundle: str | None = None,
                 timeout: int = 30) -> None:
        self.directory_url = directory_url
        if account_key_pem is not None:
            key, alg = jwk_for(account_key_pem)
        else:
            key, alg = None, jose.ES256
        self.key = key
        self.net = _Network(key, alg, ca_bundle or True, timeout)
        self.net.ca_label = urlsplit(directory_url).netloc
        self.account_url: str | None = None
        if account_url:
            self.set_account_url(account_url)
        self._directory: dict[str, Any] | None = None
        self._directory_at = 0.0

    def close(self) -> None:
        self.net.close()

    # ----------------------------------------------------------------- plumbing
    def set_account_url(self, url: str | None) -> None:
        self.account_url = url
        self.net.account = (messages.RegistrationResource(uri=url, body=messages.Registration())
                            if url else None)

    @property
    def directory(self) -> dict[str, Any]:
        if self._directory is None or time.monotonic() - self._directory_at > \
                DIRECTORY_TTL_SECONDS:
            response = self._call(lambda: self.net.get(self.directory_url))
            body = response.json()
            if not isinstance(body, dict) or "newOrder" not in body:
                raise AcmeProtocolError(f"{self.directory_url} is not an ACME directory")
            self._directory = body
            self._directory_at = time.monotonic()
            self.net.directory_json = body
        return self._directory

    def has_renewal_info(self) -> bool:
        return isinstance(self.directory.get("renewalInfo"), str)

    def terms_of_service(self) -> str | None:
        meta = self.directory.get("meta") or {}
        value = meta.get("termsOfService") if isinstance(meta, dict) else None
        return str(value) if value else None

    def external_account_required(self) -> bool:
        meta = self.directory.get("meta") or {}
        return bool(isinstance(meta, dict) and meta.get("externalAccountRequired"))

    def profiles(self) -> dict[str, str]:
        meta = self.directory.get("meta") or {}
        profiles = meta.get("profiles") if isinstance(meta, dict) else None
        return dict(profiles) if isinstance(profiles, dict) else {}

    def _retry_after(self) -> float | None:
        response = self.net.last_response
        if response is None:
            return None
        return parse_retry_after(response.headers.get("Retry-After"))

    def _call(self, fn: Callable[[], T]) -> T:
        """Run one request; retry badNonce at once; turn failures into AcmeError."""
        for attempt in range(BAD_NONCE_RETRIES + 1):
            try:
                return fn()
            except messages.Error as exc:
                response = self.net.last_response
                problem = AcmeProblem.from_json(
                    _problem_json(exc),
                    http_status=response.status_code if response is not None else None,
                    url=response.url if response is not None else None,
                    retry_after=self._retry_after())
                if problem.problem_code == "badNonce" and attempt < BAD_NONCE_RETRIES:
                    log.debug("badNonce, retrying at once", extra={"attempt": attempt + 1})
                    continue
                raise problem from None
            except acme_errors.ConflictError:
                raise
            except acme_errors.ClientError as exc:
                response = self.net.last_response
                if response is not None and not response.ok:
                    # An HTTP error without a problem document (e.g. a plain 404).
                    raise AcmeProblem("about:blank", response.reason or "HTTP error",
                                      http_status=response.status_code, url=response.url,
                                      retry_after=self._retry_after()) from None
                raise AcmeProtocolError(
                    f"unexpected answer from the CA: {exc.__class__.__name__}",
                    retry_after=self._retry_after()) from None
            except requests.RequestException as exc:
                raise AcmeNetworkError(
                    f"no answer from {self.net.ca_label}: {exc.__class__.__name__}",
                    retry_after=None) from None
            except acme_errors.Error as exc:
                raise AcmeProtocolError(f"ACME client error: {exc}") from None
        raise AssertionError("unreachable")

    def _post(self, url: str, obj: Any) -> requests.Response:
        nonce_url = self.directory["newNonce"]
        return self._call(lambda: self.net.post(url, obj, new_nonce_url=nonce_url))

    def _post_as_get(self, url: str) -> requests.Response:
        nonce_url = self.directory["newNonce"]
        return self._call(lambda: self.net.post(url, None, new_nonce_url=nonce_url))

    # ----------------------------------------------------------------- accounts
    def register(self, *, contacts: list[str], terms_agreed: bool,
                 eab_kid: str | None = None, eab_hmac_key: str | None = None) -> str:
        """newAccount; returns the account URL (also for an account that already exists)."""
        if self.key is None:
            raise AcmeError("an account key is needed to register")
        eab = None
        if eab_kid and eab_hmac_key:
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=self.key.public_key(), kid=eab_kid,
                hmac_key=eab_hmac_key, directory=messages.Directory.from_json(
                    dict(self.directory)))
        registration = messages.NewRegistration.from_data(
            email=",".join(contacts) if contacts else None,
            terms_of_service_agreed=terms_agreed, external_account_binding=eab)
        self.set_account_url(None)
        try:
            response = self._post(self.directory["newAccount"], registration)
        except acme_errors.ConflictError as exc:
            url = str(exc.location)
        else:
            location = response.headers.get("Location")
            if not location:
                raise AcmeProtocolError("newAccount answered without a Location header")
            url = location
        self.set_account_url(url)
        return url

    def find_existing_account(self) -> str | None:
        """newAccount with onlyReturnExisting: the account URL of this key, or None."""
        self.set_account_url(None)
        try:
            response = self._post(self.directory["newAccount"],
                                  messages.NewRegistration(only_return_existing=True))
        except AcmeProblem as problem:
            if problem.problem_code == "accountDoesNotExist":
                return None
            raise
        except acme_errors.ConflictError as exc:
            url = str(exc.location)
        else:
            url = response.headers.get("Location") or ""
        if not url:
            raise AcmeProtocolError("onlyReturnExisting answered without a Location header")
        self.set_account_url(url)
        return url

    def update_contacts(self, contacts: list[str]) -> None:
        if not self.account_url:
            raise AcmeError("the account is not registered")
        update = messages.UpdateRegistration(contact=tuple(f"mailto:{c}" for c in contacts))
        self._post(self.account_url, update)

    def key_authorization(self, token: str) -> str:
        if self.key is None:
            raise AcmeError("an account key is needed for key authorizations")
        chall = challenges.HTTP01(token=jose.b64decode(token))
        return str(chall.key_authorization(self.key))

    def dns01_value(self, token: str) -> str:
        if self.key is None:
            raise AcmeError("an account key is needed for key authorizations")
        chall = challenges.DNS01(token=jose.b64decode(token))
        return str(chall.validation(self.key))

    # ----------------------------------------------------------------- orders
    def new_order(self, identifiers: list[dict[str, str]], *, profile: str | None = None,
                  replaces: str | None = None) -> OrderState:
        order = NewOrderWithReplaces(
            identifiers=[messages.Identifier(typ=messages.IdentifierType(i["type"]),
                                             value=i["value"]) for i in identifiers],
            profile=profile or None, replaces=replaces or None)
        response = self._post(self.directory["newOrder"], order)
        location = response.headers.get("Location")
        if not location:
            raise AcmeProtocolError("newOrder answered without a Location header")
        return OrderState(location, response.json(), self._retry_after())

    def account_orders(self, *, max_pages: int = 50) -> list[str] | None:
        """The URLs in the account's orders list (RFC 8555 §7.1.2.1), following its
        ``Link: rel="next"`` pages; None when the CA offers no such list (Let's Encrypt
        does not)."""
        if not self.account_url:
            raise AcmeError("the account is not registered")
        account = self._post_as_get(self.account_url).json()
        url = account.get("orders") if isinstance(account, dict) else None
        if not url:
            return None
        found: list[str] = []
        for _ in range(max_pages):
            response = self._post_as_get(str(url))
            page = response.json()
            found.extend(str(u) for u in (page.get("orders") or [])
                         if isinstance(page, dict))
            url = response.links.get("next", {}).get("url")
            if not url:
                break
        return found

    def get_order(self, url: str) -> OrderState:
        response = self._post_as_get(url)
        return OrderState(url, response.json(), self._retry_after())

    def get_authorization(self, url: str) -> tuple[dict[str, Any], float | None]:
        response = self._post_as_get(url)
        body = response.json()
        if not isinstance(body, dict):
            raise AcmeProtocolError(f"authorization {url} is not a JSON object")
        return body, self._retry_after()

    def answer_challenge(self, url: str, challenge_type: str) -> dict[str, Any]:
        # every answer is the empty object (RFC 8555 §7.5.1); the acme package no longer
        # ships a tls-alpn-01 response class, so that one borrows dns-01's
        answer: Any = {
            "http-01": challenges.HTTP01Response(),
            "dns-01": challenges.DNS01Response(),
            "tls-alpn-01": challenges.DNS01Response(),
        }.get(challenge_type)
        if answer is None:
            raise AcmeError(f"unsupported challenge type {challenge_type}")
        response = self._post(url, answer)
        body = response.json()
        return body if isinstance(body, dict) else {}

    def finalize(self, finalize_url: str, csr_pem: bytes, order_url: str) -> OrderState:
        csr = x509.load_pem_x509_csr(csr_pem)
        response = self._post(finalize_url, messages.CertificateRequest(csr=csr))
        return OrderState(order_url, response.json(), self._retry_after())

    def download(self, certificate_url: str) -> str:
        response = self._post_as_get(certificate_url)
        text = response.text
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise AcmeProtocolError("certificate download did not return a PEM chain")
        return text

    def renewal_info(self, cert_id: str) -> tuple[dict[str, Any], float | None]:
        """GET renewalInfo/<CertID> (RFC 9773: unauthenticated GET)."""
        base = self.directory.get("renewalInfo")
        if not isinstance(base, str):
            raise AcmeProtocolError("the directory offers no renewalInfo")
        url = base.rstrip("/") + "/" + cert_id
        response = self._call(lambda: self.net.get(url, content_type="application/json"))
        body = response.json()
        if not isinstance(body, dict):
            raise AcmeProtocolError("renewalInfo is not a JSON object")
        return body, self._retry_after()

    def revoke(self, cert_pem: bytes, reason: int = 0) -> None:
        cert = x509.load_pem_x509_certificate(cert_pem)
        self._post(self.directory["revokeCert"], messages.Revocation(certificate=cert,
                                                                     reason=reason))


_local = threading.local()


def get_cached(directory_url: str, cache_key: str, ca_bundle: str | None) -> AcmeClient | None:
    cache = getattr(_local, "clients", None) or {}
    client: AcmeClient | None = cache.get((directory_url, cache_key, ca_bundle))
    return client


def get_client(directory_url: str, account_key_pem: bytes, *, cache_key: str,
               account_url: str | None, ca_bundle: str | None) -> AcmeClient:
    """A client for this thread, reused across orders of the same account."""
    cache: dict[tuple[str, str, str | None], AcmeClient] = getattr(_local, "clients", None) \
        or {}
    _local.clients = cache
    key = (directory_url, cache_key, ca_bundle)
    client = cache.get(key)
    if client is None:
        if len(cache) >= 32:
            for old in cache.values():
                old.close()
            cache.clear()
        client = AcmeClient(directory_url, account_key_pem, account_url=account_url,
                            ca_bundle=ca_bundle)
        cache[key] = client
    elif account_url != client.account_url:
        client.set_account_url(account_url)
    return client


def drop_client(directory_url: str, cache_key: str, ca_bundle: str | None) -> None:
    cache = getattr(_local, "clients", None) or {}
    client = cache.pop((directory_url, cache_key, ca_bundle), None)
    if client is not None:
        client.close()


def close_clients() -> None:
    cache = getattr(_local, "clients", None) or {}
    for client in cache.values():
        client.close()
    cache.clear()
