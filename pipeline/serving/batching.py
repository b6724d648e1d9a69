"""Dynamic micro-batching: concurrent requests share one forward pass.

Requests queue their pixels; one task takes whatever is queued (up to ``max_images``) as soon as
the model is free and runs it in a single inference thread, then hands each request its rows.
Nothing waits for a batch to fill: with one client each request runs alone at once; under load,
the requests that arrived during a forward pass make up the next one. A batch uses one model
snapshot, so its answers all name the version that computed them, even across a swap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pipeline.serving.payload import RequestError, describe
from pipeline.serving.slot import ModelSlot, ServedModel

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    pixels: np.ndarray
    answer: asyncio.Future


class ShapeChanged(RequestError):
    """The version served changed, to one of another input shape, while the request waited."""

    status = 409


def _refuse_other_shapes(batch: list[_Pending], served: ServedModel) -> list[_Pending]:
    """The requests of ``batch`` whose images fit ``served``; the others were decoded for a
    version of another input shape, swapped out since, and get a 409 that says so."""
    fits = []
    for pending in batch:
        if pending.pixels.shape[1:] == served.input_shape:
            fits.append(pending)
        elif not pending.answer.done():
            pending.answer.set_exception(
                ShapeChanged(
                    f"image: expected {describe(served.input_shape)} images for version {served.version}, served "
                    f"since this request arrived, found {describe(pending.pixels.shape[1:])}; resend for it"
                )
            )
    return fits


class MicroBatcher:
    def __init__(self, slot: ModelSlot, max_images: int = 256, on_batch: Callable[[int], None] | None = None) -> None:
        self.slot = slot
        self.max_images = max_images
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: list[_Pending] = []

    def start(self) -> None:
        self._queue = asyncio.Queue()
        # One thread: torch uses every core inside a forward pass; two passes would fight.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._stopped)

    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def _stopped(self, task: asyncio.Task) -> None:
        """The loop ended (stopped, or a bug): nobody may wait for it."""
        waiting = list(self._inflight)
        while self._queue is not None and not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for pending in waiting:
            if not pending.answer.done():
                pending.answer.set_exception(RuntimeError("the inference loop stopped"))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if self._executor:
            self._executor.shutdown(wait=False)

    async def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, ServedModel]:
        """Probabilities for ``pixels`` and the model that computed them."""
        if not self.alive():
            raise RuntimeError("the inference loop stopped")
        answer = asyncio.get_running_loop().create_future()
        assert self._queue is not None
        await self._queue.put(_Pending(pixels, answer))
        return await answer

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0].pixels)
            while size < self.max_images and not self._queue.empty():
                batch.append(self._queue.get_nowait())
                size += len(batch[-1].pixels)
            batch = [p for p in batch if not p.answer.done()]  # clients that gave up cost nothing
            if not batch:
                continue
            self._inflight = batch
            served = self.slot.current
            try:
                if served is None:
                    raise RuntimeError("no model loaded")
                batch = _refuse_other_shapes(batch, served)
                if not batch:
                    continue
                pixels = np.concatenate([p.pixels for p in batch])
                probabilities = await loop.run_in_executor(self._executor, served.predict, pixels)
            except Exception as exc:  # every request of the batch gets the error (a 500)
                for pending in batch:
                    if not pending.answer.done():
                        pending.answer.set_exception(exc)
                continue
            if self._on_batch:
                try:
                    self._on_batch(len(pixels))
                except Exception:  # a metrics hiccup must not stop inference
                    log.exception("recording a batch size failed")
            start = 0
            for pending in batch:
                rows = len(pending.pixels)
                if not pending.answer.done():  # the client may have gone meanwhile
                    pending.answer.set_result((probabilities[start : start + rows], served))
                start += rows
