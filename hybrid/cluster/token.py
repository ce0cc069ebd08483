"""The cluster's shared secret: where it comes from (--token or TOKEN_ENV) and what a usable one is. No torch
and no sockets, so the options and the CLI can check a token before anything loads; rendezvous.py uses it.
"""
from __future__ import annotations

TOKEN_ENV = "KIMI_HYBRID_CLUSTER_TOKEN"
MIN_TOKEN = 8


def check_token(token: str | None) -> bytes:
    if not token:
        raise ValueError(f"a cluster needs a shared secret: pass token= (--token) or set {TOKEN_ENV}, the same on "
                         "the head and every node (e.g. python -c 'import secrets; print(secrets.token_hex(16))')")
    if len(token) < MIN_TOKEN:
        raise ValueError(f"the cluster token must have at least {MIN_TOKEN} characters, got {len(token)}")
    return token.encode("utf-8")
