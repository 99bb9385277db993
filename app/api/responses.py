"""Answers shared by several routes."""

from __future__ import annotations

from fastapi import Response


def thumbnail_response(data: bytes, filename: str) -> Response:
    """A small JPEG of a user's image. ``filename`` is built from row ids, never a user's name: <img> still
    shows the image, a direct visit saves it rather than rendering it as a page of ours."""
    return Response(
        data,
        media_type="image/jpeg",
        headers={
            "Cache-Control": "private, max-age=86400",
            "X-Content-Type-Options": "nosniff",
            "Content-Disposition": f'attachment; filename="{filename}"',
        },
    )
