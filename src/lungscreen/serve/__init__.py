"""The web viewer: FastAPI around one loaded run, and a plain page (``static/``) to drop images on."""

from lungscreen.serve.app import create_app

__all__ = ["create_app"]
