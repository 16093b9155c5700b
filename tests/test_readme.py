"""The README's shell blocks, run as pasted, in order, in one shell, against a live pipeline.

Whatever the README says is what runs: every ```sh block is split into commands (by bash's own parser) and
each is run by one bash process in a fresh folder, so ``export``, ``&`` and ``$(...)`` behave as they do for
a reader. The only things changed: the working directory (a temporary folder holding links to the
checkout's files, so relative paths such as ``.venv/bin/canpipe`` resolve, and a data folder of its own) and
port 8000 (another test may hold it). Install commands are not re-run: they must be exactly the ones CI
runs (``.ci/run``), the test suite itself is CI's, and what follows an install in the same line runs.
Background commands (``&``) are stopped by the test by their PID and must drain to exit 0. ``canpipe top``
draws until interrupted: it runs until it has drawn, then gets Ctrl-C. A comment right under a command that
shows JSON (``# {"accepted":1}``) is the output that command must print.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from canpipe_testing import ROOT, free_port, process_alive, wait_for

README = ROOT / "README.md"
INTERACTIVE = ("canpipe top",)  # run until they have drawn a screen, then interrupted like a person would
_DONE = "__readme_done__"


def shell_blocks(text: str) -> list[str]:
    """The ```sh (or bash, shell) blocks of a Markdown text, in order."""
    return re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", text, flags=re.S | re.M)


def complete(source: str) -> bool:
    """Whether bash parses ``source`` as whole commands (no open quote, continuation or block)."""
    return subprocess.run(["bash", "-n"], input=source, text=True, capture_output=True).returncode == 0


def commands(block: str) -> list[tuple[str, str | None]]:
    """(command, the output the README shows for it or None); a multi-line command stays whole."""
    out: list[tuple[str, str | None]] = []
    pending: list[str] = []
    for line in block.splitlines():
        if not pending and line.lstrip().startswith("#"):
            shown = line.lstrip("# ").split()
            if out and shown and shown[0].startswith("{"):
                out[-1] = (out[-1][0], shown[0])
            continue
        if not pending and not line.strip():
            continue
        pending.append(line)
        if not line.endswith("\\") and complete("\n".join(pending) + "\n"):
            out.append(("\n".join(pending), None))
            pending = []
    assert not pending, f"an unfinished command in the README: {pending}"
    return out


def ci_command() -> str:
    """The one command line CI runs (the last line of .ci/run)."""
    lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    return lines[-1]


def installs(command: str) -> bool:
    return re.search(r"\bpip install\b", command) is not None


def without_extras(step: str) -> str:
    """``pip install -e ".[test,sqs]"`` -> ``pip install -e .``."""
    return re.sub(r"""(["']?)\.\[[\w,-]+\]\1""", ".", step)


def split_install(command: str) -> tuple[list[str], str]:
    """(its install steps, what runs after them) for a command line that installs canpipe."""
    parts = [p.strip() for p in command.split(" && ")]
    steps = [p for p in parts if p.startswith("python3 -m venv") or installs(p)]
    rest = [p for p in parts if p not in steps]
    return steps, " && ".join(rest)


class Shell:
    """One bash reading NUL-separated commands on fd 3, so a command's stdin is /dev/null, not the script."""

    LOOP = (
        'exec 3<&0 0</dev/null; while IFS= read -r -d "" __cmd <&3; do eval "$__cmd"; '
        f'printf "\\n{_DONE} %s %s\\n" "$?" "$!"; done'
    )

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(
            ["bash", "--norc", "--noprofile", "-c", self.LOOP],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            with self._lock:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def run(self, command: str, timeout_s: float) -> tuple[int, str, int | None]:
        """(exit status, output, PID of the job it put in the background or None)."""
        with self._lock:
            start = len(self.lines)
        assert self.popen.stdin is not None
        self.popen.stdin.write(command.encode() + b"\0")
        self.popen.stdin.flush()

        def done() -> str | None:
            with self._lock:
                return next((ln for ln in self.lines[start:] if ln.startswith(_DONE)), None)

        wait_for(done, timeout_s, f"the README command {command!r}")
        with self._lock:
            output = "\n".join(ln for ln in self.lines[start:] if not ln.startswith(_DONE))
        _, status, bg = (done() or "").split(" ", 2)
        return int(status), output, int(bg) if bg.strip() else None

    def close(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.close()
        self.popen.wait(30)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def workdir(tmp_path: Path) -> Path:
    """A fresh folder with a link to each file and folder of the checkout, but no data of its own yet."""
    work = tmp_path / "work"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {"data", ".git"}:
            (work / entry.name).symlink_to(entry)
    return work


def wait_clear_of_the_hour_boundary() -> None:
    """The README aggregates the current hour after writing to it: not across the turn of an hour."""
    now = dt.datetime.now(dt.UTC)
    to_next_hour_s = 3600 - (now.minute * 60 + now.second)
    if to_next_hour_s < 150:
        time.sleep(to_next_hour_s + 2)  # a wall-clock boundary, not an event: nothing to poll


@pytest.mark.timeout(600)
def test_every_command_of_the_readme_runs_as_pasted(tmp_path):
    text = README.read_text()
    port = str(free_port())
    # the one substitution: the README's port, which another test or service may hold here
    text = re.sub(r"(--port |127\.0\.0\.1:)8000\b", rf"\g<1>{port}", text)
    blocks = shell_blocks(text)
    assert blocks, "the README has no shell blocks"
    work = workdir(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CANPIPE_", "VIRTUAL_ENV"))}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if not p.startswith(str(ROOT)))
    wait_clear_of_the_hour_boundary()
    shell = Shell(work, env)
    background: list[int] = []
    ran: list[str] = []
    try:
        for block in blocks:
            for command, shown in commands(block):
                if installs(command):
                    steps, rest = split_install(command)
                    if command == ci_command():
                        continue  # CI's own line: .ci/run runs it, this test is part of it
                    ci_steps, _ = split_install(ci_command())
                    # the same steps as CI's, the extras aside (a user needs no [test])
                    allowed = {without_extras(s) for s in ci_steps}
                    assert {without_extras(s) for s in steps} <= allowed, f"README installs unlike CI: {steps}"
                    command = rest
                    if not command:
                        continue
                if command.startswith(INTERACTIVE):
                    run_interactive(shell, command, work)
                    ran.append(command)
                    continue
                status, output, bg = shell.run(command, 180)
                if command.rstrip().split("#")[0].rstrip().endswith("&"):
                    assert bg and bg not in background, f"{command!r} did not start a background job"
                    background.append(bg)
                    wait_for(lambda bg=bg: started(output_of(shell), bg), 60, f"{command!r} to start")
                else:
                    assert status == 0, f"README command failed ({status}): {command}\n{output}"
                if shown:
                    assert shown in output, f"{command!r} should print {shown}, printed:\n{output}"
                ran.append(command)
        assert any(c.startswith("canpipe serve") for c in ran) and any("curl" in c for c in ran), ran
        aggregated = list((work / "data" / "aggregated").glob("aggregated-*.json"))
        assert aggregated, "the README's aggregate --hour wrote no aggregate"
    finally:
        codes = stop_background(shell, background)
        shell.close()
    assert codes == [0] * len(background), f"background commands exited {codes}:\n" + output_of(shell)


def output_of(shell: Shell) -> str:
    with shell._lock:
        return "\n".join(shell.lines)


def started(output: str, pid: int) -> bool:
    """A daemon has logged its start-up line (canpipe serve and consume log 'canpipe <version> ...')."""
    return process_alive(pid) and re.search(r"canpipe \d+\.\d+\.\d+ (serve|consume)", output) is not None


def stop_background(shell: Shell, pids: list[int]) -> list[int]:
    """SIGTERM each background job by its PID, then ask the shell for its exit status (it is bash's child)."""
    codes = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        status, _, _ = shell.run(f"wait {pid}", 60)
        codes.append(status)
    return codes


def run_interactive(shell: Shell, command: str, work: Path) -> None:
    """Run ``command`` with the shell's environment until it has drawn a screen, then Ctrl-C: exit 0."""
    env_file = work / ".readme-env"
    status, _, _ = shell.run(f"env -0 > {shlex.quote(str(env_file))}", 10)
    assert status == 0
    env = dict(item.split("=", 1) for item in env_file.read_text().split("\0") if "=" in item)
    log = work / ".readme-interactive.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "--norc", "-c", command], cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
        try:
            wait_for(lambda: "P99" in log.read_text(errors="replace"), 30, f"{command!r} to draw")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0, log.read_text(errors="replace")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
