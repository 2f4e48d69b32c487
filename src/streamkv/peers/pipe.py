"""A peer's worker process and what its end says: requests as JSON lines, replies as a JSON line and raw bytes.

A peer that runs native code (llama.cpp) or another environment (kvpress)
runs in a process of its own, so that its crash, hang or abort ends that
process only.  `Worker` reads every reply against a time limit and turns a
worker that died, stopped answering or closed its end into a `StreamkvError`
that names what happened (`exit_text`: the signal that killed it, or its exit
status), which the decode loop's callers record as a failed row and the bench
as a failed row of its section.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

from streamkv.errors import StreamkvError

# A request that takes longer is a hung worker: it is killed and the row fails.  Generous: the slowest request is
# a prefill of a few thousand tokens on one busy core, which takes seconds.
REQUEST_LIMIT_S = 600.0


def exit_text(returncode: int | None) -> str:
    """How a worker ended, from its return code: "died of SIGSEGV (signal 11)", "exited with status 1"."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return f"died of {name} (signal {-returncode})"
    return f"exited with status {returncode}"


class Worker:
    """A worker process spoken to over its stdin and stdout; its stderr is this process's (the job's log).

    `label` names it in errors ("the llama.cpp worker of 'llamacpp:shift'"); `limit_s` bounds every reply.
    """

    def __init__(self, argv: list[str], label: str, limit_s: float = REQUEST_LIMIT_S):
        self.label, self.limit_s = label, limit_s
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                     stderr=sys.stderr.fileno() if has_fileno() else None)
        self._fd = self.proc.stdout.fileno()
        self._pending = bytearray()  # bytes read past the last reply's header

    def request(self, message: dict, during: str) -> tuple[dict, bytearray]:
        """Send `message`, return the reply's header and payload (`receive`); `during` says when, for errors."""
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # (ValueError: the pipe was closed after an earlier failure)
            raise self.ended(during) from None
        return self.receive(during)

    def receive(self, during: str) -> tuple[dict, bytearray]:
        """The next reply: its JSON header and, when the header has a `shape`, that many float32 values as bytes.

        A reply with an `error` raises it; a worker that ends or exceeds the time limit raises what happened.
        """
        deadline = time.monotonic() + self.limit_s
        while b"\n" not in self._pending:
            self._fill(deadline, during)
        line, _, rest = bytes(self._pending).partition(b"\n")
        header = json.loads(line)
        if "error" in header:
            self._pending = bytearray(rest)
            raise StreamkvError(header["error"])
        size = 4 * header["shape"][0] * header["shape"][1] if "shape" in header else 0
        payload = bytearray(size)
        got = min(size, len(rest))
        payload[:got] = rest[:got]
        self._pending = bytearray(rest[got:])
        view = memoryview(payload)
        while got < size:  # straight into the payload: a prefill's logits are tens of megabytes
            self._wait(deadline, during)
            n = os.readv(self._fd, [view[got:]])
            if not n:
                raise self.ended(during)
            got += n
        return header, payload

    def _fill(self, deadline: float, during: str) -> None:
        self._wait(deadline, during)
        chunk = os.read(self._fd, 1 << 16)
        if not chunk:
            raise self.ended(during)
        self._pending += chunk

    def _wait(self, deadline: float, during: str) -> None:
        """Until the worker's stdout has bytes (or is closed); past the deadline the worker is killed."""
        left = deadline - time.monotonic()
        if left > 0 and select.select([self._fd], [], [], left)[0]:
            return
        self.kill()
        raise StreamkvError(f"{self.label} did not answer within {self.limit_s:g} s {during}; it was killed")

    def ended(self, during: str) -> StreamkvError:
        """The error of a worker that closed its end: how it ended (it is killed if it has not)."""
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            return StreamkvError(f"{self.label} closed its output {during} and was killed")
        return StreamkvError(f"{self.label} {exit_text(code)} {during}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Ask the worker to quit; kill it if it does not within a few seconds."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"quit": true}\n')
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (BrokenPipeError, ValueError, subprocess.TimeoutExpired):
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if not stream.closed:
                stream.close()


def has_fileno() -> bool:
    """Whether this process's stderr is a file a child can write to (not under pytest's capture, say)."""
    try:
        sys.stderr.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False
