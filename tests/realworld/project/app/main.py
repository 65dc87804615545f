"""The application, audited by querywatch in `raise` mode."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import querywatch.fastapi
from app.api.main import api_router
from app.api.routes import utils
from app.core.config import settings
from app.core.db import engine
from querywatch import Settings as QueryWatchSettings

app = FastAPI(title=settings.PROJECT_NAME)
app.include_router(api_router, prefix=settings.API_V1_STR)
app.include_router(utils.router)

metrics_registry = CollectorRegistry()
querywatch.fastapi.setup(
    app, engine, settings=QueryWatchSettings(mode="raise"), registry=metrics_registry
)
