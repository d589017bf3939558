"""Torch reference for top-k selection over index-score rows (core's ``select_topk_reference``)."""

from __future__ import annotations

from dsv.core.attention import select_topk_reference

__all__ = ["select_topk_reference"]
