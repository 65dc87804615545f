# Minimal image for the example app (completed by the operations issue).
FROM python:3.11-slim
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir '.[fastapi]'
