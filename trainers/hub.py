"""The Hugging Face hub, seen from a machine that may have no network: shared by every component that
takes "a hub id or a local directory" (the Stable Diffusion prior, the CLIP evaluator)."""

from __future__ import annotations

import os
import re
import socket
from urllib.parse import urlparse

# One TCP connect decides whether the hub is reachable; see `hub_reachable`.
HUB_PROBE_TIMEOUT_S = 3.0
# "org/name", the form of every model repository on the hub.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_offline() -> bool:
    from huggingface_hub import constants

    # Read the environment too: HF_HUB_OFFLINE may be set after huggingface_hub was imported.
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "true", "yes", "on"}


def hub_reachable() -> bool:
    """One TCP connect to the hub endpoint with a short timeout.

    Written by hand because huggingface_hub retries connection errors with exponential backoff (about
    25 s before it gives up) and offers no setting to turn that off; without a network this answers at
    once and the hub client is then used in cache-only mode. Behind a proxy the direct connect says
    nothing, so the hub client is left to decide.
    """
    from huggingface_hub import constants

    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def download_hint(repo_id: str, then: str) -> str:
    """How to make a local copy of `repo_id` and point the setting at it (`then`, e.g. "set prior.name=DIR")."""
    return (
        f"To use a local copy, run `huggingface-cli download {repo_id} --local-dir DIR` "
        f"(or `hf download {repo_id} --local-dir DIR`) on a machine with access, copy DIR here, and {then}"
    )
