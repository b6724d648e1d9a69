"""The endpoint's interface description: the response models, the ``POST /predict`` request body
(JSON or an image, from :mod:`pipeline.serving.payload`, for the served version's input shape),
and the bearer scheme on every operation that needs the token."""

# No `from __future__ import annotations`, as in pipeline.serving.app: the models are read by
# FastAPI and pydantic at runtime.
from typing import Any

from pydantic import BaseModel, Field

from pipeline.serving.arrays import ARRAY_TYPES, array_schema
from pipeline.serving.bodies import MEDIA_TYPES
from pipeline.serving.payload import IMAGE_TYPES, InputShape, image_schema, request_schema

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


def predict_body(shape: InputShape | None) -> dict[str, Any]:
    """The ``/predict`` request body for a served version of input ``shape``; before a version
    is loaded (``None``), only the media types (the shape is then in ``/metadata``)."""
    if shape is None:
        unknown = {"description": "Images of the served version's input_shape (see /metadata); no model loaded yet."}
        return {"required": True, "content": {kind: {"schema": unknown} for kind in MEDIA_TYPES}}
    return {
        "required": True,
        "content": {
            "application/json": {"schema": request_schema(shape)},
            **{kind: {"schema": image_schema(kind, shape)} for kind in IMAGE_TYPES},
            **{kind: {"schema": array_schema(kind, shape)} for kind in ARRAY_TYPES},
        },
    }


def describe_api(app: Any, open_paths: frozenset[str] | None, shape_of: Any) -> None:
    """Serve the OpenAPI document with ``/predict``'s body for the shape ``shape_of()`` returns
    (the version being served, which a promotion may change) and, with ``open_paths``, the bearer
    scheme and 401 on every operation outside them."""
    build = app.openapi
    documents: dict[Any, dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        shape = shape_of()
        if shape not in documents:
            app.openapi_schema = None  # FastAPI caches the one it built
            schema = build()
            schema["paths"]["/predict"]["post"]["requestBody"] = predict_body(shape)
            if open_paths is not None:
                secure(schema, open_paths)
            documents[shape] = schema
        app.openapi_schema = documents[shape]
        return app.openapi_schema

    app.openapi = openapi


def secure(schema: dict[str, Any], open_paths: frozenset[str]) -> None:
    """Declare the bearer scheme, and 401, on every operation that needs the token."""
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
