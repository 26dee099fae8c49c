"""Checks of command-line values that more than one command takes (``run`` and ``serve``)."""

from __future__ import annotations

import re

import typer

__all__ = ["DEVICE", "device_name"]


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_name(ctx: typer.Context, param: typer.CallbackParam, value: str) -> str:
    if not DEVICE.fullmatch(value):
        raise typer.BadParameter(f"{value!r} is not a device: pass auto, cpu, cuda or cuda:N (N: a GPU index)",
                                 ctx=ctx, param=param)
    return value
