"""Hub access, checked before it is relied on: offline machines get a clear error at once
instead of minutes of retries."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from langmerge.errors import InputError

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline() -> bool:
    """Whether the user told the Hugging Face libraries not to use the network."""
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES
    )


def require_hub(what: str, timeout: float = 3.0) -> None:
    """Raise at once unless the hub can be reached to download `what`."""
    if offline():
        raise InputError(
            f"{what} is not on this machine, and the hub is off ({'/'.join(OFFLINE_VARIABLES)} "
            "is set): give a local path, or download it on a machine with hub access first"
        )
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise InputError(
            f"{what} is not on this machine and the hub ({host}) cannot be reached ({e}): "
            "give a local path, or download it on a machine with hub access first"
        ) from None
