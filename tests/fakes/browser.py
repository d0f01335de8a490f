"""The real thing for the web app's end-to-end tests: ``ckptlab serve`` started as a user starts it (a subprocess,
``python -m ckptlab serve``), Debian's chromium driven by Playwright, a hostile page on another loopback port, and
the library additions those tests need (files named and described with script payloads, big sparse files whose
hashing runs long enough to watch and cancel). Also used by ``scripts/web_screenshots.py``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic",
                 # no https-first detours for the plain-http names below
                 "--disable-features=HttpsUpgrades,HttpsFirstBalancedModeAutoEnable,HttpsFirstModeV2",
                 # a DNS-rebinding attacker's name that resolves to this machine
                 "--host-resolver-rules=MAP evil.test 127.0.0.1"]

# script payloads as they could arrive in a file name, a safetensors header or a CivitAI sidecar: each tries to
# run script (an alert, or setting window.__xss) or to add an element/attribute the page did not write
XSS_NAMES = [
    '<img src=x onerror=alert(1)>',
    '"><svg onload=alert(2)>',
    "x' hx-on:htmx:load='alert(3)",
]
XSS_TEXT = ('<script>window.__xss=1;alert("meta")</script><img src=x onerror="window.__xss=2">'
            '"><iframe src="javascript:alert(4)"></iframe>')
XSS_PICKLE_GLOBAL = "<img src=x onerror=alert(6)>.system"


def free_port() -> int:
    """A free loopback TCP port (bound once, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_path() -> str | None:
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    return exe if os.path.exists(exe) else None


def launch_browser(playwright):
    """Debian's chromium (Playwright's own browser download is not reachable here)."""
    exe = chromium_path()
    if exe is None:
        raise RuntimeError("chromium is not installed: run `make browser`")
    return playwright.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)


def server_env(home: Path) -> dict[str, str]:
    """The environment of a server subprocess: this checkout's src, an isolated home, no network tokens."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"),
               XDG_CACHE_HOME=str(home / "cache"), CKPTLAB_DB=str(home / "catalog.db"), HF_HUB_OFFLINE="1",
               HF_HOME=str(home / "hf"))
    for name in ("CIVITAI_API_TOKEN", "HF_TOKEN", "CKPTLAB_TOKEN", "http_proxy", "https_proxy", "HTTP_PROXY",
                 "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(name, None)
    return env


@dataclass
class Server:
    """A running ``ckptlab serve`` subprocess (its own process group: its job workers stop with it)."""

    proc: subprocess.Popen
    port: int
    host: str
    log: Path
    token: str | None = None
    url: str = field(init=False)

    def __post_init__(self):
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        else:  # the server is gone; its workers may not be
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def start_server(db: Path, home: Path, *, host: str = "127.0.0.1", token: str | None = None,
                 timeout: float = 60) -> Server:
    """Start ``python -m ckptlab serve --db DB`` on a free port and wait until it answers; the caller stops it
    (``Server.stop``), on every path."""
    port = free_port()
    cmd = [sys.executable, "-m", "ckptlab", "serve", "--db", str(db), "--host", host, "--port", str(port)]
    if token:
        cmd += ["--token", token]
    home.mkdir(parents=True, exist_ok=True)
    log = home / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env(home),
                                start_new_session=True)
    server = Server(proc, port, host, log, token)
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ckptlab serve exited with {proc.returncode}:\n{server.output()}")
            try:
                with urllib.request.urlopen(urllib.request.Request(server.url + "/", headers=headers), timeout=5):
                    return server
            except urllib.error.HTTPError:
                return server  # it answers (the page's own status is the tests' business)
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ckptlab serve did not answer within {timeout} s:\n{server.output()}")
            time.sleep(0.1)
    except BaseException:
        server.stop()
        raise


class ErrorLog:
    """Page errors (uncaught exceptions), console errors (a CSP violation is one) and dialogs of a test's pages.
    ``allow(text)`` accepts console errors containing ``text`` (a refusal the test provokes on purpose)."""

    def __init__(self):
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.allowed: list[str] = []

    def watch(self, page) -> None:
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        def console(msg):
            if msg.type != "error":
                return
            where = (msg.location or {}).get("url", "")
            if where.endswith("/favicon.ico"):
                return  # chromium asks every server for one; a missing icon is no fault of the page
            self.errors.append(f"console {msg.type}: {msg.text} ({where})")

        page.on("console", console)

        def dialog(d):
            self.dialogs.append(f"{d.type}: {d.message}")
            with contextlib.suppress(Exception):
                d.dismiss()

        page.on("dialog", dialog)

    def allow(self, text: str) -> None:
        self.allowed.append(text)

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in self.allowed)]


class _AttackHandler(BaseHTTPRequestHandler):
    pages: dict[str, str] = {}

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.pages.get(self.path.split("?")[0])
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def attacker_site(pages: dict[str, str]):
    """Another origin on loopback (``http://127.0.0.1:OTHER``) serving ``pages`` (path -> html): a site the user
    happens to open while ckptlab serve runs. Yields its base URL."""
    handler = type("Handler", (_AttackHandler,), {"pages": dict(pages)})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def add_xss_files(lib: Path) -> list[Path]:
    """LoRAs whose file names, safetensors metadata (kohya ``ss_*``, ModelSpec) and sidecars (A1111 ``.json``,
    ``.civitai.info``) carry script payloads, and a pickle whose imported global is one."""
    from ckptlab.sample.build import write_model

    folder = lib / "a1111" / "models" / "Lora" / "xss"
    folder.mkdir(parents=True, exist_ok=True)
    md = {"ss_output_name": XSS_TEXT, "ss_tag_frequency": json.dumps({XSS_TEXT: {XSS_NAMES[0]: 3, XSS_TEXT: 1}}),
          "modelspec.title": XSS_TEXT, "modelspec.description": XSS_TEXT, "modelspec.author": XSS_NAMES[1],
          "ss_training_comment": XSS_TEXT}
    out = []
    for i, name in enumerate(XSS_NAMES):
        p = write_model(folder / f"{name}.safetensors", "sd1_kohya_lora", seed=100 + i, metadata=md)
        (folder / f"{name}.json").write_text(json.dumps({
            "description": XSS_TEXT, "activation text": XSS_TEXT, "notes": XSS_NAMES[2],
            "preferred weight": 0.8, "sd version": "SD1"}))
        (folder / f"{name}.civitai.info").write_text(json.dumps({
            "id": 9000 + i, "modelId": 900 + i, "name": XSS_TEXT, "baseModel": "SD 1.5", "description": XSS_TEXT,
            "trainedWords": [XSS_TEXT, XSS_NAMES[0]],
            "model": {"name": XSS_NAMES[i], "type": "LORA", "description": XSS_TEXT, "tags": [XSS_TEXT]},
            "files": [{"name": f"{name}.safetensors", "type": "Model"}],
            "images": [{"url": "javascript:alert(5)", "meta": {"prompt": XSS_TEXT}}]}))
        out.append(p)
    # a legacy torch pickle that imports a global whose module name is a payload: check calls it malicious and
    # the safety page lists it with that finding
    module = XSS_PICKLE_GLOBAL.rsplit(".", 1)[0]
    pk = folder / f"{XSS_NAMES[1]}.pt"
    pk.write_bytes(b"\x80\x02c" + module.encode() + b"\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.")
    out.append(pk)
    return out


def add_sparse(lib: Path, name: str, spec: str) -> Path:
    """A real-size model file with real key names whose data is a hole (nothing big hits the disk, reading it
    takes real time: hashing it is a job that runs for a while)."""
    from ckptlab.sample.build import write_model

    folder = lib / "a1111" / "models" / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    return write_model(folder / f"{name}.safetensors", spec, sparse=True)
