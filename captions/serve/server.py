"""``serve()``: load a checkpoint once and run the service under uvicorn until SIGTERM or Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import time

from captions.serve.settings import ServeOptions

log = logging.getLogger("captions")

GRACE_S = 30  # on SIGTERM, requests in flight get this long to be answered before they are cut


def serve(checkpoint: str | os.PathLike, options: ServeOptions, weights: str | os.PathLike | None = None,
          root_path: str = "") -> None:
    """Rebuild ``checkpoint``'s backbone and decoder (as ``captions caption`` does), then serve the
    API and page on ``options.host``:``options.port`` until SIGTERM / SIGINT.

    The port opens only once the model is loaded. On SIGTERM the server stops accepting
    connections, answers the requests in flight (at most ``GRACE_S`` seconds), stops the batcher
    and returns. Raises ``CaptionsError`` when the checkpoint cannot be loaded.
    """
    import uvicorn

    from captions.captioner import Captioner
    from captions.serve.app import create_app

    # images are opened by captions.pipeline.resize.open_image (PIL's fixed limit off) and decoded by
    # load_rgb once their header passed --max-pixels (check_shape)
    t0 = time.perf_counter()
    captioner = Captioner.from_checkpoint(checkpoint, device=options.device, weights=weights)
    app = create_app(captioner, options, checkpoint=str(checkpoint))
    log.info("loaded %s (%s on %s) in %.1f s; serving on http://%s:%d%s", checkpoint,
             captioner.decoder.checkpoint.get("model"), captioner.device, time.perf_counter() - t0, options.host,
             options.port, root_path)
    config = uvicorn.Config(app, host=options.host, port=options.port, root_path=root_path, log_level="info",
                            timeout_graceful_shutdown=GRACE_S, proxy_headers=True, server_header=False,
                            lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal that stopped it once it is done; handlers that ignore it make that
    # a normal return (exit status 0) instead of a death by SIGTERM or a KeyboardInterrupt traceback
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind the address (it logged why)
        if e.code not in (0, None):
            from captions.errors import CaptionsError

            raise CaptionsError(f"could not serve on {options.host}:{options.port} (see the message above)") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
