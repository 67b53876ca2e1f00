"""The web dashboard at /dashboard: plain HTML, CSS and JavaScript served by the API itself
(nothing from a CDN). The page needs no API key to load; it asks for one, keeps it in the
browser's localStorage and sends it as ``Authorization: Bearer`` on its /v1 calls."""

from .routes import install

__all__ = ["install"]
