"""A mistake made at the UI (no image uploaded, an empty prompt, a bad number): one sentence in the browser, one
log line on the server's terminal, as the APIs' 4xx — not gradio's traceback for every ordinary error."""

from __future__ import annotations

import logging

import gradio as gr

logger = logging.getLogger("ldm_app.serve")


def user_error(message: str) -> gr.Error:
    """The error to raise from a UI handler for `message`, logged as one line."""
    logger.warning("UI: %s", message[:200])
    return gr.Error(message, print_exception=False)
