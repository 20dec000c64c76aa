import re
from datetime import UTC
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate

from app.acme.dns.config import BUILTIN, COMMON, HOSTED, RFC2136, TSIG_ALGORITHMS, hosted_providers
from app.acme.dns.config import ENV_RE as DNS_ENV_RE
from app.acme.dns.config import HOST_RE as DNS_HOST_RE
from app.acme.dns.config import NAME_RE as DNS_NAME_RE
from app.acme.identifiers import InvalidName, normalize_name
from app.api.common import JsonValue, PageArgsSchema, page_schema
from app.api.jobs.schemas import JobSchema
from app.domain.certspec import CHALLENGE_TYPES, KEY_TYPES
from app.domain.drift import MAX_ENDPOINTS, STARTTLS_KINDS
from app.domain.drift import STATES as DRIFT_STATES
from app.domain.revocation import REVOCATION_REASONS

STATUSES = ("pending", "issued", "failed", "revoked")

# What the API takes, as patterns that the schema states and the API checks first
# (marshmallow), each a subset of what the domain accepts, so the domain never refuses
# what the schema allows. They are ASCII and avoid \s, \w and lookarounds (ECMA and
# Python read those differently). Names are ASCII DNS names (a final dot allowed), IPv4 or
# IPv6 addresses, or wildcards;
# the challenge type then narrows them (see NAMES_BY_CHALLENGE). An IDN (Unicode, or its
# xn-- A-labels) is beyond the pattern (its validity is IDNA's) and taken by ``_name``.
_A, _M = "[A-Za-z0-9]", "[A-Za-z0-9-]"


def _label(first: str) -> str:
    """A DNS label of 1-63 letters, digits and inner hyphens, never '--' in positions
    3-4 (reserved for IDNA), starting with ``first``."""
    return (f"(?:{first}(?:{_M}?{_A})?|{first}{_M}{{2}}{_A}"
            f"|{first}{_M}(?:{_A}{_M}|-{_A}){_M}{{0,58}}{_A})")


DNS_NAME = rf"(?:{_label(_A)}\.)+{_label('[A-Za-z]')}"  # 2+ labels, a non-numeric TLD
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
IPV4 = rf"(?:{_OCTET}\.){{3}}{_OCTET}"
_H = "[0-9A-Fa-f]{1,4}"
# IPv6 in its full and ::-shortened forms (RFC 4291 2.2; no zone, no embedded IPv4).
IPV6 = ("(?:" + "|".join([
    rf"(?:{_H}:){{7}}{_H}", rf"(?:{_H}:){{1,7}}:",
    *(rf"(?:{_H}:){{1,{6 - k}}}(?::{_H}){{1,{k + 1}}}" for k in range(6)),
    rf":(?:(?::{_H}){{1,7}}|:)"]) + ")")
_DNS = rf"{DNS_NAME}\.?"  # an absolute name's final dot is taken (the same identifier)
NAME_PATTERN = rf"^(?:{_DNS}|{IPV4}|{IPV6}|\*\.{_DNS})$"
NAMES_BY_CHALLENGE = {  # what each challenge type can prove (RFC 8555 8, RFC 8738)
    "http-01": rf"^(?:{_DNS}|{IPV4}|{IPV6})$",
    "tls-alpn-01": rf"^{_DNS}$",
    "dns-01": rf"^(?:\*\.)?{_DNS}$",
}
LABEL_PATTERN = r"^[A-Za-z0-9_ .:@/-]{1,200}$"
PROFILE_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
# Endpoints: a host name (underscores allowed, a final dot) or an IPv4 address; an SNI
# is a host name whose last label is not numeric (never an IP address).
_HOST_LABEL = "[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
ENDPOINT_HOST_PATTERN = rf"^(?:(?:{_HOST_LABEL}\.)*{_HOST_LABEL}\.?|{IPV4})$"
SNI_PATTERN = rf"^(?:{_HOST_LABEL}\.)*[A-Za-z_](?:[A-Za-z0-9_-]{{0,61}}[A-Za-z0-9])?\.?$"
# dns-01: a zone is a DNS name with a dot inside; resolvers are IPv4 addresses.
ZONE_PATTERN = r"^\.*[A-Za-z0-9_-][A-Za-z0-9._-]*\.[A-Za-z0-9._-]*[A-Za-z0-9_-]\.*$"
# A provider option (lexicon's credential options, auth_*, go in credentials_env).
OPTION_NAME_PATTERN = ("^(?:[b-z][a-z0-9_-]{0,63}|a|a[a-tv-z0-9_-][a-z0-9_-]{0,62}|au"
                       "|au[a-su-z0-9_-][a-z0-9_-]{0,61}|aut|aut[a-gi-z0-9_-][a-z0-9_-]{0,60})$")
CREDENTIAL_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"


def _without(*names: str) -> list[dict[str, Any]]:
    return [{"not": {"required": [name]}} for name in sorted(names)]


class ChallengeSchema(Schema):
    class Meta:
        # One branch per kind of challenge: http-01 and tls-alpn-01 take no option;
        # dns-01 through rfc2136 (a TSIG key) or a dns-lexicon provider (options and
        # credentials named by variable).
        openapi_extra = {"oneOf": [
            {"properties": {"type": {"enum": ["http-01", "tls-alpn-01"]}},
             "allOf": _without(*(COMMON | RFC2136 | HOSTED) - {"type"})},
            {"properties": {"type": {"enum": ["dns-01"]}, "provider": {"enum": [BUILTIN]}},
             "required": ["provider", "server", "tsig_key_name", "tsig_secret_env"],
             "allOf": _without(*HOSTED)},
            {"properties": {
                "type": {"enum": ["dns-01"]}, "provider": {"enum": hosted_providers()},
                "options": {"type": "object", "maxProperties": 32,
                            "propertyNames": {"pattern": OPTION_NAME_PATTERN},
                            "additionalProperties": {
                                "not": {"anyOf": [{"type": "object"}, {"type": "array"}]},
                                "maxLength": 1000}},
                "credentials_env": {"type": "object", "maxProperties": 16,
                                    "propertyNames": {"pattern": CREDENTIAL_NAME_PATTERN},
                                    "additionalProperties": {
                                        "type": "string", "pattern": DNS_ENV_RE.pattern}}},
             "required": ["provider"], "allOf": _without(*RFC2136)},
        ]}

    type = fields.String(required=True, validate=validate.OneOf(CHALLENGE_TYPES))
    provider = fields.String(validate=validate.Length(min=1, max=64), metadata={
        "description": "dns-01 only: rfc2136, or a dns-lexicon provider (powerdns, "
                       "cloudflare, route53...)"})
    server = fields.String(validate=[validate.Length(min=1, max=253),
                                     validate.Regexp(DNS_HOST_RE.pattern)])
    port = fields.Integer(validate=validate.Range(min=1, max=65535))
    zone = fields.String(validate=[validate.Length(min=1, max=253),
                                   validate.Regexp(ZONE_PATTERN)])
    tsig_key_name = fields.String(validate=[validate.Length(min=1, max=253),
                                            validate.Regexp(DNS_NAME_RE.pattern)])
    tsig_algorithm = fields.String(validate=validate.OneOf(TSIG_ALGORITHMS))
    tsig_secret_env = fields.String(validate=[validate.Length(min=1, max=128),
                                              validate.Regexp(DNS_ENV_RE.pattern)], metadata={
        "description": "Name of the CAP_* variable holding the TSIG secret (never the "
                       "secret itself)"})
    options = JsonValue(metadata={"description": "dns-lexicon provider settings (no "
                                                 "credentials)"})
    credentials_env = JsonValue(metadata={
        "description": "provider option -> name of the CAP_* variable holding it"})
    resolvers = fields.List(fields.String(validate=[validate.Length(min=7, max=15),
                                                    validate.Regexp(f"^{IPV4}$")]),
                            validate=validate.Length(min=1, max=8),
                            metadata={"description": "resolvers (IPv4 addresses) for "
                                                     "CNAME/SOA/NS lookups"})
    propagation_timeout = fields.Float(validate=validate.Range(min=0, max=3600))
    follow_cname = fields.Boolean()


class RenewalPolicySchema(Schema):
    renew_before_days = fields.Float(allow_none=True,
                                     validate=validate.Range(min=0, max=365, min_inclusive=False),
                                     # apispec drops min_inclusive=False; say it (3.0 form).
                                     metadata={"exclusiveMinimum": True})
    use_ari = fields.Boolean()
    reuse_key = fields.Boolean()


class EndpointSchema(Schema):
    host = fields.String(required=True, validate=[validate.Length(min=1, max=253),
                                                  validate.Regexp(ENDPOINT_HOST_PATTERN)],
                         metadata={"example": "www.example.com",
                                   "description": "A host name or an IPv4 address"})
    port = fields.Integer(required=True, validate=validate.Range(min=1, max=65535),
                          metadata={"example": 443})
    sni = fields.String(allow_none=True, validate=[validate.Length(min=1, max=253),
                                                   validate.Regexp(SNI_PATTERN)],
                        metadata={"description": "Server name sent (default: the host "
                                                 "unless it is an IP address)"})
    starttls = fields.String(allow_none=True, validate=validate.OneOf(STARTTLS_KINDS),
                             metadata={"description": "Plaintext protocol to upgrade first"})


class EndpointStatusSchema(EndpointSchema):
    endpoint = fields.String(required=True, metadata={"example": "www.example.com:443"})
    state = fields.String(required=True, validate=validate.OneOf(DRIFT_STATES), metadata={
        "description": "ok: serves the current certificate; stale: an older one of ours; "
                       "foreign: not one we issued; unreachable; pending: not scanned yet"})
    flags = fields.List(fields.String(), metadata={"description": "'expiring': the served "
                                                                  "notAfter is near"})
    served = JsonValue(allow_none=True, metadata={
        "description": "fingerprint_sha256, serial, not_before, not_after, issuer, subject"})
    error = fields.String(allow_none=True)
    scanned_at = fields.DateTime(allow_none=True)
    next_scan_at = fields.DateTime(allow_none=True)


class CertificateSchema(Schema):
    id = fields.String(attribute="_id", required=True,
                       metadata={"example": "crt_0123456789abcdef"})
    project_id = fields.String(required=True)
    name = fields.String(required=True)
    names = fields.List(fields.String(), required=True)
    key_type = fields.String(required=True)
    challenge = JsonValue(required=True)
    account_id = fields.String(allow_none=True)
    ca_fallback = fields.List(fields.String(), metadata={
        "description": "ACME accounts used in order after account_id (CA fallback)"})
    ca_state = JsonValue(allow_none=True, metadata={
        "description": "The CA in use (active: 0 is the primary), failures there, the "
                       "last switch and why"})
    issued_by = JsonValue(allow_none=True, metadata={
        "description": "The account and directory that issued the current certificate"})
    directory_url = fields.String(allow_none=True)
    profile = fields.String(allow_none=True)
    renewal = JsonValue(allow_none=True)
    status = fields.String(required=True)
    version = fields.Integer(required=True)
    created_at = fields.DateTime(allow_none=True)
    updated_at = fields.DateTime(allow_none=True)
    next_renewal_at = fields.DateTime(allow_none=True)
    renewal_source = fields.String(allow_none=True)
    serial = fields.String(allow_none=True)
    not_before = fields.DateTime(allow_none=True)
    not_after = fields.DateTime(allow_none=True)
    fingerprint_sha256 = fields.String(allow_none=True)
    issuer = fields.String(allow_none=True)
    issued_at = fields.DateTime(allow_none=True)
    order_id = fields.String(allow_none=True)
    issue_count = fields.Integer(allow_none=True)
    failure = JsonValue(allow_none=True, metadata={"description": "The last failure, if "
                                                                   "any"})
    ari = JsonValue(allow_none=True)
    awaiting = JsonValue(allow_none=True, metadata={
        "description": "What the running issuance waits for (dns-01 propagation)"})
    revoked_at = fields.DateTime(allow_none=True)
    revocation_reason = fields.Integer(allow_none=True)
    endpoints = fields.List(fields.Nested(EndpointSchema), metadata={
        "description": "Where the certificate is served (drift scans)"})
    endpoint_status = fields.List(fields.Nested(EndpointStatusSchema), metadata={
        "description": "What each endpoint served at its last scan"})
    verification = JsonValue(allow_none=True, metadata={
        "description": "Whether the endpoints serve the latest renewal: state pending, "
                       "verified or unverified (with the failing endpoints)"})


_NAME_RE = re.compile(NAME_PATTERN)


def _name(value: str) -> None:
    """A name of the schema's pattern; or an internationalised one (Unicode labels or
    xn-- A-labels), which IDNA decides beyond any pattern: taken when the domain's IDNA
    check passes, so the API serves IDNs as it always did."""
    if _NAME_RE.match(value):
        return
    if not value.isascii() or "xn--" in value.lower():
        try:
            normalize_name(value, allow_wildcard=True, allow_ip=False)
        except InvalidName as exc:
            raise ValidationError(str(exc)) from None
        return
    raise ValidationError("String does not match expected pattern.")


_NAMES = fields.List(fields.String(validate=[validate.Length(min=1, max=253), _name],
                                   metadata={"pattern": NAME_PATTERN}),
                     validate=validate.Length(min=1, max=100), metadata={
                         "example": ["www.example.com", "example.com"],
                         "description": "DNS names (ASCII), IP addresses (http-01) or "
                                        "wildcards *.name (dns-01); duplicates are merged. "
                                        "Internationalised names (Unicode or xn-- labels) "
                                        "are taken too, beyond this pattern: IDNA decides "
                                        "them (converted to their A-labels)"})


def _spec_fields() -> dict[str, fields.Field]:
    """The fields of a certificate spec, shared by create and update."""
    return {
        "name": fields.String(validate=[validate.Length(min=1, max=200),
                                        validate.Regexp(LABEL_PATTERN)],
                              metadata={"description": "A label (default: the first "
                                                       "name)"}),
        "key_type": fields.String(validate=validate.OneOf(KEY_TYPES),
                                  metadata={"example": "ec256"}),
        "challenge": fields.Nested(ChallengeSchema),
        "ca_fallback": fields.List(
            fields.String(validate=validate.Length(min=1, max=100)),
            validate=validate.Length(max=5), metadata={
                "uniqueItems": True,
                "description": "ACME accounts of this project, on other directories, "
                               "used in order after account_id when it keeps failing "
                               "(409 when one is unknown, of another project, or the "
                               "primary)"}),
        "account_id": fields.String(validate=validate.Length(min=1, max=100), metadata={
            "description": "Default: the project's only account (409 when it has none "
                           "or several, or this one is not among them)"}),
        "profile": fields.String(allow_none=True,
                                 validate=[validate.Length(min=1, max=64),
                                           validate.Regexp(PROFILE_PATTERN)]),
        "renewal": fields.Nested(RenewalPolicySchema),
        "endpoints": fields.List(fields.Nested(EndpointSchema),
                                 validate=validate.Length(max=MAX_ENDPOINTS), metadata={
                                     "description": "Where it is served (drift scans); "
                                                    "the same host, port, SNI and "
                                                    "STARTTLS twice is one endpoint"}),
    }


# The names a request may give with each challenge (none given: http-01).
_NAMES_MATCH_CHALLENGE = {"oneOf": [
    {"not": {"required": ["challenge"]},
     "properties": {"names": {"items": {"pattern": NAMES_BY_CHALLENGE["http-01"]}}}},
    *({"required": ["challenge"], "properties": {
        "challenge": {"properties": {"type": {"enum": [kind]}}},
        "names": {"items": {"pattern": pattern}}}}
      for kind, pattern in NAMES_BY_CHALLENGE.items()),
]}


class CertificateCreateSchema(Schema.from_dict(_spec_fields())):  # type: ignore[misc]
    class Meta:
        openapi_extra = _NAMES_MATCH_CHALLENGE

    project_id = fields.String(load_default=None, validate=validate.Length(max=64),
                               metadata={"description": "Required for admin tokens"})
    names = fields.List(_NAMES.inner, required=True, validate=_NAMES.validate,
                        metadata=_NAMES.metadata)
    issue = fields.Boolean(load_default=True, metadata={
        "description": "Enqueue the first issuance now (else the renewal scan does, "
                       "within a minute)"})


class CertificateUpdateSchema(Schema.from_dict(_spec_fields())):  # type: ignore[misc]
    """A partial spec. Names and a challenge given together must suit each other; either
    alone is checked against the certificate's stored spec (409 if they do not suit)."""

    class Meta:
        openapi_extra = {"oneOf": [
            {"not": {"required": ["challenge"]}},
            *_NAMES_MATCH_CHALLENGE["oneOf"][1:],
        ]}

    names = fields.List(_NAMES.inner, validate=_NAMES.validate, metadata=_NAMES.metadata)


class CertificateListArgsSchema(PageArgsSchema):
    project_id = fields.String(validate=validate.Length(max=64),
                               metadata={"description": "Admin: only this project"})
    status = fields.String(validate=validate.OneOf(STATUSES))
    name = fields.String(validate=validate.Length(min=1, max=253), metadata={
        "description": "A DNS name the certificate covers (exact, e.g. www.example.com "
                       "or *.example.com)"})
    expiring_before = fields.AwareDateTime(default_timezone=UTC, metadata={
        "description": "Only certificates whose notAfter is before this time"})


class RevokeSchema(Schema):
    reason_code = fields.Integer(load_default=0,
                                 validate=validate.OneOf(sorted(REVOCATION_REASONS)),
                                 metadata={"description": "RFC 5280 reason code"})


class IssueAcceptedSchema(Schema):
    certificate_id = fields.String(required=True)
    job = fields.Nested(JobSchema, required=True)


CertificatePageSchema = page_schema(CertificateSchema, "CertificatePage")
