"""A llama.cpp server that the run starts and stops: any GGUF model as an OpenAI-compatible judge, offline.

Started at first use, its log in the run directory, stopped with the judge or this process; how and why:
docs/judges.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cyclealign_pl.judges.base import JudgeUnavailable
from cyclealign_pl.local_models import resolve_gguf

log = logging.getLogger(__name__)

LOG_FILE = "judge_server.log"


@dataclass
class LlamaCppServer:
    """How to run llama-cpp-python's OpenAI-compatible server for a judge (docs/judges.md).

    Args:
        gguf: ``local:<name>`` (a GGUF that a registry package ships, e.g. ``local:smollm2-135m-instruct``)
            or the path of a ``.gguf`` file.
        n_ctx: the context size in tokens (prompt + reply); a longer request is refused by the server.
        n_threads: CPU threads for generation (None: llama.cpp's default, half the cores).
        n_batch: tokens per prompt-processing batch.
        chat_format: llama-cpp-python's chat format (None: the template stored in the GGUF).
        port: the port on 127.0.0.1 (0: a free one).
        startup_timeout: seconds to wait for the server to answer before giving up.
        extra_args: more ``python -m llama_cpp.server`` arguments, e.g. ``["--n_gpu_layers", "-1"]``.

    It answers one request at a time (llama-cpp-python serialises requests), so the judge sends one at a time.
    """

    gguf: str = "local:smollm2-135m-instruct"
    n_ctx: int = 4096
    n_threads: int | None = None
    n_batch: int = 512
    chat_format: str | None = None
    port: int = 0
    startup_timeout: float = 120.0
    extra_args: list[str] = field(default_factory=list)

    parallel = 1  # requests it serves at once

    def __post_init__(self) -> None:
        for name in ("n_ctx", "n_batch", "startup_timeout"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ValueError(f"LlamaCppServer: {name} must be > 0, got {getattr(self, name)!r}")
        if self.n_threads is not None and (not isinstance(self.n_threads, int) or self.n_threads <= 0):
            raise ValueError(f"LlamaCppServer: n_threads must be > 0 or null, got {self.n_threads!r}")
        if not isinstance(self.port, int) or not 0 <= self.port < 65536:
            raise ValueError(f"LlamaCppServer: port must be in 0..65535, got {self.port!r}")
        self.path = resolve_gguf(self.gguf)  # LocalModelError (a ValueError, one line) at config time
        self._process: subprocess.Popen[bytes] | None = None
        self._pid = 0  # the process that started it: a forked or unpickled copy starts its own
        self._url: str | None = None
        self._log_path: Path | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def model(self) -> str:
        """The model name the server answers to (the GGUF file's name without ``.gguf``)."""
        return self.path.stem

    @property
    def url(self) -> str | None:
        """The base URL (``http://127.0.0.1:PORT/v1``) while it runs in this process, else None."""
        return self._url if self.running else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._pid == os.getpid() and self._process.poll() is None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def command(self, port: int) -> list[str]:
        """The command line that starts the server on 127.0.0.1:``port``."""
        args = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.path)]
        args += ["--model_alias", self.model, "--host", "127.0.0.1", "--port", str(port)]
        args += ["--n_ctx", str(self.n_ctx), "--n_batch", str(self.n_batch)]
        if self.n_threads is not None:
            args += ["--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads)]
        if self.chat_format is not None:
            args += ["--chat_format", self.chat_format]
        return args + [str(a) for a in self.extra_args]

    def start(self, log_dir: str | os.PathLike[str] | None = None) -> str:
        """Start the server (if this process has none running) and return its base URL once it answers."""
        if self.running:
            assert self._url is not None
            return self._url
        if importlib.util.find_spec("llama_cpp") is None:
            raise JudgeUnavailable(
                "LlamaCppServer: llama-cpp-python is not installed: pip install -e '.[local]' "
                "(docs/real_models.md)"
            )
        directory = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="cyclealign-"))
        directory.mkdir(parents=True, exist_ok=True)
        self._log_path = directory / LOG_FILE
        port = self.port or _free_port()
        with open(self._log_path, "ab") as out:
            out.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.command(port))}\n".encode())
            out.flush()
            self._process = subprocess.Popen(
                self.command(port),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the run, which then stops the server
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        self._pid = os.getpid()
        self._finalizer = weakref.finalize(self, _terminate, self._process)  # also at interpreter exit
        url = f"http://127.0.0.1:{port}/v1"
        log.info("LlamaCppServer: starting %s at %s (log: %s)", self.path.name, url, self._log_path)
        self._wait_until_ready(url)
        self._url = url
        return url

    def stop(self) -> None:
        """Stop the server this process started (SIGTERM, then SIGKILL after 10 s)."""
        process, self._process, self._url = self._process, None, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if process is not None and self._pid == os.getpid():
            _terminate(process)

    def _wait_until_ready(self, url: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        assert self._process is not None
        while True:
            status = self._process.poll()
            if status is not None:
                self._process = None
                raise JudgeUnavailable(
                    f"LlamaCppServer: the llama.cpp server for {self.path.name} exited with status {status} "
                    f"before answering: {_last_line(self._log_path)} (log: {self._log_path})"
                )
            if _answers(url):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise JudgeUnavailable(
                    f"LlamaCppServer: the llama.cpp server for {self.path.name} did not answer within "
                    f"{self.startup_timeout:g} s (startup_timeout); last log line: "
                    f"{_last_line(self._log_path)} (log: {self._log_path})"
                )
            time.sleep(0.25)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_process=None, _url=None, _finalizer=None, _pid=0)
        return state

    def __repr__(self) -> str:
        return (
            f"LlamaCppServer(gguf={self.gguf!r}, n_ctx={self.n_ctx}, n_threads={self.n_threads}, "
            f"n_batch={self.n_batch}, chat_format={self.chat_format!r}, port={self.port})"
        )


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=2.0) as response:
            return response.status == 200 and "data" in json.loads(response.read() or b"{}")
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _last_line(path: Path | None) -> str:
    if path is None or not path.is_file():
        return "no log"
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "the log is empty"


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server is killed when the process that started it dies, even by SIGKILL (a graceful
    SIGTERM would let it finish the request in hand, minutes on a busy CPU, with nobody to read it)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


__all__ = ["LOG_FILE", "LlamaCppServer"]
