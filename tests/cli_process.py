"""`python -m attn_fast.tools.cli ARGS` in a process of its own, without paying for the imports each time.

A fresh interpreter spends ~3 s (5 s on a busy 2-core machine) importing torch and the examples before the CLI
looks at its first argument, so the tests that run many short commands (user errors refused before any work,
translations of a tiny checkpoint) spent most of their time importing. Here one server process imports the CLI's
modules once, and every command runs in a fork of it: its own process, with its own environment, working
directory, stdin (/dev/null), stdout and stderr (files, read back as bytes), exit status and exceptions, running
`attn_fast.tools.cli` as `__main__` through the same runpy call as `python -m` (`runpy._run_module_as_main`), in
a fresh `__main__` module. What the imports themselves print (warnings, at import time) is captured once and
prepended to every command's stdout and stderr, as a fresh interpreter would print it each time.

Only environment variables read while a command runs can differ between commands (ATTN_FAST_DEBUG, ...); those read
at interpreter start-up or import time (OMP_NUM_THREADS, PYTHONIOENCODING, PYTHONPATH) are the server's, set in
`server_environment`. tests/tools/test_cli_errors.py checks that a command run here and the same command in a
plain `python -m attn_fast.tools.cli` subprocess give the same exit status, stdout and stderr; every test that
needs a real process (the console script, signals, torchrun, locks held by another process) still starts one.

Run as a script, this file is the server (one JSON request a line on stdin, one JSON answer a line on stdout).
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import pathlib
import select
import signal
import subprocess
import sys
import time

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
CLI_MODULE = "attn_fast.tools.cli"


def _encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


# ----------------------------------------------------------------------------------------------------------------
# The server (this file run as a script)
# ----------------------------------------------------------------------------------------------------------------

def _redirect(fd: int, path: str, flags: int) -> None:
    opened = os.open(path, flags, 0o600)
    os.dup2(opened, fd)
    os.close(opened)


def _import_the_cli(scratch: pathlib.Path) -> tuple[bytes, bytes]:
    """Import the CLI and everything it imports, then forget the CLI module itself (runpy must find it unimported,
    as in `python -m`, or it warns). Returns what the imports wrote on stdout and stderr."""
    import importlib

    saved = os.dup(1), os.dup(2)
    paths = scratch / "import.out", scratch / "import.err"
    _redirect(1, str(paths[0]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    _redirect(2, str(paths[1]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        importlib.import_module(CLI_MODULE)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    package, _, name = CLI_MODULE.rpartition(".")
    del sys.modules[CLI_MODULE]
    delattr(sys.modules[package], name)
    return paths[0].read_bytes(), paths[1].read_bytes()


def _serve(scratch: pathlib.Path) -> dict:
    """Answer requests until stdin closes (then exit). Returns only in a forked child, with its request.

    A request runs a command and answers with its outcome, or with "start", forks it and answers with its pid at
    once; {"wait": pid} then waits for that one (the others run meanwhile) and answers with its outcome."""
    preamble_out, preamble_err = _import_the_cli(scratch)
    answer = sys.stdout
    answer.write(json.dumps({"stdout": _encode(preamble_out), "stderr": _encode(preamble_err)}) + "\n")
    answer.flush()
    started = {}  # pid: (stdout path, stderr path)
    for number in itertools.count():
        line = sys.stdin.buffer.readline()
        if not line:
            os._exit(0)  # nothing to flush: skip the finalization of torch's modules
        request = json.loads(line)
        if "wait" in request:
            pid = request["wait"]
        else:
            paths = scratch / f"command-{number}.out", scratch / f"command-{number}.err"
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _redirect(0, os.devnull, os.O_RDONLY)
                _redirect(1, str(paths[0]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                _redirect(2, str(paths[1]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                return request
            started[pid] = paths
            if request.get("start"):
                answer.write(json.dumps({"pid": pid}) + "\n")
                answer.flush()
                continue
        _, status = os.waitpid(pid, 0)
        out_path, err_path = started.pop(pid)
        answer.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status),
                                 "stdout": _encode(preamble_out + out_path.read_bytes()),
                                 "stderr": _encode(preamble_err + err_path.read_bytes())}) + "\n")
        answer.flush()
        out_path.unlink()
        err_path.unlink()


def _run_command(request: dict) -> None:
    """In the forked child: become `python -m attn_fast.tools.cli ARGS` run from request["cwd"] with
    request["env"], and end as that process would: the exit status of its SystemExit (a traceback and 1 for any
    other exception, SIGINT for KeyboardInterrupt), after non-daemon threads, atexit handlers and the flush of
    stdout and stderr. Then os._exit: the rest of the interpreter's finalization (tearing down torch's modules,
    ~1 s) has nothing to show."""
    import atexit
    import runpy
    import signal
    import threading
    import types

    sys.stdin = open(0, encoding=sys.stdin.encoding, errors=sys.stdin.errors, closefd=False)  # noqa: SIM115
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request.get("prelude"):  # Python run first, in a namespace of its own (say, to patch torch.save)
        exec(request["prelude"], {"__name__": "prelude"})
    script = request.get("script")
    # `python -m` puts the working directory first on sys.path, `python SCRIPT` the script's directory
    sys.path[0] = os.getcwd() if script is None else os.path.dirname(os.path.abspath(script))
    sys.argv = ["-m" if script is None else script, *request["args"]]
    sys.modules["__main__"] = types.ModuleType("__main__")  # a fresh one: the server's names are not the CLI's
    status, interrupted = 0, False
    try:
        if script is None:
            runpy._run_module_as_main(CLI_MODULE)
        else:
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            status = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
            status = 1
    except BaseException as error:  # what the interpreter prints for an uncaught exception
        sys.excepthook(type(error), error, error.__traceback__)
        status, interrupted = 1, isinstance(error, KeyboardInterrupt)
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if interrupted:  # Python ends an uncaught KeyboardInterrupt by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


# ----------------------------------------------------------------------------------------------------------------
# The client (imported by the tests)
# ----------------------------------------------------------------------------------------------------------------

def server_environment() -> dict[str, str]:
    """What the commands' processes start with: this checkout's attn_fast (the editable install may point
    elsewhere), one thread, UTF-8 stdio, no ATTN_FAST_DEBUG."""
    path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    environment = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    environment.pop("ATTN_FAST_DEBUG", None)
    return environment


class CliProcesses:
    """Runs `attn-fast` commands, each in its own forked process (see the module docstring)."""

    def __init__(self, scratch: pathlib.Path, timeout: float = 300):
        self.timeout = timeout
        self.environment = server_environment()
        self.server = subprocess.Popen([sys.executable, __file__, str(scratch)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=self.environment, cwd=REPOSITORY)
        self.preamble = self._answer()

    def _answer(self) -> dict:
        ready, _, _ = select.select([self.server.stdout], [], [], self.timeout)
        line = self.server.stdout.readline() if ready else b""
        if not line:
            self.close()
            raise RuntimeError(f"the CLI server did not answer within {self.timeout} s (or ended)")
        return json.loads(line)

    def _request(self, request: dict) -> dict:
        self.server.stdin.write(json.dumps(request).encode("ascii") + b"\n")
        self.server.stdin.flush()
        return self._answer()

    def _command(self, args, cwd, script, prelude, environment) -> tuple[list[str], dict]:
        argv = [os.fsdecode(arg) for arg in args]
        request = {"args": argv, "cwd": str(cwd if cwd is not None else os.getcwd()),
                   "env": dict(self.environment, **environment), "prelude": prelude}
        if script is None:
            return [sys.executable, "-m", CLI_MODULE, *argv], request
        request["script"] = str(script)
        return [sys.executable, str(script), *argv], request

    def run(self, *args: str | bytes, cwd: str | os.PathLike | None = None, script: str | os.PathLike | None = None,
            prelude: str | None = None, **environment: str) -> subprocess.CompletedProcess:
        """`python -m attn_fast.tools.cli ARGS` (bytes arguments as the OS would hand them to Python), or with
        `script`, `python SCRIPT ARGS` (a script that imports what the CLI does: torch, attn_fast), with
        `environment` added to the server's and the Python source `prelude` run first; stdout and stderr as
        bytes."""
        command, request = self._command(args, cwd, script, prelude, environment)
        answer = self._request(request)
        return subprocess.CompletedProcess(command, answer["returncode"], _decode(answer["stdout"]),
                                           _decode(answer["stderr"]))

    def start(self, *args: str | bytes, cwd: str | os.PathLike | None = None, script: str | os.PathLike | None = None,
              prelude: str | None = None, **environment: str) -> StartedCommand:
        """The command of `run`, started and left running: a Popen-like handle (pid, poll, send_signal, kill,
        communicate, returncode; text stdout and stderr)."""
        command, request = self._command(args, cwd, script, prelude, environment)
        return StartedCommand(self, command, self._request(dict(request, start=True))["pid"])

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.stdin.close()
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()


class StartedCommand:
    """A command CliProcesses.start left running (a child of the server, not of this process)."""

    def __init__(self, processes: CliProcesses, args: list[str], pid: int):
        self.processes, self.args, self.pid = processes, args, pid
        self.returncode = None
        self._output = None

    def _ended(self) -> bool:
        """Exited or killed (a zombie until the server waits for it) or gone."""
        try:
            stat = pathlib.Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return True
        return stat[stat.rindex(")") + 2] in "ZX"

    def poll(self) -> int | None:
        if self.returncode is None and self._ended():
            self.communicate()
        return self.returncode

    def send_signal(self, signal_number: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal_number)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end (within `timeout` s, else the command is killed and TimeoutExpired raised); returns
        (stdout, stderr) as text."""
        if self._output is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            while deadline is not None and not self._ended():
                if time.monotonic() > deadline:
                    self.kill()
                    self.communicate()
                    raise subprocess.TimeoutExpired(self.args, timeout)
                time.sleep(0.02)
            answer = self.processes._request({"wait": self.pid})
            self.returncode = answer["returncode"]
            self._output = _decode(answer["stdout"]).decode("utf-8"), _decode(answer["stderr"]).decode("utf-8")
        return self._output

def run_real_cli(*args: str | bytes, cwd: str | os.PathLike | None = None, timeout: float = 300,
                 **environment: str) -> subprocess.CompletedProcess:
    """The same command in a plain `python -m attn_fast.tools.cli` subprocess (a fresh interpreter), with the
    environment CliProcesses gives its commands; stdout and stderr as bytes."""
    return subprocess.run([sys.executable, "-m", CLI_MODULE, *args], capture_output=True, cwd=cwd,
                          env=dict(server_environment(), **environment), timeout=timeout)


if __name__ == "__main__":
    _run_command(_serve(pathlib.Path(sys.argv[1])))
