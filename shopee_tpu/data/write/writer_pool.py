"""Writer processes: plain ``python -m`` subprocesses speaking over pipes.

``multiprocessing``'s spawn and forkserver start methods re-import the caller's main
script in every child, which fails for scripts without an ``if __name__ ==
"__main__"`` guard, and fork is unsafe once TensorFlow's threads exist. A
subprocess running this module avoids both: it imports only the shard writer
(numpy and Pillow) and exchanges length-prefixed pickles with the parent.

Messages to a worker: ``("shard", task)`` writes a whole shard from files and
replies with its result, after ``("progress", n)`` messages counting the rows done
on the way; ``("call", "module:function", task)`` runs another shard writer (e.g.
one reading products from a BSON file) and replies with its result; ``("item",
item)`` adds one streamed image; ``("finish",)`` closes the streamed shards and
replies with their results.
"""

from __future__ import annotations

import importlib
import os
import pickle
import selectors
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator

import shopee_tpu
from shopee_tpu.data.write.shard_writer import ShardWriter, write_shard

__all__ = ["WorkerPool"]

_LEN = struct.Struct("<Q")


def _send(stream, message) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LEN.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _read_exactly(stream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            break  # the other side closed the pipe
        data += chunk
    return data


def _recv(stream):
    header = _read_exactly(stream, _LEN.size)
    if len(header) < _LEN.size:
        return None  # the other side closed the pipe
    (n,) = _LEN.unpack(header)
    return pickle.loads(_read_exactly(stream, n))


class WorkerPool:
    """A few writer subprocesses; use as a context manager."""

    def __init__(self, n: int, params=None):
        root = os.path.dirname(os.path.dirname(os.path.abspath(shopee_tpu.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, env.get("PYTHONPATH", "")) if p
        )
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "shopee_tpu.data.write.writer_pool"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
            for _ in range(n)
        ]
        # Streamed items need the run's shard settings; shard tasks carry them.
        if params is not None:
            for p in self.procs:
                _send(p.stdin, ("params", params))

    def _message(self, proc):
        # The raw pipe, never its buffered wrapper: a buffer could read a second
        # message ahead, which the selector would then never report.
        reply = _recv(proc.stdout.raw)
        if reply is None:
            raise RuntimeError(f"a writer process died (exit code {proc.wait()})")
        kind, value = reply
        if kind == "error":
            raise RuntimeError(f"a writer process failed:\n{value}")
        return kind, value

    def _reply(self, proc):
        kind, value = self._message(proc)
        while kind == "progress":
            kind, value = self._message(proc)
        return value

    def map_unordered(
        self,
        tasks: Iterable,
        fn: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Iterator[dict]:
        """Writes each shard task on the next free worker; yields results as done.

        ``fn`` (``"module:function"``, importable without TensorFlow) writes a task;
        by default ``shard_writer.write_shard`` (a shard from image files).
        ``progress(n)`` is called as the workers report ``n`` more rows done.
        """
        pending = iter(tasks)
        busy = 0

        def message(task):
            return ("shard", task) if fn is None else ("call", fn, task)

        with selectors.DefaultSelector() as sel:
            for p in self.procs:
                task = next(pending, None)
                if task is None:
                    break
                _send(p.stdin, message(task))
                sel.register(p.stdout, selectors.EVENT_READ, p)
                busy += 1
            while busy:
                for key, _ in sel.select():
                    proc = key.data
                    kind, value = self._message(proc)
                    if kind == "progress":
                        if progress is not None:
                            progress(value)
                        continue
                    yield value
                    task = next(pending, None)
                    if task is None:
                        sel.unregister(proc.stdout)
                        busy -= 1
                    else:
                        _send(proc.stdin, message(task))

    def put(self, worker: int, item) -> None:
        """Streams one item to a worker (blocks while its pipe is full)."""
        proc = self.procs[worker]
        try:
            _send(proc.stdin, ("item", item))
        except BrokenPipeError:
            self._reply(proc)  # raises with the worker's own error
            raise

    def finish(self) -> list[dict]:
        """Asks every worker to close its streamed shards; returns all results."""
        for p in self.procs:
            _send(p.stdin, ("finish",))
        return [r for p in self.procs for r in self._reply(p)]

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for p in self.procs:
            if exc_type is not None:
                p.kill()  # unfinished shards keep temporary names
            else:
                p.stdin.close()
        for p in self.procs:
            p.wait()


def resolve(fn: str):
    """The function named ``"module:function"``."""
    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(module), name)


def serve(stdin, stdout) -> None:
    """The worker loop: runs messages from ``stdin`` until it closes."""
    params = None
    streamed: dict[int, ShardWriter] = {}
    while True:
        message = _recv(stdin)
        if message is None:
            return
        try:
            if message[0] == "params":
                params = message[1]
                continue
            if message[0] == "shard":
                result = write_shard(
                    message[1], lambda n: _send(stdout, ("progress", n))
                )
                _send(stdout, ("ok", result))
            elif message[0] == "call":
                _send(stdout, ("ok", resolve(message[1])(message[2])))
            elif message[0] == "item":
                index, data, label, id_, group = message[1]
                if index not in streamed:
                    streamed[index] = ShardWriter(params, index)
                streamed[index].add(data, label, id_, group, id_)
            elif message[0] == "finish":
                results = [streamed[i].finish() for i in sorted(streamed)]
                streamed.clear()
                _send(stdout, ("ok", results))
        except Exception:
            _send(stdout, ("error", traceback.format_exc()))
            return


if __name__ == "__main__":
    # Keep the pipe clean: anything printed by libraries goes to stderr.
    out = sys.stdout.buffer
    sys.stdout = sys.stderr
    # Pillow and its image plugins load now, while the parent plans the shards,
    # rather than at the first image.
    from PIL import Image

    Image.preinit()
    serve(sys.stdin.buffer, out)
