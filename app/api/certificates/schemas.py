from datetime import UTC

from marshmallow import Schema, fields, validate

from app.api.common import JsonValue, PageArgsSchema, page_schema
from app.api.jobs.schemas import JobSchema
from app.domain.certspec import CHALLENGE_TYPES, KEY_TYPES
from app.domain.drift import MAX_ENDPOINTS, STARTTLS_KINDS
from app.domain.drift import STATES as DRIFT_STATES
from app.domain.revocation import REVOCATION_REASONS

STATUSES = ("pending", "issued", "failed", "revoked")


class ChallengeSchema(Schema):
    type = fields.String(required=True, validate=validate.OneOf(CHALLENGE_TYPES))
    provider = fields.String(validate=validate.Length(min=1, max=64), metadata={
        "description": "dns-01 only: rfc2136, or a dns-lexicon provider (powerdns, "
                       "cloudflare, route53...)"})
    server = fields.String(validate=validate.Length(min=1, max=255))
    port = fields.Integer(validate=validate.Range(min=1, max=65535))
    zone = fields.String(validate=validate.Length(min=1, max=255))
    tsig_key_name = fields.String(validate=validate.Length(min=1, max=255))
    tsig_algorithm = fields.String(validate=validate.Length(min=1, max=64))
    tsig_secret_env = fields.String(validate=validate.Length(min=1, max=128), metadata={
        "description": "Name of the CAP_* variable holding the TSIG secret (never the "
                       "secret itself)"})
    options = JsonValue(metadata={"description": "dns-lexicon provider settings (no "
                                                 "credentials)"})
    credentials_env = JsonValue(metadata={
        "description": "provider option -> name of the CAP_* variable holding it"})
    resolvers = fields.List(fields.String(validate=validate.Length(min=1, max=64)),
                            metadata={"description": "resolvers for CNAME/SOA/NS lookups"})
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
    host = fields.String(required=True, validate=validate.Length(min=1, max=253),
                         metadata={"example": "www.example.com"})
    port = fields.Integer(required=True, validate=validate.Range(min=1, max=65535),
                          metadata={"example": 443})
    sni = fields.String(allow_none=True, validate=validate.Length(min=1, max=253),
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


class CertificateCreateSchema(Schema):
    project_id = fields.String(load_default=None, validate=validate.Length(max=64),
                               metadata={"description": "Required for admin tokens"})
    name = fields.String(validate=validate.Length(min=1, max=200),
                         metadata={"description": "A label (default: the first name)"})
    names = fields.List(fields.String(validate=validate.Length(min=1, max=253)),
                        required=True, validate=validate.Length(min=1, max=100),
                        metadata={"example": ["www.example.com", "example.com"]})
    key_type = fields.String(validate=validate.OneOf(KEY_TYPES), metadata={"example":
                                                                            "ec256"})
    challenge = fields.Nested(ChallengeSchema)
    ca_fallback = fields.List(fields.String(validate=validate.Length(min=1, max=100)),
                              validate=validate.Length(max=5), metadata={
                                  "description": "ACME accounts of this project, on other "
                                                 "directories, used in order after "
                                                 "account_id when it keeps failing"})
    account_id = fields.String(validate=validate.Length(min=1, max=100),
                               metadata={"description": "Default: the project's only "
                                                        "account"})
    profile = fields.String(allow_none=True, validate=validate.Length(min=1, max=64))
    renewal = fields.Nested(RenewalPolicySchema)
    endpoints = fields.List(fields.Nested(EndpointSchema),
                            validate=validate.Length(max=MAX_ENDPOINTS))
    issue = fields.Boolean(load_default=True, metadata={
        "description": "Enqueue the first issuance now (else the renewal scan does, "
                       "within a minute)"})


class CertificateUpdateSchema(Schema):
    name = fields.String(validate=validate.Length(min=1, max=200))
    names = fields.List(fields.String(validate=validate.Length(min=1, max=253)),
                        validate=validate.Length(min=1, max=100))
    key_type = fields.String(validate=validate.OneOf(KEY_TYPES))
    challenge = fields.Nested(ChallengeSchema)
    ca_fallback = fields.List(fields.String(validate=validate.Length(min=1, max=100)),
                              validate=validate.Length(max=5), metadata={
                                  "description": "ACME accounts of this project, on other "
                                                 "directories, used in order after "
                                                 "account_id when it keeps failing"})
    account_id = fields.String(validate=validate.Length(min=1, max=100))
    profile = fields.String(allow_none=True, validate=validate.Length(min=1, max=64))
    renewal = fields.Nested(RenewalPolicySchema)
    endpoints = fields.List(fields.Nested(EndpointSchema),
                            validate=validate.Length(max=MAX_ENDPOINTS))


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
