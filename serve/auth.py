"""Who may do what: clients (the API key) use the models and read /stats and /metrics; administrators (the admin
keys, each with a name) also change the rollout through /admin/*. A client key answers 403 there.

- No keys at all: everything is open, which `resolve_config` allows on a loopback host only (or with the
  explicitly insecure `insecure_no_auth`).
- Client keys but no admin key: /admin/* is off (403 that says so), since no one could be told apart from a
  client.
- Every key is compared in constant time (hmac.compare_digest), every one of them, so timing tells nothing.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Mapping, Optional

from distill.config import ConfigError
from serve.protocol import ApiError

OPEN = "nobody (no keys configured)"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, api_key: Optional[str], insecure_no_auth: bool) -> None:
    """Refuse to serve the models to the network without a key, unless told so in words that say it is insecure."""
    if api_key or insecure_no_auth or is_loopback(host):
        return
    raise ConfigError(
        f"refusing to serve on {host} without an API key: anyone who can reach it could use the engines and "
        f"change the rollout. Set api_key (or $DISTILL_API_KEY) for the clients and admin_keys (or "
        f"$DISTILL_ADMIN_KEY) for /admin/*; or listen on 127.0.0.1; or, knowing it is insecure, pass "
        f"--insecure-no-auth (insecure_no_auth: true)")


class Keys:
    def __init__(self, api_key: Optional[str], admin_keys: Mapping[str, str]):
        self.api_key = api_key
        self.admin_keys = dict(admin_keys)

    @property
    def open(self) -> bool:
        return not self.api_key and not self.admin_keys

    @staticmethod
    def _token(headers: Mapping[str, str]) -> Optional[str]:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def _match(self, token: Optional[str]) -> tuple[Optional[str], bool]:
        """(the admin key's name, whether it is the client key) of a token; every key is compared."""
        if token is None:
            return None, False
        given = token.encode()
        admin = None
        for name, key in self.admin_keys.items():
            if hmac.compare_digest(given, key.encode()):
                admin = name
        client = bool(self.api_key) and hmac.compare_digest(given, self.api_key.encode())
        return admin, client

    def client(self, headers: Mapping[str, str]) -> str:
        """Who makes a client request (the models, /stats, /metrics): an admin key is welcome there too."""
        if self.open:
            return OPEN
        admin, client = self._match(self._token(headers))
        if admin is not None:
            return f"admin key {admin!r}"
        if client:
            return "client key"
        if not self.api_key:
            return "client (no client key configured)"  # only admin keys: the API itself is open
        raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")

    def admin(self, headers: Mapping[str, str]) -> str:
        """Who makes an /admin/* request, as the event log records it."""
        if self.open:
            return OPEN
        if not self.admin_keys:
            raise ApiError(403, "administration is off: no admin key is configured (admin_keys, or "
                                "$DISTILL_ADMIN_KEY), and a client key cannot administer")
        admin, client = self._match(self._token(headers))
        if admin is not None:
            return f"admin key {admin!r}"
        if client:
            raise ApiError(403, "this is a client key: /admin/* needs an admin key (admin_keys, or "
                                "$DISTILL_ADMIN_KEY)")
        raise ApiError(401, "missing or invalid admin key: send 'Authorization: Bearer <admin key>'")
