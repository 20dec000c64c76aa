"""Issue or renew one certificate: drive an ACME order, resuming it after any crash.

``run_issuance()`` is what the ``certificates.issue`` job runs (``issue_handler``): ensure
the account is registered, persist a new order, answer its challenges, finalize, and store
the certificate, talking to the CA through ``app.acme`` and storing every result through
the domain modules (``accounts``, ``orders``, ``certificates``, ``challenges``; when to
renew next comes from ``renewal``). Each step is saved in
``orders`` before the next (see ``app.domain.orders``): the order URL the moment newOrder
answers, each challenge once answered, the lease-fenced ``finalizing`` state before the
finalize request, the certificate URL, the downloaded chain, and finally the certificate
document and the order's completion in one fenced transaction.

A job that runs again (a peer after the first worker died, or a retry) finds its order by
job id, fetches it by URL and continues from the CA's real state; it creates a new order
only when the stored one is invalid or expired at the CA.

Failures are decided from ACME problem types (``app.acme.errors.classify``): a failed
validation or a refused request is recorded on the certificate with the CA's problem
detail and backs off exponentially (``IssuanceFailed``); ``rateLimited`` and
``Retry-After`` surface as ``AcmeProblem`` with ``retry_after`` for the job to reschedule;
``badNonce`` never leaves the client.

The ``certificates.issue`` job's outcomes: issued (the job completes in the same
transaction that stores the certificate); ``rateLimited`` or any ``Retry-After`` →
``RetryLater`` at that time; a failed validation or refused request → recorded on the
certificate with the CA's problem and backed off (1 h → 32 h), the job fails permanently
with the problem as its error; a missing KEK → ``RetryLater``; anything else (CA
unreachable, timeouts, 5xx) → the job's own retry with backoff.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from acme import crypto_util
from pymongo.client_session import ClientSession
from pymongo.database import Database

from app import audit
from app import db as dbm
from app.acme import ari, solvers
from app.acme.client import AcmeClient, OrderState, PollSchedule, poll
from app.acme.dns.lookup import PropagationTimeout
from app.acme.errors import (
    AcmeError,
    AcmeProblem,
    AcmeProtocolError,
    ChallengeFailed,
    Decision,
    OrderFailed,
    classify,
)
from app.config import Settings
from app.db import Doc
from app.domain import (
    accounts,
    budget,
    ca_fallback,
    certificates,
    challenges,
    drift,
    orders,
    renewal,
)
from app.domain.issued import describe_issued
from app.domain.projects import now_ms
from app.errors import ValidationFailed
from app.jobs import DeferUntil, JobContext, PermanentFailure, RetryLater
from app.keys import KeyUnavailable, generate_private_key, open_private_key, seal_private_key

log = logging.getLogger(__name__)

T = TypeVar("T")

# A run creates at most this many orders (each replaces an expired one) before giving up.
MAX_ORDERS_PER_RUN = 3
# How many of the account's orders that no order of ours knows are read when looking
# for the one an interrupted attempt created but never saved (the list's last first).
MAX_UNSAVED_ORDER_LOOKUPS = 20
DEFAULT_RATE_LIMIT_DELAY = 3600.0


class Fence(Protocol):
    """What the issuance needs from the job running it (``app.jobs.JobContext``)."""

    @property
    def job_id(self) -> str | None: ...

    @property
    def lease_token(self) -> str | None: ...

    def check_lease(self) -> None: ...

    def transaction(self, fn: Callable[[ClientSession], T], *,
                    complete: bool = False) -> T: ...


class IssuanceFailed(AcmeError):
    """The attempt failed for a reason retrying soon will not fix; it is recorded on the
    certificate (problem detail, failure count, next attempt after backoff)."""

    code = "issuance_failed"

    def __init__(self, problem: AcmeProblem, next_attempt_at: datetime) -> None:
        self.problem = problem
        self.next_attempt_at = next_attempt_at
        super().__init__(f"{problem} (next attempt after {next_attempt_at.isoformat()})")


class _CertificateMoved(Exception):  # noqa: N818 - internal control flow
    """The certificate's version changed since it was read: abort and read it again."""


class AccountReset(AcmeError):
    """The CA no longer knows the account: its URL was cleared; retry at once."""

    code = "acme_account_reset"


def _parse_expires(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return ari.parse_time(value, "expires")
    except AcmeProtocolError:
        return None


def _csr_for(key_pem: bytes, identifiers: list[Doc]) -> str:
    names = [i["value"] for i in identifiers if i["type"] == "dns"]
    ips = [ipaddress.ip_address(i["value"]) for i in identifiers if i["type"] == "ip"]
    return crypto_util.make_csr(key_pem, names, ipaddrs=ips).decode()


class IssuanceRun:
    def __init__(self, db: Database[Doc], fence: Fence, settings: Settings,
                 certificate_id: str, reason: str, actor: audit.Actor) -> None:
        self.db = db
        self.fence = fence
        self.settings = settings
        self.certificate_id = certificate_id
        self.reason = reason
        self.actor = actor
        self.schedule = PollSchedule(timeout=settings.acme_order_timeout_seconds)
        self.orders_created = 0
        self.resumed = False
        self.account: Doc | None = None
        self.account_id: str | None = None

    # ------------------------------------------------------------ entry point
    def run(self) -> Doc:
        cert = certificates.get_certificate(self.db, self.certificate_id, include_deleted=True)
        if cert.get("deleted_at"):
            self._abandon(orders.latest_for_job(self.db, self.fence.job_id)
                          if self.fence.job_id else None, "certificate deleted")
            return {"outcome": "skipped", "why": "certificate deleted",
                    "certificate_id": self.certificate_id}
        if cert.get("status") == certificates.STATUS_REVOKED and self.reason not in (
                "manual", "reissue", "emergency"):
            return {"outcome": "skipped", "why": "certificate revoked",
                    "certificate_id": self.certificate_id}
        order = orders.latest_for_job(self.db, self.fence.job_id) if self.fence.job_id else None
        if order is not None and order["state"] == orders.COMPLETED:
            return self._result(order, cert)  # done before a crash: nothing more to do
        # a missing credential variable or a CNAME loop is refused before any CA call
        solvers.solver_for(cert["challenge"], challenges.Http01Records(self.db)).check(
            [str(i["value"]) for i in cert["identifiers"] if i["type"] == "dns"])
        # The CA in use by policy (the primary, or a fallback after failures there).
        cert = ca_fallback.with_project_default(self.db, cert)
        self.account_id = ca_fallback.active_account_id(cert)
        if order is not None and order["state"] not in orders.TERMINAL \
                and order.get("account_id") != self.account_id:
            self._abandon(order, "the certificate moved to another CA")
        account = accounts.get_account(self.db, self.account_id)
        client = accounts.client_for(self.db, account, self.settings)
        try:
            account = accounts.ensure_registered(self.db, account, client, self.actor,
                                                 fence=self.fence)
            self.account = account
            if order is not None and order["state"] not in orders.TERMINAL:
                self.resumed = True
                return self._drive(order, cert, account, client, None)
            if self.reason == "renewal" and order is None:
                not_due = self._ari_gate(cert, client)
                if not_due is not None:
                    return not_due
            order = self._create_order(cert, account, client, previous=order)
            return self._drive(order, cert, account, client, self._new_order(order, client))
        except accounts.AccountNotRegistrable as exc:
            raise self._record_failure(cert, order, AcmeProblem(
                "urn:certautopilot:error:accountNotRegistered", exc.message)) from None
        except AcmeProblem as problem:
            decision = classify(problem)
            self._charge_budget(problem, account, cert)
            if decision is Decision.ACCOUNT_MISSING:
                accounts.forget_account_url(self.db, account, self.actor, fence=self.fence)
                current = orders.latest_for_job(self.db, self.fence.job_id) \
                    if self.fence.job_id else None
                self._abandon(current, "the CA no longer knows the account")
                raise AccountReset(f"the CA does not know account {account['_id']} any "
                                   "more; it will be recovered or registered again") from None
            if decision is Decision.RECORD_AND_BACK_OFF:
                current = orders.latest_for_job(self.db, self.fence.job_id) \
                    if self.fence.job_id else order
                raise self._record_failure(cert, current, problem) from None
            raise

    # ------------------------------------------------------------ ARI gate
    def _ari_gate(self, cert: Doc, client: AcmeClient) -> Doc | None:
        """A scheduled renewal asks the CA's renewalInfo first; if the window moved later,
        reschedule instead of ordering."""
        now = now_ms()
        decision = renewal.ari_postpones(cert, client, now)
        if decision is None:
            return None
        result = {"outcome": "not_due", "certificate_id": cert["_id"],
                  "next_renewal_at": decision.next_renewal_at.isoformat()}

        def save(session: ClientSession) -> Doc:
            renewal.record_postponement(self.db, session, cert, decision, now, self.actor)
            return result

        return self.fence.transaction(save, complete=True)

    # ------------------------------------------------------------ order creation
    def _create_order(self, cert: Doc, account: Doc, client: AcmeClient,
                      previous: Doc | None = None) -> Doc:
        if self.orders_created >= MAX_ORDERS_PER_RUN:
            raise AcmeProtocolError(f"{self.orders_created} orders expired in one attempt")
        self.orders_created += 1
        renewal = cert.get("renewal") or {}
        reuse = bool(renewal.get("reuse_key")) and bool(cert.get("key_id")) and \
            cert.get("key_type_issued", cert.get("key_type")) == cert["key_type"]
        if reuse:
            key_pem = open_private_key(self.db, cert["key_id"], project_id=cert["project_id"])
        else:
            key_pem = generate_private_key(cert["key_type"])
        identifiers = list(cert["identifiers"])
        csr_pem = _csr_for(key_pem, identifiers)
        replaces = None
        if cert.get("ari_cert_id") and cert.get("certificate_pem"):
            try:
                if client.has_renewal_info():
                    replaces = cert["ari_cert_id"]
            except AcmeError:
                replaces = None
        order = orders.new_order_doc(
            certificate=cert, account=account, job_id=self.fence.job_id, reason=self.reason,
            identifiers=identifiers, key_type=cert["key_type"],
            key_id=cert["key_id"] if reuse else "", csr_pem=csr_pem,
            challenge=cert["challenge"], profile=cert.get("profile"), replaces=replaces,
            attempt=int(previous.get("attempt", 0)) + 1 if previous else 1)

        def insert(session: ClientSession) -> None:
            if not reuse:
                order["key_id"] = seal_private_key(self.db, key_pem,
                                                   project_id=cert["project_id"],
                                                   purpose="certificate", session=session)
            orders.insert(self.db, order, session=session)
            audit.record(self.db, session, actor=self.actor, action="order.create",
                         target=f"order:{order['_id']}", project_id=cert["project_id"],
                         details={"certificate_id": cert["_id"], "names": order["names"],
                                  "key_type": order["key_type"], "key_id": order["key_id"],
                                  "reused_key": reuse, "reason": self.reason,
                                  "job_id": self.fence.job_id})

        self.fence.transaction(insert)
        self._sweep_leftovers(cert, order["_id"])
        return order

    def _new_order(self, order: Doc, client: AcmeClient) -> OrderState:
        """newOrder at the CA; its URL is saved before anything else happens. A token of
        the shared CA budget is taken first (``app.domain.budget``), or the job is
        deferred until one is free. An order that an earlier attempt sent without saving
        the answer (killed in between) is looked up at the CA first, not made twice."""
        self.fence.check_lease()
        if order.get("new_order_sent_at"):
            lost = self._find_unsaved_order(order, client)
            if lost is not None:
                return self._save_new_order(order, lost)
        grant = self._take_budget(order)
        try:
            self.fence.check_lease()
            orders.save_fields(self.db, order, {"new_order_sent_at": now_ms()})
            try:
                state = client.new_order(order["identifiers"], profile=order.get("profile"),
                                         replaces=order.get("replaces"))
            except AcmeProblem as problem:
                if problem.problem_code == "alreadyReplaced" and order.get("replaces"):
                    # An earlier attempt's order (lost before its URL was saved) already
                    # claimed the replacement: order without it.
                    order["replaces"] = None
                    state = client.new_order(order["identifiers"],
                                             profile=order.get("profile"))
                else:
                    raise
            return self._save_new_order(order, state)  # the URL first, then the budget
        finally:
            try:
                budget.settle(self.db, grant)
            except Exception as exc:  # noqa: BLE001 - the token keeps its take time
                log.warning("could not settle a CA budget token", extra={
                    "order_id": order["_id"], "error": str(exc)[:200]})

    def _save_new_order(self, order: Doc, state: OrderState) -> OrderState:
        orders.transition(self.db, order, orders.PENDING, expect=[orders.CREATED], fields={
            "order_url": state.url,
            "finalize_url": state.body.get("finalize"),
            "authorizations": [{"url": url} for url in state.body.get("authorizations", [])],
            "expires": _parse_expires(state.body.get("expires")),
            "ca_status": state.status,
            "replaces": order.get("replaces"),
        })
        return state

    def _find_unsaved_order(self, order: Doc, client: AcmeClient) -> OrderState | None:
        """The order an earlier attempt created at the CA but never saved: an order of
        this account for exactly these identifiers, still pending or ready, whose URL no
        order of ours holds. None when the CA keeps no orders list or none matches."""
        try:
            urls = client.account_orders()
        except AcmeError as exc:
            log.info("cannot read the account's orders list; ordering anew",
                     extra={"order_id": order["_id"], "error": str(exc)[:200]})
            return None
        if not urls:
            return None
        known = {doc["order_url"] for doc in self.db[dbm.ORDERS].find(
            {"account_id": order["account_id"], "order_url": {"$in": urls}},
            {"order_url": 1})}
        wanted = sorted((str(i["type"]), str(i["value"])) for i in order["identifiers"])
        for url in [u for u in urls if u not in known][-MAX_UNSAVED_ORDER_LOOKUPS:][::-1]:
            try:
                state = client.get_order(url)
            except AcmeError:
                continue
            found = sorted((str(i.get("type")), str(i.get("value")))
                           for i in state.body.get("identifiers") or [])
            if state.status in ("pending", "ready") and found == wanted:
                log.warning("found the order an interrupted attempt created at the CA; "
                            "continuing with it", extra={"order_id": order["_id"],
                                                         "order_url": url})
                return state
        return None

    # ------------------------------------------------------------ the shared CA budget
    def _take_budget(self, order: Doc) -> budget.Grant:
        account = self.account or {}
        directory = str(account.get("directory_url") or self.settings.acme_directory_url)
        account_id = str(account.get("_id") or order.get("account_id"))
        names = [str(i["value"]) for i in order["identifiers"]]
        refusal = budget.check(self.db, budget.validation_buckets(
            self.settings, directory, account_id, names))
        if refusal is None:
            taken = budget.take(self.db, budget.order_buckets(
                self.settings, directory, account_id, names,
                replaces=bool(order.get("replaces"))))
            if isinstance(taken, budget.Grant):
                return taken
            refusal = taken
        log.info("CA budget spent; deferring the order", extra={
            "certificate_id": order["certificate_id"], "bucket": refusal.bucket.kind,
            "subject": refusal.bucket.subject, "until": refusal.until.isoformat()})
        raise DeferUntil(refusal.until, dbm.server_now(self.db), refusal.reason())

    def _charge_budget(self, problem: AcmeProblem, account: Doc, cert: Doc) -> None:
        """What the CA counted against us: a failed validation spends the identifier's
        token; a ``rateLimited`` answer drains the bucket it names until Retry-After."""
        try:
            directory = str(account.get("directory_url") or self.settings.acme_directory_url)
            names = [str(i["value"]) for i in cert.get("identifiers") or []]
            if isinstance(problem, ChallengeFailed):
                failed = [problem.identifier] if problem.identifier else names
                budget.spend(self.db, budget.validation_buckets(
                    self.settings, directory, str(account["_id"]), failed))
            elif problem.problem_code == "rateLimited":
                buckets = budget.order_buckets(self.settings, directory,
                                               str(account["_id"]), names, replaces=False)
                named = budget.bucket_named_by(problem.detail, buckets)
                delay = problem.retry_after if problem.retry_after is not None else \
                    DEFAULT_RATE_LIMIT_DELAY
                if named is not None:
                    budget.drain(self.db, named, dbm.server_now(self.db)
                                 + timedelta(seconds=delay))
        except Exception as exc:  # noqa: BLE001 - bookkeeping never hides the CA's answer
            log.warning("could not charge the CA budget", extra={
                "certificate_id": cert.get("_id"), "error": str(exc)[:200]})

    # ------------------------------------------------------------ the state machine
    def _fetch(self, client: AcmeClient, url: str) -> OrderState | None:
        """The order at the CA, or None when the CA has forgotten it (404)."""
        try:
            return client.get_order(url)
        except AcmeProblem as problem:
            if problem.http_status == 404:
                return None
            raise

    def _drive(self, order: Doc, cert: Doc, account: Doc, client: AcmeClient,
               state: OrderState | None) -> Doc:
        while True:
            if state is None:
                if order["state"] == orders.CREATED:
                    state = self._new_order(order, client)
                    continue
                if order["state"] == orders.DOWNLOADED:
                    return self._complete(order, cert, client, None)
                fetched = self._fetch(client, order["order_url"])
                if fetched is None:
                    orders.transition(self.db, order, orders.EXPIRED,
                                      fields={"error": {"detail": "the CA no longer knows "
                                                                  "this order"}})
                    self._cleanup(order)
                    order = self._create_order(cert, account, client, previous=order)
                    continue
                state = fetched
            status = state.status
            if status == "pending":
                state = self._authorize(order, state, client)
            elif status == "ready":
                state = self._finalize(order, state, client)
            elif status == "processing":
                # finalize was accepted ('finalizing' is saved); nothing new to save yet
                state = self._poll_order(client, str(order["order_url"]), "processing",
                                         "certificate issuance")
            elif status == "valid":
                return self._complete(order, cert, client, state)
            elif status == "invalid":
                if self._is_expired(state):
                    orders.transition(self.db, order, orders.EXPIRED,
                                      fields={"ca_status": status})
                    self._cleanup(order)
                    order = self._create_order(cert, account, client, previous=order)
                    state = None
                    continue
                raise self._invalid_problem(state, client)
            else:
                raise AcmeProtocolError(f"order {order['order_url']} has unknown status "
                                        f"{status!r}")

    def _poll_order(self, client: AcmeClient, url: str, while_status: str,
                    what: str) -> OrderState:
        """Poll the order until it leaves ``while_status`` (fast start, backoff,
        Retry-After honoured)."""
        def fetch() -> tuple[OrderState, float | None]:
            state = client.get_order(url)
            return state, state.retry_after

        return poll(fetch, lambda s: s.status != while_status, what=what,
                    schedule=self.schedule, url=url)

    @staticmethod
    def _is_expired(state: OrderState) -> bool:
        expires = _parse_expires(state.body.get("expires"))
        return state.body.get("error") is None and expires is not None and \
            expires <= datetime.now(UTC)

    def _invalid_problem(self, state: OrderState, client: AcmeClient) -> AcmeProblem:
        """The CA's reason an order is invalid: a failed challenge's error, else the
        order's own error."""
        for url in state.body.get("authorizations", []):
            try:
                body, _ = client.get_authorization(url)
            except AcmeError:
                continue
            if body.get("status") == "invalid":
                for chall in body.get("challenges", []):
                    error = chall.get("error")
                    if isinstance(error, dict):
                        problem = ChallengeFailed.from_json(
                            error, url=chall.get("url"), http_status=error.get("status")
                            if isinstance(error.get("status"), int) else None)
                        if not problem.identifier:
                            ident = body.get("identifier") or {}
                            problem.identifier = str(ident.get("value", "")) or None
                        return problem
        error = state.body.get("error")
        if isinstance(error, dict):
            return OrderFailed.from_json(error, url=state.url)
        return OrderFailed("urn:ietf:params:acme:error:serverInternal",
                           "the order became invalid without a reason", url=state.url)

    def _authorize(self, order: Doc, state: OrderState, client: AcmeClient) -> OrderState:
        challenge_type = order["challenge"]["type"]
        solver = self._solver(order)
        saved = {a.get("url"): a for a in order.get("authorizations") or []}
        to_answer: list[tuple[str, Doc, Doc, Doc, solvers.Challenge]] = []
        for url in list(state.body.get("authorizations", [])):
            body, _ = client.get_authorization(url)
            status = body.get("status")
            identifier = str((body.get("identifier") or {}).get("value", ""))
            if status == "valid":
                continue
            if status == "invalid":
                return state  # the order turns invalid; _drive reports the problem
            if status != "pending":
                continue  # deactivated/expired/revoked: the order will become invalid
            chall = next((c for c in body.get("challenges", [])
                          if c.get("type") == challenge_type), None)
            if chall is None:
                raise ChallengeFailed(
                    "urn:ietf:params:acme:error:rejectedIdentifier",
                    f"the CA offers no {challenge_type} challenge for {identifier}",
                    identifier=identifier)
            token = str(chall.get("token", ""))
            key_authorization = client.key_authorization(token)
            dns_value = client.dns01_value(token) if challenge_type == "dns-01" else None
            challenge_doc = {"type": challenge_type, "url": chall.get("url"), "token": token,
                             "dns_value": dns_value}
            entry = saved.get(url) or {}
            if dns_value is not None and not entry.get("challenge"):
                # a DNS record outlives a crash (no TTL index): note it before adding it
                self._save_authorization(order, url, {
                    "url": url, "identifier": identifier, "status": "provisioning",
                    "challenge": challenge_doc})
            challenge = solvers.Challenge(
                type=challenge_type, token=token, identifier=identifier,
                key_authorization=key_authorization, dns_value=dns_value,
                order_id=order["_id"], certificate_id=order["certificate_id"],
                project_id=order["project_id"])
            solver.provision(challenge)
            to_answer.append((url, chall, challenge_doc, entry, challenge))
        if to_answer:
            # dns-01: only once every authoritative server serves every record
            show = self._awaiting(order)
            try:
                solver.ready([item[4] for item in to_answer], show)
            except PropagationTimeout:
                show({})  # the job's error names the servers; a retry shows them again
                raise
        for url, chall, challenge_doc, entry, challenge in to_answer:
            if chall.get("status") == "pending":
                # The CA's state is the truth: an answer it did not register is sent again.
                self.fence.check_lease()
                client.answer_challenge(str(chall["url"]), challenge_type)
            answered = {"url": url, "identifier": challenge.identifier, "status": "answered",
                        "challenge": challenge_doc,
                        "answered_at": entry.get("answered_at") or now_ms()}
            self._save_authorization(order, url, answered)
        # 'ready' is not saved: finalizing (fenced, next) is the step that matters
        return self._poll_order(client, str(order["order_url"]), "pending", "validation")

    def _awaiting(self, order: Doc) -> solvers.OnWait:
        """Show on the order and its certificate what the solver waits for."""
        def show(awaiting: Doc) -> None:
            orders.save_fields(self.db, order, {"awaiting": awaiting or None})
            certificates.store_awaiting(self.db, order["certificate_id"], awaiting)

        return show

    def _save_authorization(self, order: Doc, url: str, entry: Doc) -> None:
        saved = list(order.get("authorizations") or [])
        index = next((i for i, a in enumerate(saved) if a.get("url") == url), None)
        if index is None:
            saved.append(entry)
            orders.save_fields(self.db, order, {"authorizations": saved})
        else:
            orders.save_fields(self.db, order, {f"authorizations.{index}": entry})
            saved[index] = entry
        order["authorizations"] = saved

    def _finalize(self, order: Doc, state: OrderState, client: AcmeClient) -> OrderState:
        """Finalize, fenced: the 'finalizing' state is written with this job's lease token
        in a transaction that commits only while the lease holds."""
        self.fence.check_lease()
        token = self.fence.lease_token

        def fence_step(session: ClientSession) -> None:
            orders.transition(self.db, order, orders.FINALIZING, session=session, fields={
                "fence": {"lease_token": token, "job_id": self.fence.job_id, "at": now_ms()},
                "ca_status": "ready"})

        self.fence.transaction(fence_step)
        self.fence.check_lease()
        try:
            state = client.finalize(order["finalize_url"], order["csr_pem"].encode(),
                                    order["order_url"])
        except AcmeProblem as problem:
            if problem.problem_code != "orderNotReady":
                raise
            state = client.get_order(order["order_url"])  # a peer got there first
            if state.status == "ready":
                raise
        return state

    # ------------------------------------------------------------ completion
    def _complete(self, order: Doc, cert: Doc, client: AcmeClient,
                  state: OrderState | None) -> Doc:
        if order["state"] != orders.DOWNLOADED:
            assert state is not None
            certificate_url = state.body.get("certificate")
            if not isinstance(certificate_url, str):
                raise AcmeProtocolError("a valid order without a certificate URL")
            try:
                fullchain = client.download(certificate_url)
            except AcmeError:
                if order["state"] != orders.VALID:
                    orders.transition(self.db, order, orders.VALID,
                                      fields={"certificate_url": certificate_url,
                                              "ca_status": "valid"})
                raise
            orders.transition(self.db, order, orders.DOWNLOADED, fields={
                "certificate_url": certificate_url, "ca_status": "valid",
                "fullchain_pem": fullchain})
        fullchain = str(order["fullchain_pem"])
        issued = describe_issued(fullchain)
        current = cert
        for _ in range(5):
            try:
                outcome = self._store(order, current, issued, client)
                break
            except _CertificateMoved:
                # changed since this run read it (a spec update, a deletion): read again
                current = certificates.get_certificate(self.db, cert["_id"],
                                                       include_deleted=True)
        else:
            raise AcmeProtocolError(f"certificate {cert['_id']} keeps changing; retry")
        self._cleanup(order)
        return outcome

    def _store(self, order: Doc, current: Doc, issued: Doc, client: AcmeClient) -> Doc:
        """Store the result on the certificate, complete the order and the job, in one
        fenced transaction; conditional on the certificate's version this run read."""
        now = now_ms()
        deleted = bool(current.get("deleted_at"))
        schedule = renewal.schedule_after_issue(current, issued, client, now) \
            if not deleted else {}
        is_renewal = bool(current.get("certificate_pem"))
        if current.get("names") != order["names"] or \
                current.get("key_type") != order["key_type"]:
            schedule["next_renewal_at"] = now  # the spec moved on: issue again
            schedule["renewal_source"] = "spec_changed"
        by = ca_fallback.issued_fields(current, self.account) if self.account else {}
        updates = {**issued, **schedule, **by, "status": certificates.STATUS_ISSUED,
                   "key_id": order["key_id"], "key_type_issued": order["key_type"],
                   "order_id": order["_id"], "issued_at": now, "failure": None,
                   "updated_at": now}
        if current.get("status") == certificates.STATUS_REVOKED:
            updates["revoked_at"] = None

        def save(session: ClientSession) -> Doc:
            if not deleted and not certificates.store_issued(self.db, session, current,
                                                             updates):
                raise _CertificateMoved()
            if not deleted and is_renewal:  # drift: check what the endpoints serve
                drift.schedule_verification(self.db, session, current, issued,
                                            settings=self.settings)
            orders.transition(self.db, order, orders.COMPLETED, session=session,
                              fields={"serial": issued["serial"],
                                      "not_after": issued["not_after"]})
            outcome = self._result(order, current)
            if deleted:
                outcome["outcome"] = "skipped"
                outcome["why"] = "certificate deleted while issuing"
                return outcome
            audit.record(self.db, session, actor=self.actor,
                         action="certificate.renew" if is_renewal else "certificate.issue",
                         target=f"certificate:{current['_id']}",
                         project_id=current["project_id"],
                         details={"order_id": order["_id"], "serial": issued["serial"],
                                  "not_after": issued["not_after"],
                                  "names": order["names"], "key_id": order["key_id"],
                                  "fingerprint_sha256": issued["fingerprint_sha256"]})
            return outcome

        # The certificate, the order's completion and the job's completion commit together.
        return self.fence.transaction(save, complete=True)

    def _abandon(self, order: Doc | None, why: str) -> None:
        if order is not None and order["state"] not in orders.TERMINAL:
            orders.transition(self.db, order, orders.ABANDONED,
                              fields={"error": {"detail": why}})
            self._cleanup(order)

    def _solver(self, order: Doc) -> solvers.Solver:
        return solvers.solver_for(order["challenge"], challenges.Http01Records(self.db))

    def _sweep_leftovers(self, cert: Doc, current_id: str) -> None:
        """Remove the dns-01 records earlier attempts left behind (a killed worker, an
        abandoned job): the TXT records would otherwise stay in the zone for good."""
        for stale in orders.with_leftover_dns_records(self.db, cert["_id"], current_id):
            if stale.get("job_id") == self.fence.job_id and \
                    stale["state"] not in orders.TERMINAL:
                continue  # this job's own order: it is resumed, not swept
            self._cleanup(stale)

    def _cleanup(self, order: Doc) -> None:
        try:
            if order["challenge"]["type"] in ("http-01", "tls-alpn-01"):
                challenges.remove_for_order(self.db, order["_id"])
            else:
                self._solver(order).cleanup([
                    solvers.Challenge(type=a["challenge"]["type"], token=a["challenge"]["token"],
                                      identifier=a["identifier"], key_authorization="",
                                      dns_value=a["challenge"].get("dns_value"),
                                      order_id=order["_id"],
                                      certificate_id=order["certificate_id"],
                                      project_id=order["project_id"])
                    for a in order.get("authorizations") or [] if a.get("challenge")])
            orders.mark_challenges_cleaned(self.db, order["_id"])
        except Exception as exc:  # noqa: BLE001 - the next attempt sweeps what is left
            log.warning("challenge cleanup failed (the next attempt removes them)",
                        extra={"order_id": order["_id"], "error": str(exc)[:200]})

    def _result(self, order: Doc, cert: Doc) -> Doc:
        started = order.get("started_at") or order.get("created_at")
        completed = order.get("completed_at")
        latency = (completed - started).total_seconds() if isinstance(
            started, datetime) and isinstance(completed, datetime) else None
        return {"outcome": "issued", "certificate_id": cert["_id"], "order_id": order["_id"],
                "serial": order.get("serial"), "resumed": self.resumed,
                "not_after": order["not_after"].isoformat() if isinstance(
                    order.get("not_after"), datetime) else None,
                "order_seconds": latency}

    # ------------------------------------------------------------ failures
    def _record_failure(self, cert: Doc, order: Doc | None,
                        problem: AcmeProblem) -> IssuanceFailed:
        current = certificates.get_certificate(self.db, cert["_id"], include_deleted=True)
        failures = int((current.get("failure") or {}).get("count", 0)) + 1
        now = now_ms()
        next_at = now + renewal.backoff_delay(failures, self.settings)
        failure = {"count": failures, "last_error": problem.as_doc(), "last_failed_at": now,
                   "next_attempt_at": next_at,
                   "order_id": order["_id"] if order else None}
        status = current.get("status")
        if status in (certificates.STATUS_PENDING, certificates.STATUS_FAILED):
            status = certificates.STATUS_FAILED

        def save(session: ClientSession) -> None:
            if order is not None and order["state"] not in orders.TERMINAL:
                orders.transition(self.db, order, orders.INVALID, session=session,
                                  fields={"error": problem.as_doc()})
            certificates.store_failure(self.db, session, cert["_id"], failure=failure,
                                       status=str(status), now=now)
            audit.record(self.db, session, actor=self.actor, action="certificate.issue_failed",
                         target=f"certificate:{cert['_id']}", project_id=cert["project_id"],
                         details={"problem": problem.as_doc(), "failures": failures,
                                  "next_attempt_at": next_at,
                                  "order_id": order["_id"] if order else None})

        self.fence.transaction(save)
        if order is not None:
            self._cleanup(order)
        log.warning("issuance failed; backing off", extra={
            "certificate_id": cert["_id"], "problem_type": problem.problem_type,
            "failures": failures, "next_attempt_at": next_at.isoformat()})
        return IssuanceFailed(problem, next_at)


def run_issuance(db: Database[Doc], fence: Fence, certificate_id: str, *, reason: str,
                 settings: Settings, actor: audit.Actor | None = None) -> Doc:
    """Issue or renew ``certificate_id`` (see the module docstring)."""
    started = time.monotonic()
    run = IssuanceRun(db, fence, settings, certificate_id, reason,
                      actor or audit.system_actor("worker"))
    try:
        result = run.run()
    except AcmeError as exc:
        if run.account_id is not None and not isinstance(exc, AccountReset):
            try:
                ca_fallback.note_failure(db, certificate_id, run.account_id, exc,
                                         threshold=settings.ca_fallback_after_failures,
                                         actor=run.actor)
            except Exception as err:  # noqa: BLE001 - the failure itself is what matters
                log.warning("could not record a CA failure for fallback", extra={
                    "certificate_id": certificate_id, "error": str(err)[:200]})
        raise
    result["run_seconds"] = round(time.monotonic() - started, 4)
    return result


def validate_issue_payload(payload: dict[str, Any]) -> None:
    certificate_id = payload.get("certificate_id")
    if not isinstance(certificate_id, str) or not certificate_id or len(certificate_id) > 100:
        raise ValueError("certificate_id must be a certificate id")
    if payload.get("reason", "manual") not in certificates.ISSUE_REASONS:
        raise ValueError(f"reason must be one of {', '.join(certificates.ISSUE_REASONS)}")


def issue_handler(ctx: JobContext) -> dict[str, Any] | None:
    """The ``certificates.issue`` job (payload ``{certificate_id, reason}``, dedupe key per
    certificate): issue or renew one certificate, resuming this job's order if it has one;
    the job's context is the issuance's fence."""
    payload = ctx.payload
    try:
        return run_issuance(ctx.db, ctx, payload["certificate_id"],
                            reason=str(payload.get("reason", "manual")),
                            settings=ctx.settings, actor=audit.system_actor("worker"))
    except IssuanceFailed as exc:
        raise PermanentFailure(str(exc)) from None
    except ValidationFailed as exc:  # refused before any CA call (a CNAME loop...)
        raise PermanentFailure(exc.message) from None
    except AccountReset as exc:
        raise RetryLater(1, str(exc)) from None
    except accounts.AccountNotRegistrable as exc:
        raise PermanentFailure(str(exc)) from None
    except KeyUnavailable as exc:
        raise RetryLater(exc.retry_after or 30, f"key unavailable: {exc}") from None
    except AcmeProblem as problem:
        if classify(problem) is Decision.RETRY_AFTER:
            delay = problem.retry_after if problem.retry_after is not None else \
                DEFAULT_RATE_LIMIT_DELAY
            raise RetryLater(max(1.0, delay), str(problem)) from None
        raise
