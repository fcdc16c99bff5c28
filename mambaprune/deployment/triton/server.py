"""Start and stop a real tritonserver (the binary of the `nvidia-pytriton` wheel) on loopback.

Why the environment below: the wheel ships one python backend stub per Python minor version
(python_backend_stubs/3.X/triton_python_backend_stub). The 3.11 stub is linked against
``libpython3.11.so.1.0`` with no path, so the dynamic loader takes the system's one (Debian's 3.11.2
here), while the interpreter it embeds finds the serving venv through PATH (its pyvenv.cfg) and
imports that venv's standard library (pyenv's 3.11.7). A 3.11.2 runtime under a 3.11.7 stdlib
fails as soon as multiprocessing's resource tracker asks ``_thread.RLock._recursion_count`` (added
in a later 3.11 release). We put the libpython of the running interpreter (sysconfig LIBDIR) first
on LD_LIBRARY_PATH, so the stub runs the very interpreter, stdlib and site-packages of this process.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ...errors import InvalidArgumentError, MissingDependencyError, ServerError

INSTALL_HINT = "pip install 'nvidia-pytriton==0.7.0' 'tritonclient[http]' (the extra mambaprune[serve])"
BENIGN = "CudaDriverHelper has not been initialized"   # logged as an error on every machine without CUDA
BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel keeps the server, its python backend, its libraries and this Python's stub."""
    binary: Path
    python_backend: Path
    libraries: Path
    stub: Path


def find_tritonserver() -> TritonInstall:
    """The tritonserver of the nvidia-pytriton wheel, without importing pytriton (its numpy<2 pin is
    not needed by the server): MissingDependencyError naming the install command when absent."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"serving needs NVIDIA Triton Inference Server: {INSTALL_HINT}")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(root / "bin" / "tritonserver", root / "backends" / "python",
                            root.parents[1] / "nvidia_pytriton.libs",
                            root / "python_backend_stubs" / version / "triton_python_backend_stub")
    for path in (install.binary, install.python_backend, install.libraries):
        if not path.exists():
            raise MissingDependencyError(f"the nvidia-pytriton install has no {path}: reinstall it ({INSTALL_HINT})")
    if not install.stub.exists():
        raise MissingDependencyError(f"nvidia-pytriton has no python backend stub for Python {version} "
                                     f"({install.stub}): serve from a Python it ships a stub for")
    return install


def shared_libpython_dir() -> Path:
    """The folder of this interpreter's libpython (the stub must load this one, see the module doc)."""
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not library or not (Path(libdir) / library).exists():
        raise ServerError(f"this Python ({sys.executable}) has no shared libpython ({libdir}/{library}); the "
                               "Triton python backend stub loads one: use a Python built with --enable-shared")
    return Path(libdir)


def backend_directory(install: TritonInstall, folder: Path) -> Path:
    """folder/python/ holding the python backend and the stub of this Python (links into the wheel)."""
    python = folder / "python"
    python.mkdir(parents=True)
    for name in BACKEND_FILES:
        (python / name).symlink_to(install.python_backend / name)
    (python / "triton_python_backend_stub").symlink_to(install.stub)   # its RPATH ($ORIGIN) stays the wheel's
    return folder


def server_environment(install: TritonInstall) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONHOME", None)
    libraries = [str(shared_libpython_dir()), str(install.libraries)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TritonServer:
    """A running tritonserver: `.url` (HTTP/REST, KServe v2), `.metrics_url`, `.stop()`; a context manager."""

    def __init__(self, process: subprocess.Popen, host: str, http_port: int, metrics_port: int | None,
                 model_name: str, log_path: Path, workdir: Path | None):
        self.process, self.host, self.http_port, self.metrics_port = process, host, http_port, metrics_port
        self.model_name, self.log_path, self._workdir = model_name, log_path, workdir
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.http_port}"

    @property
    def metrics_url(self) -> str | None:
        return None if self.metrics_port is None else f"http://{_url_host(self.host)}:{self.metrics_port}/metrics"

    def ready(self) -> bool:
        return self.process.poll() is None and _http_status(f"{self.url}/v2/health/ready") == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (tritonserver unloads its models and exits), then SIGKILL of its process group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        atexit.unregister(self.stop)

    def wait(self, duration: float | None = None) -> None:
        """Block until `duration` seconds pass (None: forever), Ctrl-C or SIGTERM (in the main thread);
        ServerError if the server exits meanwhile."""
        stopped = []
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, lambda *_: stopped.append(True)) if main else None
        deadline = None if duration is None else time.monotonic() + duration
        try:
            while not stopped and self.process.poll() is None and (deadline is None or time.monotonic() < deadline):
                time.sleep(0.2)
        except KeyboardInterrupt:
            return
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
        if self.process.poll() is not None:
            raise ServerError(f"tritonserver exited with status {self.process.returncode}; its errors and last "
                              f"lines:\n{log_summary(self.log())}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        state = "running" if self.process.poll() is None else f"exited ({self.process.returncode})"
        return f"TritonServer({self.model_name!r} at {self.url}, {state})"


def start_tritonserver(repository, model_name: str, host: str = "127.0.0.1", http_port: int = 8000,
                       metrics_port: int | None = 8002, timeout: float = 180.0, log_verbose: int = 0,
                       workdir: Path | None = None, owns_workdir: bool = False) -> TritonServer:
    """Run tritonserver on `repository` (HTTP on host:http_port, no gRPC; metrics on metrics_port or
    none) and wait until /v2/health/ready; ServerError with the log's tail if it does not come up.
    The server has a session of its own (a terminal's Ctrl-C reaches this process, which stops it) and
    gets SIGTERM when the thread that started it ends (Linux PR_SET_PDEATHSIG), so a killed client
    leaves no server behind: start it from a thread that outlives it (the main thread). Port 0 picks a
    free port. `workdir` holds the backend folder and the log: a new temporary folder
    when None; stop() removes it when it is that one or `owns_workdir`."""
    install = find_tritonserver()
    _check_port("http_port", http_port)
    if metrics_port is not None:
        _check_port("metrics_port", metrics_port)
    http_port = http_port or free_port(host)
    metrics_port = None if metrics_port is None else (metrics_port or free_port(host))
    own = workdir is None or owns_workdir
    workdir = Path(tempfile.mkdtemp(prefix="mambaprune_triton_")) if workdir is None else Path(workdir)
    backends = backend_directory(install, workdir / "backends")
    log_path = workdir / "tritonserver.log"
    command = [str(install.binary), f"--model-repository={Path(repository).resolve()}",
               f"--backend-directory={backends}", "--model-control-mode=none", "--strict-readiness=true",
               "--allow-http=true", f"--http-address={host}", f"--http-port={http_port}", "--allow-grpc=false",
               f"--allow-metrics={'false' if metrics_port is None else 'true'}", "--allow-gpu-metrics=false",
               "--exit-timeout-secs=10", f"--log-verbose={log_verbose}",
               "--backend-config=python,stub-timeout-seconds=120"]
    if metrics_port is not None:
        command += [f"--metrics-address={host}", f"--metrics-port={metrics_port}"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=server_environment(install), start_new_session=True,
                                   preexec_fn=_terminate_with_parent())
    server = TritonServer(process, host, http_port, metrics_port, model_name, log_path, workdir if own else None)
    deadline = time.monotonic() + timeout
    while not server.ready():
        if process.poll() is not None or time.monotonic() > deadline:
            why = (f"exited with status {process.returncode}" if process.poll() is not None
                   else f"was not ready after {timeout:.0f} s")
            summary = log_summary(server.log())
            server.stop()
            raise ServerError(f"tritonserver {why} (model {model_name!r}, {server.url}); its errors and last lines:\n"
                              f"{summary}")
        time.sleep(0.25)
    return server


def log_summary(log: str, errors: int = 8, last: int = 5) -> str:
    """A server log's error lines (glog 'E' lines, models UNAVAILABLE; 500 characters each) and last lines."""
    lines = log.splitlines()
    wrong = [line[:500] for line in lines if (line.startswith("E") and BENIGN not in line) or "UNAVAILABLE" in line]
    wrong = wrong[:errors]
    return "\n".join(wrong + ["..."] + lines[-last:]) if wrong else "\n".join(lines[-last:])


def _terminate_with_parent():
    """A preexec_fn asking Linux to SIGTERM the child when its parent thread ends (None elsewhere);
    the libc function is looked up before the fork."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, set_death_signal, sigterm = ctypes.CDLL(None, use_errno=True).prctl, 1, int(signal.SIGTERM)
    return lambda: prctl(set_death_signal, sigterm)


def _check_port(label: str, port) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgumentError(f"{label} must be an int in [0, 65535] (0: a free port); got {port!r}")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None
