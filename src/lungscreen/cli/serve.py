"""`lungscreen serve`: the web viewer for one run, on this machine unless told otherwise."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer
from rich.console import Console

out = Console(stderr=True, highlight=False)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1 or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    run: Path = typer.Argument(..., help="Run folder (with best.pt), a checkpoint file, or a `lungscreen export` "
                               ".onnx model (no Grad-CAM then): loaded once, at start."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Anything but loopback needs --token."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    token: str | None = typer.Option(None, envvar="LUNGSCREEN_TOKEN", help="Require `Authorization: Bearer TOKEN` "
                                     "on every request but /health (also from $LUNGSCREEN_TOKEN; the page reads "
                                     "it from the address's #token=... part)."),
    max_upload_mb: int = typer.Option(32, min=1, help="Largest image accepted, in MB (larger: 413)."),
) -> None:
    """Serve the viewer: drop a PNG, JPEG or DICOM chest image on the page and see the class probabilities
    against the run's operating point, the Grad-CAM heat-map and the lung contour beside the original
    (boxes and mask too for a MultiCheXNet run). JSON API: POST /predict (form field `file`), GET /model,
    GET /health; documented at /docs. A research tool, not a diagnostic device.

    **Examples**

    ```
    lungscreen serve runs/covid-resnet-cpu      # http://127.0.0.1:8000
    lungscreen serve covid.onnx --port 8080
    ```
    """
    from lungscreen.errors import ConfigError

    if not is_loopback(host) and not token:
        raise ConfigError(f"--host {host}: listening beyond this machine needs --token (anyone who can reach the "
                          "port could otherwise send images to the model)")
    import uvicorn

    from lungscreen.inference.predict import Predictor
    from lungscreen.serve import create_app

    predictor = Predictor(run)
    app = create_app(predictor, token=token, max_upload=max_upload_mb * 1024 * 1024)
    shown = f"[{host}]" if ":" in host else host
    out.print(f"serving {predictor.checkpoint.path} on http://{shown}:{port}/ (Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
