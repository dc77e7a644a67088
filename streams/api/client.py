"""The client side of the worker's local API: the CLI finds a running worker through
``DIR/api.json`` (pid, port, token; mode 0600), which the worker's ``streams.api.server.ApiServer``
writes while it serves."""

from __future__ import annotations

import datetime as dt
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

API_FILE = "api.json"
HOST = "127.0.0.1"
CLIENT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class ApiInfo:
    pid: int
    port: int
    token: str


class ApiError(Exception):
    """The worker's API answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def write_api_file(directory: Path, info: ApiInfo) -> None:
    """Atomically (temp file + rename), readable by the owner only: it holds the token."""
    tmp = directory / f".{API_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(orjson.dumps({"pid": info.pid, "port": info.port, "token": info.token}))
    os.replace(tmp, directory / API_FILE)


def read_api_file(directory: Path) -> ApiInfo | None:
    try:
        raw = orjson.loads((directory / API_FILE).read_bytes())
        return ApiInfo(int(raw["pid"]), int(raw["port"]), str(raw["token"]))
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ApiError(f"{directory / API_FILE} is unreadable: {exc}") from None


class ApiClient:
    def __init__(self, info: ApiInfo, timeout_s: float = CLIENT_TIMEOUT_S) -> None:
        self.info = info
        self.url = f"http://{HOST}:{info.port}"
        self.timeout_s = timeout_s
        # no proxies: the worker is on loopback whatever http_proxy says
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def query(self, name: str, **params: Any) -> Any:
        """Run a named query in the worker; datetimes come back as (UTC) datetimes."""
        given = {k: str(v) for k, v in params.items() if v is not None}
        path = f"/v1/query/{urllib.parse.quote(name)}?{urllib.parse.urlencode(given)}"
        answer = self._request("GET", path)
        result = answer["result"]
        for row in result if isinstance(result, list) else ():
            for key in answer["datetime_fields"]:
                if isinstance(row.get(key), str):
                    row[key] = dt.datetime.fromisoformat(row[key])
        return result

    def command(self, name: str, **args: Any) -> dict[str, Any]:
        state: dict[str, Any] = self._request(
            "POST", "/v1/commands", {"command": name, "args": args}
        )
        return state

    def command_state(self, command_id: str) -> dict[str, Any]:
        state: dict[str, Any] = self._request("GET", f"/v1/commands/{command_id}")
        return state

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else orjson.dumps(body),
            method=method,
            headers={
                "Authorization": f"Bearer {self.info.token}",
                "Content-Type": "application/json",
            },
        )
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = orjson.loads(exc.read())["error"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                message = f"HTTP {exc.code} {exc.reason}"
            raise ApiError(f"worker pid {self.info.pid}: {message}", exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(f"worker pid {self.info.pid} at {self.url}: {reason}") from None


def connect_api(directory: Path, owner_pid: int | None) -> ApiClient | None:
    """A client for the API of the process that owns the store in ``directory``, or None if
    it published none (no API, still starting, or a stale file left by a killed worker)."""
    info = read_api_file(directory)
    if info is None or (owner_pid is not None and info.pid != owner_pid):
        return None
    return ApiClient(info)
