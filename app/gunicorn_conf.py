"""gunicorn settings for the api role (``gunicorn -c python:app.gunicorn_conf 'app:create_app()'``).

Worker count follows the CPUs; the graceful timeout is shorter than the pod's
terminationGracePeriodSeconds (Helm chart: 45 s) so a rollout with PDB maxUnavailable 1
drains in-flight requests; access log is JSON lines with the request id.
"""

import multiprocessing
import os

bind = os.environ.get("CAP_API_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("CAP_API_WORKERS", "0")) or min(8, multiprocessing.cpu_count() * 2 + 1)
threads = int(os.environ.get("CAP_API_THREADS", "4"))
worker_class = "gthread"
graceful_timeout = 30
timeout = 60
keepalive = 5
accesslog = "-"
errorlog = "-"
access_log_format = (
    '{"time":"%(t)s","remote":"%(h)s","method":"%(m)s","path":"%(U)s","status":%(s)s,'
    '"bytes":"%(B)s","duration_ms":%(M)s,"request_id":"%({x-request-id}o)s",'
    '"user_agent":"%(a)s"}'
)
