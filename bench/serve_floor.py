"""The serving floor: the same server stack as ``pipeline serve``, with no model.

One route, ``POST /predict``: read the body, decode it exactly as ``pipeline serve`` does
(:func:`pipeline.serving.bodies.decode_body`: JSON, an image file, ``.npy`` or raw bytes, every
check included) and answer a constant prediction of the same size as a real one. It runs on the
same uvicorn configuration (:func:`pipeline.serving.server.server_config`: h11 with the guarded
protocol, the same limits and timeouts, the same settling of the process), so what separates it
from ``pipeline serve`` is the model, the micro-batcher and the middleware: the distance
``bench/serve_bench.py`` measures.

    .venv/bin/python bench/serve_floor.py --port 8100 [--workers 2]
"""

# No `from __future__ import annotations`: FastAPI reads the route's annotations at runtime.
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPE = (1, 28, 28)
ANSWER = (
    b'{"model_version":"1","predictions":[{"class_id":0,"class_name":"T-shirt/top","probabilities":['
    + b",".join([b"0.1000000014901161"] * 10)
    + b"]}]}"
)


def create_floor_app():
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    from pipeline.serving.arrays import SHAPE_HEADER
    from pipeline.serving.bodies import decode_body
    from pipeline.serving.payload import RequestError

    app = FastAPI(title="floor")

    @app.get("/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        try:
            decode_body(kind, await request.body(), SHAPE, request.headers.get(SHAPE_HEADER))
        except RequestError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        return Response(ANSWER, media_type="application/json")

    return app


def run_floor(port: int, sockets: list | None = None) -> None:
    """One floor server process (on a supervisor's ``sockets``, or binding the port itself)."""
    import uvicorn

    from pipeline.config import ServingSettings
    from pipeline.serving.server import server_config, settle_process

    settle_process()
    uvicorn.Server(server_config(create_floor_app(), ServingSettings(), port=port)).run(sockets=sockets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="processes on the port, as `pipeline serve --workers`")
    args = parser.parse_args()
    if args.workers > 1:
        from pipeline.serving.workers import run_workers

        run_workers(args.workers, "127.0.0.1", args.port, run_floor, (args.port,))
    else:
        run_floor(args.port)


if __name__ == "__main__":
    main()
