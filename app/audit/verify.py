"""Verifying the audit hash chain: stream every entry in seq order, recompute each hash,
and on the first break say what happened (edited, deleted, inserted, reordered).

The walk is the hot path of a DR drill (``certautopilot audit verify`` after a restore),
so it reads raw BSON batches on a helper thread while the caller's thread decodes and
hashes, and hashes with one reused JSON encoder. Diagnosis of a break (a few targeted
queries) runs only once, at the first break.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import bson
from bson.codec_options import CodecOptions
from pymongo.database import Database

from app import db as dbm
from app.audit.log import (
    ALG_HMAC,
    CHAIN_ID,
    GENESIS_HASH,
    _json_default,
    hmac_key,
    oldest_pending,
    pending_age_seconds,
)
from app.db import Doc

EDITED, DELETED, INSERTED, REORDERED = "edited", "deleted", "inserted", "reordered"
UNKEYED, KEY_MISSING, MALFORMED = "unkeyed", "key-missing", "malformed"
REFUSED = "refused"

_CODEC: CodecOptions[Doc] = CodecOptions(tz_aware=True)  # UTC datetimes, decoded fastest
_encode = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           default=_json_default, allow_nan=False).encode


@dataclass
class Problem:
    seq: int
    kind: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "message": self.message}


@dataclass
class VerifyResult:
    intact: bool
    checked: int = 0
    from_seq: int = 1
    last_seq: int | None = None
    head_seq: int | None = None
    unkeyed: int = 0
    pending: int = 0
    oldest_pending_s: float | None = None
    seconds: float = 0.0
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def entries_per_second(self) -> float:
        return self.checked / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "intact": self.intact, "checked": self.checked, "from_seq": self.from_seq,
            "last_seq": self.last_seq, "head_seq": self.head_seq,
            "unkeyed_entries": self.unkeyed, "pending_entries": self.pending,
            "oldest_pending_s": self.oldest_pending_s, "seconds": round(self.seconds, 3),
            "entries_per_second": round(self.entries_per_second, 1),
            "problem": self.problem.as_dict() if self.problem else None,
            "notes": self.notes,
        }


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="milliseconds")
    return value


def compute_hash(doc: Doc, key: bytes | None, *, seq: Any = None,
                 prev_hash: str | None = None) -> str:
    """The hash ``doc`` should carry (optionally as if its seq were ``seq``)."""
    body = {k: v for k, v in doc.items() if k != "_id" and k != "hash"}
    body["time"] = _iso(body.get("time"))
    if seq is not None:
        body["seq"] = seq
    prev = prev_hash if prev_hash is not None else str(doc.get("prev_hash"))
    message = prev.encode() + b"\n" + _encode(body).encode()
    alg = body.get("hash_alg") or (ALG_HMAC if key else "sha256")
    if alg == ALG_HMAC:
        if not key:
            return ""
        return hmac.new(key, message, hashlib.sha256).hexdigest()
    return hashlib.sha256(message).hexdigest()


class _Prefetch:
    """Raw BSON batches read on a helper thread (the server answers while we hash).

    ``ordered``: sorted by seq through the index. Otherwise in natural (insertion) order,
    which for a chain written by ``record()`` is seq order and is read about twice as fast
    as through the index; the caller puts stragglers back in order.
    """

    def __init__(self, db: Database[Doc], from_seq: int, batch_size: int,
                 ordered: bool) -> None:
        query = {"seq": {"$gte": from_seq}} if from_seq > 1 or ordered else {}
        if ordered:
            self._cursor = db[dbm.AUDIT].find_raw_batches(query, sort=[("seq", 1)],
                                                          batch_size=batch_size)
        else:
            self._cursor = db[dbm.AUDIT].find_raw_batches(query, batch_size=batch_size,
                                                          hint=[("$natural", 1)])
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-verify-read",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for batch in self._cursor:
                raw = cast(bytes, batch)  # find_raw_batches yields BSON bytes
                if not self._put(raw):
                    return
            self._put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            self._put(exc)

    def _put(self, item: bytes | BaseException | None) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Doc]:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield from bson.decode_all(item, _CODEC)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._cursor.close()


class _Walk:
    """The state of one walk: where it is, and the checks of one entry."""

    # Out-of-order entries held while reading in natural order before falling back to
    # the index-ordered walk (bounds memory on a collection whose order was shuffled).
    MAX_PENDING = 50_000

    def __init__(self, db: Database[Doc] | None, key: bytes | None,
                 allow_unkeyed_prefix: bool, result: VerifyResult, prev: str,
                 progress: Callable[[int], None] | None) -> None:
        self.db, self.key, self.allow_unkeyed_prefix = db, key, allow_unkeyed_prefix
        self.result, self.prev, self.progress = result, prev, progress
        self.expected = result.from_seq
        self.seen_hmac = False
        self._since_progress = 0

    def accept(self, doc: Doc) -> bool | Problem:
        """Check ``doc`` as the next entry: True (and advance), False (it does not chain
        here: diagnose), or a Problem about its protection. ``doc`` is left as it came."""
        # The hashed form is the document without _id and hash, its time in ISO form:
        # made in place (no copy on the hot path) and undone unless the entry passes.
        oid, stored, when = doc.pop("_id", None), doc.pop("hash", None), doc.get("time")
        doc["time"] = _iso(when)
        outcome = self._check(doc, stored)
        if outcome is not True:
            doc["_id"], doc["hash"], doc["time"] = oid, stored, when
        return outcome

    def _check(self, body: Doc, stored: Any) -> bool | Problem:
        doc = body
        key = self.key
        alg = body.get("hash_alg") or (ALG_HMAC if key else "sha256")
        try:
            message = self.prev.encode() + b"\n" + _encode(body).encode()
        except (TypeError, ValueError):
            return False
        unkeyed = False
        if alg == ALG_HMAC:
            if not key:
                return Problem(self.expected, KEY_MISSING, "the entry is HMAC-protected: set "
                                                           "CAP_AUDIT_HMAC_KEY to verify it")
            computed = hmac.new(key, message, hashlib.sha256).hexdigest()
        else:
            if key:
                if not self.allow_unkeyed_prefix or self.seen_hmac:
                    return Problem(
                        self.expected, UNKEYED,
                        "the entry is not HMAC-protected although CAP_AUDIT_HMAC_KEY is set"
                        + (" and an earlier entry was" if self.seen_hmac else
                           " (a chain started before the key: --allow-unkeyed-prefix)"))
                unkeyed = True
            computed = hashlib.sha256(message).hexdigest()
        if doc.get("seq") != self.expected or doc.get("prev_hash") != self.prev \
                or computed != stored:
            return False
        if unkeyed:
            self.result.unkeyed += 1
        elif alg == ALG_HMAC:
            self.seen_hmac = True
        self.prev = computed
        self.result.last_seq = self.expected
        self.result.checked += 1
        self.expected += 1
        self._since_progress += 1
        if self.progress is not None and self._since_progress >= 1000:
            self.progress(self._since_progress)
            self._since_progress = 0
        return True

    def flush_progress(self) -> None:
        if self.progress is not None and self._since_progress:
            self.progress(self._since_progress)
            self._since_progress = 0

    def natural(self, batch_size: int) -> None:
        """The fast pass: natural order, stragglers put back in order. Stops quietly at
        the first entry that does not fit; ``ordered()`` then takes over from there."""
        assert self.db is not None
        pending: dict[int, Doc] = {}
        reader = _Prefetch(self.db, self.expected, batch_size, ordered=False)
        try:
            for doc in reader:
                seq = doc.get("seq")
                if seq != self.expected:
                    if not isinstance(seq, int) or seq < self.expected or seq in pending \
                            or len(pending) >= self.MAX_PENDING:
                        return
                    pending[seq] = doc
                    continue
                if self.accept(doc) is not True:
                    return
                while self.expected in pending:
                    if self.accept(pending.pop(self.expected)) is not True:
                        return
        finally:
            reader.close()

    def ordered(self, batch_size: int) -> Problem | None:
        """The walk in seq order from where the fast pass stopped, with the diagnosis."""
        assert self.db is not None
        reader = _Prefetch(self.db, self.expected, batch_size, ordered=True)
        try:
            entries = iter(reader)
            for doc in entries:
                outcome = self.accept(doc)
                if outcome is True:
                    continue
                if isinstance(outcome, Problem):
                    return outcome
                return _diagnose(self.db, self.key, self.expected, self.prev, doc,
                                 next(entries, None), self.result.from_seq)
        finally:
            reader.close()
        return None


def verify_chain(db: Database[Doc], *, from_seq: int = 1, key: bytes | None = None,
                 use_configured_key: bool = True, allow_unkeyed_prefix: bool = False,
                 progress: Callable[[int], None] | None = None,
                 batch_size: int = 10_000) -> VerifyResult:
    """Walk the chain from ``from_seq``; stop at the first break and diagnose it.

    The key defaults to CAP_AUDIT_HMAC_KEY. With a key, every entry must be HMAC-protected
    (``allow_unkeyed_prefix`` accepts plain SHA-256 entries before the first HMAC entry:
    a chain that predates the key); without one, an HMAC entry cannot be checked.
    """
    if key is None and use_configured_key:
        key = hmac_key()
    started = time.monotonic()
    db = dbm.primary(db)
    head0 = db[dbm.COUNTERS].find_one({"_id": CHAIN_ID}) or {}
    result = VerifyResult(intact=True, from_seq=from_seq, head_seq=head0.get("seq"))

    if from_seq > 1:
        first = db[dbm.AUDIT].find_one({"seq": from_seq})
        if first is None:
            if not head0 or from_seq > int(head0.get("seq", 0)):
                result.notes.append(f"nothing to check: the chain ends before seq {from_seq}")
                result.seconds = time.monotonic() - started
                return result
            result.intact = False
            result.problem = Problem(from_seq, DELETED, f"seq {from_seq} is missing")
            result.seconds = time.monotonic() - started
            return result
        prev = str(first.get("prev_hash"))
        result.notes.append(f"trusting the prev_hash of seq {from_seq} (checked from there on)")
    else:
        prev = GENESIS_HASH

    walk = _Walk(db, key, allow_unkeyed_prefix, result, prev, progress)
    walk.natural(batch_size)
    result.problem = walk.ordered(batch_size)
    walk.flush_progress()
    if result.problem is None:
        result.problem = _check_head(db, head0, result.last_seq, walk.prev, from_seq)
    if result.problem is None:
        result.problem = _check_pending(db, result)
    result.intact = result.problem is None
    result.seconds = time.monotonic() - started
    return result


def verify_copy(lines: Iterable[str], *, key: bytes | None = None,
                use_configured_key: bool = True, allow_unkeyed_prefix: bool = False,
                progress: Callable[[int], None] | None = None) -> VerifyResult:
    """Check a forwarded copy (JSON lines, as the file sink writes them or as exported
    from a SIEM): the same chain rules, from seq 1. Resent batches (at-least-once
    delivery) repeat entries: a repeat identical to the entry already checked is skipped.
    """
    if key is None and use_configured_key:
        key = hmac_key()
    started = time.monotonic()
    result = VerifyResult(intact=True, from_seq=1)
    walk = _Walk(None, key, allow_unkeyed_prefix, result, GENESIS_HASH, progress)
    recent: dict[int, str] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            seq = doc["seq"]
        except (ValueError, KeyError, TypeError):
            result.problem = Problem(walk.expected, MALFORMED,
                                     f"line {number} is not an audit entry")
            break
        if isinstance(seq, int) and seq < walk.expected and recent.get(seq) == doc.get("hash"):
            continue  # a resend of an entry already checked
        stored = doc.get("hash")
        outcome = walk.accept(doc)
        if outcome is True:
            recent[seq] = str(stored)
            if len(recent) > 20_000:
                recent.pop(next(iter(recent)))
            continue
        if isinstance(outcome, Problem):
            result.problem = outcome
        elif not isinstance(seq, int) or seq > walk.expected:
            result.problem = Problem(walk.expected, DELETED,
                                     f"seq {walk.expected} is missing (line {number} has seq "
                                     f"{seq})")
        elif seq != walk.expected:
            result.problem = Problem(walk.expected, REORDERED,
                                     f"line {number} has seq {seq} where seq "
                                     f"{walk.expected} belongs")
        else:
            result.problem = Problem(seq, EDITED, f"seq {seq} (line {number}) does not match "
                                                  "its hash or does not chain to the entry "
                                                  "before it")
        break
    walk.flush_progress()
    result.intact = result.problem is None
    result.seconds = time.monotonic() - started
    return result


def _check_head(db: Database[Doc], head0: Doc, last_seq: int | None, last_hash: str,
                from_seq: int) -> Problem | None:
    """The tail: the chain head (counter) read before the walk must be covered; entries
    beyond the head read after the walk were not written by ``record()``."""
    head1 = db[dbm.COUNTERS].find_one({"_id": CHAIN_ID}) or {}
    seen = last_seq if last_seq is not None else from_seq - 1
    head0_seq = int(head0.get("seq", 0))
    head1_seq = int(head1.get("seq", 0))
    if seen < head0_seq:
        missing = f"seq {seen + 1}" + (f"..{head0_seq}" if head0_seq > seen + 1 else "")
        return Problem(seen + 1, DELETED,
                       f"{missing} missing at the end of the chain (the chain head is at "
                       f"seq {head0_seq})")
    if seen > head1_seq:
        return Problem(head1_seq + 1, INSERTED,
                       f"seq {head1_seq + 1}..{seen} lie beyond the chain head (seq "
                       f"{head1_seq}): not written by the application")
    if seen == head1_seq and seen >= from_seq and head1.get("hash") != last_hash:
        return Problem(seen, EDITED, f"seq {seen} does not match the chain head's hash")
    return None


def _check_pending(db: Database[Doc], result: VerifyResult) -> Problem | None:
    """Entries committed and not yet chained (``app.audit.log.seal``) are counted, not a
    break; one the sealer refused (an HMAC that does not match: written by someone without
    the key) is."""
    pending = db[dbm.AUDIT_PENDING]
    result.pending = pending.count_documents({})
    if not result.pending:
        return None
    oldest = oldest_pending(db)
    if oldest is not None:
        result.oldest_pending_s = round(pending_age_seconds(oldest, datetime.now(UTC)), 1)
    result.notes.append(f"{result.pending} entries committed and waiting to be chained "
                        f"(oldest {result.oldest_pending_s} s): the next seal chains them")
    refused = pending.find_one({"refused": {"$exists": True}}, {"refused": 1})
    if refused is None:
        return None
    count = pending.count_documents({"refused": {"$exists": True}})
    return Problem((result.head_seq or 0) + 1, REFUSED,
                   f"{count} pending entries refused by the sealer (first: _id "
                   f"{refused['_id']}: {refused['refused']}): written into audit_pending "
                   "by something other than the application")


def _diagnose(db: Database[Doc], key: bytes | None, expected: int, prev: str, doc: Doc,
              nxt: Doc | None, from_seq: int) -> Problem:
    """Name the first break: ``doc`` is where the walk expected seq ``expected`` chained
    to ``prev``; ``nxt`` is the entry after it, if any."""
    seq = doc.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        return Problem(expected, MALFORMED, f"an entry after seq {expected - 1} has no "
                                            f"integer seq ({seq!r})")
    coll = db[dbm.AUDIT]
    if nxt is not None and nxt.get("seq") == seq:
        intruder = nxt if doc.get("prev_hash") == prev else doc
        return Problem(seq, INSERTED, f"two entries claim seq {seq}; the one with _id "
                                      f"{intruder.get('_id')} is not part of the chain")
    if seq > expected:
        missing = f"seq {expected}" + (f"..{seq - 1}" if seq - 1 > expected else "")
        return Problem(expected, DELETED, f"{missing} missing: seq {seq} follows seq "
                                          f"{expected - 1}")

    stored = doc.get("hash")
    self_ok = compute_hash(doc, key) == stored
    if self_ok:
        # Consistent in itself but chained to something else.
        if (nxt is not None and nxt.get("prev_hash") == prev
                and compute_hash(nxt, key, seq=seq) == nxt.get("hash")):
            return Problem(seq, INSERTED, f"seq {seq} is not part of the chain: the original "
                                          f"seq {seq} follows it, renumbered {seq + 1}")
        origin = coll.find_one({"hash": doc.get("prev_hash")}, {"seq": 1})
        if origin is not None and origin.get("seq") != seq - 1:
            return Problem(seq, REORDERED, f"seq {seq} was written after seq "
                                           f"{origin.get('seq')}, not after seq {seq - 1}")
        if seq - 1 >= from_seq:
            return Problem(seq - 1, EDITED,
                           f"seq {seq - 1} was rewritten: its hash was recomputed and is no "
                           f"longer the one seq {seq} chained to")
        return Problem(seq, EDITED, f"seq {seq} does not chain to the entry before it")

    # Its content does not match its hash: edited, or moved to another seq.
    candidates: list[int] = []
    successor = coll.find_one({"prev_hash": stored}, {"seq": 1})
    if successor is not None and isinstance(successor.get("seq"), int):
        candidates.append(successor["seq"] - 1)
    candidates += [seq - 1, seq + 1]
    for original in dict.fromkeys(c for c in candidates if c != seq and c > 0):
        if compute_hash(doc, key, seq=original) != stored:
            continue
        if original == seq - 1:
            return Problem(seq - 1, INSERTED,
                           f"seq {seq - 1} is not part of the chain: the original seq "
                           f"{seq - 1} follows it, renumbered {seq}")
        if original == seq + 1 and coll.find_one({"hash": doc.get("prev_hash")},
                                                  {"_id": 1}) is None:
            return Problem(seq, DELETED, f"the original seq {seq} is missing: the entries "
                                         f"after it were renumbered down by one")
        return Problem(seq, REORDERED, f"the entry at seq {seq} was written as seq "
                                       f"{original}: entries were swapped or moved")
    if (nxt is not None and nxt.get("prev_hash") == prev
            and compute_hash(nxt, key, seq=seq) == nxt.get("hash")):
        return Problem(seq, INSERTED, f"seq {seq} is not part of the chain: the original "
                                      f"seq {seq} follows it, renumbered {seq + 1}")
    return Problem(seq, EDITED, f"the content of seq {seq} does not match its hash")
