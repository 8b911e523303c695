"""Starting a local tritonserver on a model repository, on loopback only, for tests and benchmarks.

The binary is found as: the explicit path, $CM_DEPLOY_TRITONSERVER (the binary, or a folder holding
bin/tritonserver), then what scripts/fetch_tritonserver.sh unpacks under build/tritonserver (the
server of the nvidia-pytriton wheel, with the python backend), then `tritonserver` on PATH (the
NGC container's /opt/tritonserver/bin).

    with TritonServer("repo") as srv:         # 127.0.0.1, free ports, stopped on exit
        srv.http_url, srv.grpc_url, srv.metrics_url
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UserError

ENV = "CM_DEPLOY_TRITONSERVER"
_REPO_ROOT = Path(__file__).resolve().parents[2]
WHEEL_ROOT = _REPO_ROOT / "build" / "tritonserver"      # scripts/fetch_tritonserver.sh unpacks here


def _binary_in(root: Path) -> Path | None:
    for cand in (root, root / "bin" / "tritonserver", root / "pytriton" / "tritonserver" / "bin" / "tritonserver"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def find_tritonserver(explicit=None) -> Path | None:
    """The tritonserver binary, or None."""
    for root in (explicit, os.environ.get(ENV), WHEEL_ROOT):
        if root:
            found = _binary_in(Path(root))
            if found:
                return found
            if root in (explicit, os.environ.get(ENV)):
                raise UserError(f"no executable tritonserver at {root}")
    on_path = shutil.which("tritonserver")
    return Path(on_path) if on_path else None


def server_layout(binary: Path) -> dict:
    """Backends folder and library path of a server: the wheel's layout (pytriton/tritonserver/bin/
    tritonserver, nvidia_pytriton.libs/ beside pytriton/) or the container's (/opt/tritonserver)."""
    root = binary.parent.parent
    libs = [p for p in (root.parent.parent / "nvidia_pytriton.libs", root / "lib") if p.is_dir()]
    python = root.parent.parent / "python"
    return {"root": root, "backends": root / "backends", "libs": libs, "python": python if python.is_dir() else None}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_paths(layout: dict) -> list[str]:
    """Import folders for the python backend's interpreter ($CM_DEPLOY_PYTHONPATH): cm_deploy's own
    folder, the server's package folder where scripts/fetch_tritonserver.sh made one (numpy < 2, which
    the wheel's python backend stub was built for, and onnxruntime), then this interpreter's
    site-packages (same Python minor version) for whatever that folder lacks."""
    import cm_deploy
    pkg_root = str(Path(cm_deploy.__file__).resolve().parents[1])
    own = [str(layout["python"])] if layout["python"] is not None else []
    return [pkg_root, *own] + [p for p in sys.path if p and p.endswith(("site-packages", "dist-packages"))]


class TritonServer:
    """A tritonserver process on `repository`, listening on 127.0.0.1 only (HTTP, gRPC and metrics on
    free ports), its log in `log_path`. start() waits until the server is ready (every model loaded)
    or raises with the log's last lines; stop() (also on exit of the with-block) ends it."""

    def __init__(self, repository, binary=None, *, extra_args=(), env=None, log_path=None, ready_timeout=120.0):
        self.repository = Path(repository)
        self.binary = find_tritonserver(binary)
        if self.binary is None:
            raise UserError("no tritonserver found: run scripts/fetch_tritonserver.sh, or set "
                            f"${ENV} to a tritonserver binary")
        self.layout = server_layout(self.binary)
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.proc = None

    def command(self) -> list[str]:
        return [str(self.binary), f"--model-repository={self.repository}",
                f"--backend-directory={self.layout['backends']}",
                "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                "--allow-sagemaker=false", "--allow-vertex-ai=false", "--exit-timeout-secs=5",
                *self.extra_args]

    def start(self):
        env = dict(os.environ)
        libs = [str(p) for p in self.layout["libs"]]
        if libs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
        env.setdefault("CM_DEPLOY_PYTHONPATH", os.pathsep.join(python_paths(self.layout)))
        env.update(self.env)
        for attempt in range(3):          # a free port may be taken between the probe and the bind
            self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
            try:
                self._wait_ready()
                return self
            except UserError:
                log_text = self.log()
                self.stop()
                if "address already in use" not in log_text.lower() or attempt == 2:
                    raise
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"tritonserver exited with status {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise UserError(f"tritonserver not ready after {self.ready_timeout:.0f} s: {self.tail()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n=8) -> str:
        lines = [ln for ln in self.log().splitlines() if ln.strip()]
        return " | ".join(lines[-n:])

    @property
    def http_url(self):
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self):
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self):
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def stop(self, timeout=15.0):
        """SIGINT (the server drains and unloads its models), then SIGKILL of its process group."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
