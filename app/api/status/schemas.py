from marshmallow import Schema, fields


class SchedulerLeaseSchema(Schema):
    state = fields.String(required=True, metadata={
        "description": "held, expired, released or never taken"})
    holder = fields.String(allow_none=True)
    term = fields.Integer(required=True)
    expires_at = fields.DateTime(allow_none=True)
    renewed_at = fields.DateTime(allow_none=True)
    acquired_at = fields.DateTime(allow_none=True)
    released_at = fields.DateTime(allow_none=True)
    lease_seconds = fields.Float(allow_none=True)
    expires_in_s = fields.Float(allow_none=True)
    server_time = fields.DateTime(allow_none=True)


class ScheduleEntrySchema(Schema):
    name = fields.String(required=True)
    kind = fields.String(allow_none=True)
    every_seconds = fields.Float(allow_none=True)
    cron = fields.String(allow_none=True)
    source = fields.String(allow_none=True)
    next_run_at = fields.DateTime(allow_none=True)
    next_run_in_s = fields.Float(allow_none=True)
    last_run_at = fields.DateTime(allow_none=True)
    total_run_count = fields.Integer(allow_none=True)
    last_term = fields.Integer(allow_none=True)
    last_holder = fields.String(allow_none=True)
    last_job_id = fields.String(allow_none=True)


class FireSchema(Schema):
    entry = fields.String(allow_none=True)
    slot = fields.Raw(allow_none=True)
    term = fields.Integer(allow_none=True)
    holder = fields.String(allow_none=True)
    job_id = fields.String(allow_none=True)
    coalesced = fields.Boolean(
        load_default=False, dump_default=False,
        metadata={"description": "the slot joined the entry's previous job, still queued, "
                                 "instead of enqueuing another"})
    fired_at = fields.DateTime(allow_none=True)


class SchedulerStatusSchema(Schema):
    lease = fields.Nested(SchedulerLeaseSchema, required=True)
    entries = fields.List(fields.Nested(ScheduleEntrySchema), required=True)
    recent_fires = fields.List(fields.Nested(FireSchema))


class WorkerSchema(Schema):
    id = fields.String(required=True)
    host = fields.String(allow_none=True)
    pid = fields.Integer(allow_none=True)
    version = fields.String(allow_none=True)
    started_at = fields.DateTime(allow_none=True)
    state = fields.String(allow_none=True, metadata={"description": "running, stopping..."})
    concurrency = fields.Integer(allow_none=True)
    last_seen = fields.DateTime(allow_none=True)
    alive = fields.Boolean(required=True, metadata={
        "description": "Heartbeat seen within the liveness window"})
    running = fields.Integer(required=True, metadata={"description": "Jobs it runs now"})
    running_jobs = fields.List(fields.String(), metadata={
        "description": "Ids of the jobs it runs (admin tokens only)"})


class WorkersStatusSchema(Schema):
    server_time = fields.DateTime(required=True)
    alive = fields.Integer(required=True)
    workers = fields.List(fields.Nested(WorkerSchema), required=True)
    queue = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True,
                        metadata={"description": "Jobs by state: queued and running "
                                                 "counted now; succeeded, dead and "
                                                 "cancelled as of finished_counted_at"})
    finished_counted_at = fields.DateTime(required=True, allow_none=True, metadata={
        "description": "When the finished states were counted (the metrics snapshot, "
                       "refreshed every minute); null before its first refresh"})


class CaBudgetSchema(Schema):
    ca = fields.String(required=True, metadata={"description": "ACME directory URL"})
    bucket = fields.String(required=True, metadata={
        "description": "new_orders_per_account, new_certificates_per_domain, "
                       "failed_validations_per_identifier or orders_pace"})
    subject = fields.String(allow_none=True, metadata={
        "description": "account id, registered domain, account:identifier, or * "
                       "(null unless the token is an admin's)"})
    tokens = fields.Integer(required=True, metadata={"description": "tokens free now"})
    capacity = fields.Integer(required=True)
    window_seconds = fields.Float(required=True)
    next_token_at = fields.DateTime(allow_none=True)
    waiting_until = fields.DateTime(allow_none=True, metadata={
        "description": "end of the line of deferred jobs waiting for this bucket"})


class CaBudgetsSchema(Schema):
    server_time = fields.DateTime(required=True)
    buckets = fields.List(fields.Nested(CaBudgetSchema), required=True)
