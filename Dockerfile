# The example shop (examples/shop) with querywatch: SQLite by default, PostgreSQL via
# DATABASE_URL. Used by deploy/docker-compose.yml.
#   docker build -t querywatch-shop . && docker run --rm -p 8000:8000 querywatch-shop

FROM python:3.12-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY querywatch ./querywatch
COPY examples/requirements.txt ./examples/requirements.txt
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check . -r examples/requirements.txt

FROM python:3.12-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/app/examples \
    PORT=8000 \
    DATABASE_URL=sqlite:////app/data/shop.db \
    SHOP_LOG_FORMAT=json
RUN groupadd --gid 10001 shop \
    && useradd --create-home --uid 10001 --gid 10001 shop \
    && mkdir -p /app/data \
    && chown 10001:10001 /app/data
COPY --from=build /opt/venv /opt/venv
COPY examples/shop /app/examples/shop
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-m", "shop.healthcheck"]
CMD ["uvicorn", "--factory", "shop.app:app_from_env", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
