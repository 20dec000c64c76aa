# One image for every role: api, worker, scheduler, migrate (see DESIGN.md).
FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements/base.txt requirements/base.txt
RUN pip install --no-cache-dir --prefix=/install -r requirements/base.txt
COPY setup.cfg pyproject.toml README.md ./
COPY app app
COPY tasks tasks
COPY scheduler scheduler
RUN pip install --no-cache-dir --no-deps --prefix=/install .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 CAP_LOG_FORMAT=json CAP_API_BIND=0.0.0.0:8000
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin cap
USER 10001
EXPOSE 8000
# The role is chosen by the command; the default is the api.
CMD ["gunicorn", "-c", "python:app.gunicorn_conf", "app:create_app()"]
