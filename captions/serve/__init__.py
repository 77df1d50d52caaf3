"""``captions serve``: a captioning HTTP service (FastAPI + uvicorn) and its web page.

* ``settings.py``: ``ServeOptions``, the command's settings (no torch, no FastAPI: ``--help`` stays fast);
* ``uploads.py``: reading request bodies and images within the limits, errors as HTTP statuses;
* ``batcher.py``: dynamic batching of concurrent requests for one backbone + decoder pass;
* ``app.py``: the FastAPI application (API, OpenAPI schema, the page at ``/``);
* ``server.py``: ``serve()``, loading the checkpoint and running uvicorn with graceful shutdown;
* ``static/``: the offline web page (HTML, CSS, JavaScript; no CDN assets).
"""
