"""The endpoint's interface description: the response models, the ``POST /predict`` request body
(JSON or PNG, from :mod:`pipeline.serving.payload`), and the bearer scheme on every operation
that needs the token."""

# No `from __future__ import annotations`, as in pipeline.serving.app: the models are read by
# FastAPI and pydantic at runtime.
from typing import Any

from pydantic import BaseModel, Field

from pipeline.serving.payload import png_schema, request_schema

OPEN_DOCS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
"""The interface description (no data, no model): open, so that clients can read it."""


class Problem(BaseModel):
    detail: str = Field(description="What was expected and what came.")


class Prediction(BaseModel):
    class_id: int
    class_name: str
    probabilities: list[float] = Field(description="One per class, in class-id order; they sum to 1.")


class PredictResponse(BaseModel):
    model_version: str = Field(description="The registered version that computed these predictions.")
    predictions: list[Prediction]


PREDICT_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": request_schema()},
        "image/png": {"schema": png_schema()},
    },
}


def secure_openapi(app: Any, open_paths: frozenset[str]) -> None:
    """Declare the bearer scheme, and 401, on every operation that needs the token."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                if path in open_paths:
                    continue
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
                    operation["responses"]["401"] = {
                        "description": "No bearer token, or a wrong one",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
                    }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
