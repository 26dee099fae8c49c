"""The HTTP app: the SageMaker inference container contract (GET /ping, POST /invocations).

Request bodies: ``application/x-image`` (one JPEG/PNG/... image as raw bytes) or
``application/json`` (a JSON list of base64-encoded images, answered in order as a JSON list).
Answers: ``Accept: application/json`` -> ``{"probabilities": [...]}``;
``Accept: application/json;verbose`` -> ``{"probabilities", "labels", "predicted_label"}``.

Memory is bounded whatever the clients send: bodies held at once by a byte budget, decoding by a
pixel budget checked on each image's header before it is decoded, images waiting for the device
by a count; a client's bad request gets a 4xx with a message, never a 5xx.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time.
import asyncio
import base64
import binascii
import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from bakeoff.errors import BakeoffError
from bakeoff.serve.batching import MicroBatcher
from bakeoff.serve.limits import Budget, ServeLimits
from bakeoff.serve.predictor import Predictor, describe

__all__ = ["create_app", "IMAGE_TYPES", "JSON_TYPE", "VERBOSE_ACCEPT"]

IMAGE_TYPES = ("application/x-image", "image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff",
               "image/gif")
JSON_TYPE = "application/json"
VERBOSE_ACCEPT = "application/json;verbose"
MIN_BODY_RATE = 64 * 1024  # bytes/s, on average, that a body must keep up after --body-timeout


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


def _verbose(accept: str | None) -> bool:
    """True for ``application/json;verbose``; plain JSON for JSON, ``*/*`` or no Accept; else 406."""
    accept = "".join((accept or "").split()).lower()
    if not accept:
        return False
    choices = accept.split(",")
    if any(c.startswith(VERBOSE_ACCEPT) for c in choices):
        return True
    if any(c.split(";")[0] in (JSON_TYPE, "application/*", "*/*") for c in choices):
        return False
    raise RequestError(406, f"cannot answer with Accept: {accept}; use {JSON_TYPE} or {VERBOSE_ACCEPT}")


def _decode_json_images(body: bytes, max_images: int) -> list[bytes]:
    try:
        items = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}")
    except RecursionError:  # thousands of nested brackets
        raise RequestError(400, "the body is not a flat JSON list: send a list of base64-encoded images")
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise RequestError(400, "a JSON body must be a non-empty list of base64-encoded images")
    if len(items) > max_images:
        raise RequestError(413, f"{len(items)} images in one request, over the limit of {max_images} "
                                f"(--max-images): send them in several requests")
    images = []
    for n, item in enumerate(items):
        if item.startswith("data:") and "," in item:  # a data URL: keep what follows "base64,"
            item = item.split(",", 1)[1]
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise RequestError(400, f"image {n} of the list is not valid base64: {exc}")
    return images


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def create_app(predictor: Predictor, limits: ServeLimits = ServeLimits(), max_batch: int = 32,
               batch_wait_ms: float = 2.0):
    """The FastAPI app serving ``predictor``; ``app.state.batcher`` is its MicroBatcher."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.requests import ClientDisconnect

    batcher = MicroBatcher(predictor.predict, max_batch, batch_wait_ms)
    labels = list(predictor.classes)
    max_body_bytes, max_pixels = limits.max_body_bytes, limits.max_pixels
    # A JSON body's parsed form and decoded images take about 2.5x its bytes: four bodies of the
    # largest size, or many small ones, are in memory at once; the others wait unread.
    bodies = Budget(4 * max_body_bytes)
    pixels = Budget(max_pixels)  # one image at the limit decodes alone; small ones side by side
    waiting = asyncio.Semaphore(2 * max_batch)  # decoded images not yet through the device
    decoders = ThreadPoolExecutor(_cores(), thread_name_prefix="bakeoff-decode")

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()
        decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title=f"bakeoff: {predictor.model_id}", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.predictor = batcher, predictor

    async def read_body(request: Request) -> bytes:
        loop = asyncio.get_running_loop()
        start, chunks, size = loop.time(), [], 0
        stream = request.stream()
        while True:
            # After the grace, the body must keep coming at MIN_BODY_RATE on average: a client
            # that stalls or trickles is cut off instead of holding its share of the body budget.
            left = start + limits.body_timeout_s + size / MIN_BODY_RATE - loop.time()
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), max(left, 0.0))
            except StopAsyncIteration:
                return b"".join(chunks)
            except asyncio.TimeoutError:
                raise RequestError(408, f"the body came slower than {MIN_BODY_RATE // 1024} KB/s after the first "
                                        f"{limits.body_timeout_s:g} s (--body-timeout)")
            except ClientDisconnect:
                raise RequestError(400, "the client closed the connection before sending the whole body")
            size += len(chunk)
            if size > max_body_bytes:
                raise RequestError(413, f"body is over the limit of {max_body_bytes} bytes (--max-body-mb)")
            chunks.append(chunk)

    def answer(probs, verbose: bool) -> dict:
        p = [float(v) for v in probs]
        if not verbose:
            return {"probabilities": p}
        return {"probabilities": p, "labels": labels, "predicted_label": labels[max(range(len(p)), key=p.__getitem__)]}

    async def classify(data: bytes, n: int | None):
        where = "" if n is None else f"image {n} of the list: "
        loop = asyncio.get_running_loop()
        async with waiting:
            try:  # the header only, before any pixel is decoded
                w, h, cost = await loop.run_in_executor(decoders, predictor.preprocess.decode_cost, data)
                if cost > max_pixels:
                    raise RequestError(413, f"{where}an image of {w}x{h} pixels takes {cost:,} pixels to decode and "
                                            f"resize, over the limit of {max_pixels:,} (--max-pixels)")
                async with pixels.take(cost):
                    x = await loop.run_in_executor(decoders, predictor.preprocess, data)
            except BakeoffError as exc:
                raise RequestError(400, f"{where}{exc}")
            try:
                return await batcher.submit(x)
            except Exception as exc:  # e.g. out of device memory: this request fails, the server stays up
                raise RequestError(500, f"prediction failed: {describe(exc)}")

    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.get("/ping")
    async def ping():
        # pid: which process answered, under --workers
        return {"status": "ok", "model": predictor.model_id, "device": predictor.device, "pid": os.getpid()}

    @app.get("/execution-parameters")
    async def execution_parameters():
        return {"MaxConcurrentTransforms": 1, "BatchStrategy": "MULTI_RECORD",
                "MaxPayloadInMB": max(1, max_body_bytes // 2**20)}

    @app.post("/invocations")
    async def invocations(request: Request):
        ctype = _media_type(request.headers.get("content-type"))
        if ctype not in IMAGE_TYPES and ctype != JSON_TYPE:
            raise RequestError(415, f"unsupported Content-Type {ctype or '(none)'}: send application/x-image "
                                    f"(image bytes) or application/json (a list of base64 images)")
        verbose = _verbose(request.headers.get("accept"))
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise RequestError(413, f"body of {int(declared)} bytes is over the limit of {max_body_bytes} bytes "
                                    f"(--max-body-mb)")
        async with bodies.take(int(declared) if declared.isdigit() else max_body_bytes):
            body = await read_body(request)
            if not body:
                raise RequestError(400, "empty body: send the image bytes")
            if ctype == JSON_TYPE:
                images = _decode_json_images(body, limits.max_images)
                del body
                # Every image finishes before the answer, a refused one too: the body's budget
                # then covers all the work the request started.
                probs = await asyncio.gather(*(classify(b, n) for n, b in enumerate(images)), return_exceptions=True)
                for p in probs:
                    if isinstance(p, BaseException):
                        raise p
                content = [answer(p, verbose) for p in probs]
            else:
                content = answer(await classify(body, None), verbose)
        return Response(json.dumps(content), media_type=JSON_TYPE)

    return app
