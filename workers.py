"""Every GPU of the box in one command: one worker process per GPU, each pinned to its own (CUDA_VISIBLE_DEVICES,
set before the process starts: multiprocessing's spawn), all taking tasks from one shared queue, longest first, so
whichever GPU is free takes the next task and none waits on another's slice. A worker loads its model once, then
serves tasks until the queue is done. A worker that dies is one line naming its GPU and task; the task goes back to
the queue once, then is given up (the caller names it). infer.py and train.py --ttt use it; across machines,
--shard still splits the tasks (one shard a machine).
"""
import multiprocessing
import os
import signal
import sys
from collections import Counter, deque
from contextlib import contextmanager

from cli import AUTO, OneLineError, first_line

RETRIES = 1  # a task whose worker dies goes back to the queue this many times, then is given up
KILL_HOOK = "WORKERS_KILL_ON"  # tests: "TASK" kills (SIGKILL) the worker taking TASK, "TASK:FILE" only once


def check_gpus(text):
    """--gpus is auto, all or a whole number >= 1."""
    return text in (AUTO, "auto", "all") or text.isdigit() and int(text) >= 1


def worker_count(gpus, setup):
    """How many workers --gpus asks for on `setup`'s device, said when more than one: every GPU for auto and all
    (1 on a CPU); N itself, which on a GPU may not pass the GPUs torch sees."""
    seen = len(setup.gpus) if setup.device == "cuda" else 0
    if seen and gpus not in (AUTO, "auto", "all") and int(gpus) > seen:
        raise OneLineError(f"--gpus {gpus}: torch sees {seen} GPUs ({', '.join(setup.gpus)}); give at most {seen}, "
                           "or all")
    n = max(seen, 1) if gpus in (AUTO, "auto", "all") else int(gpus)
    if n > 1:
        print(f"workers: {n} processes, " + (f"one per GPU ({', '.join(setup.gpus[:n])})" if seen
                                            else f"on the CPU (--gpus {gpus})") + ", one shared queue of tasks")
    return n


def pins(n, setup):
    """Each worker's CUDA_VISIBLE_DEVICES: one GPU each, among those this process was given; None on a CPU."""
    if setup.device != "cuda":
        return [None] * n
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [x.strip() for x in given.split(",")][:n] if given else [str(i) for i in range(n)]


def worker_name(slot, pin):
    return f"GPU {pin}" if pin is not None else f"CPU worker {slot}"


@contextmanager
def environment(**values):
    """os.environ with `values` set while a worker process starts: spawn hands it the environment as it is then,
    so its torch never sees another GPU."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kill_hook(item):
    """The test hook: SIGKILL this worker as it takes the task KILL_HOOK names (once, where a marker file is given)."""
    spec = os.environ.get(KILL_HOOK, "")
    task, _, marker = spec.partition(":")
    if spec and task == str(item) and not (marker and os.path.exists(marker)):
        if marker:
            open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def serve(slot, quiet, start, work, args, conn):
    """A worker process: start(slot, *args) once (the model), then, for each (item, waiting) this process's parent
    sends on `conn` until None, work(state, item, waiting); `waiting` counts the tasks not handed out yet, this one
    included. Each message is one small write to a pipe, whole in the parent even if this process is killed next."""
    if quiet:  # one worker's lines say what the workers load; the others would repeat them
        sys.stdout = open(os.devnull, "w")
    try:
        state = start(slot, *args)
    except BaseException as e:  # noqa: B902 - the parent says it in one line, whatever it was
        conn.send(("fatal", first_line(e) or type(e).__name__))
        return
    sys.stdout = open(os.devnull, "w")  # per-task lines: the parent shows the progress
    conn.send(("ready", None))
    try:
        while (given := conn.recv()) is not None:
            kill_hook(given[0])
            try:
                result = work(state, *given)
            except Exception as e:
                conn.send(("failed", first_line(e) or type(e).__name__))
                return
            conn.send(("done", result))
    except (KeyboardInterrupt, EOFError):  # Ctrl-C reaches every worker; the parent says what is saved
        return


class Pool:
    """The parent's side of the workers: this process is the queue. A worker that is free gets the next item, in
    the order given (longest first is the caller's); on_done(item, result) runs here as each finishes. A worker that
    dies (a signal, an error) is said in one line with its GPU and task and replaced; its task goes first in the
    queue again, once, then is given up (`lost`: item -> why)."""

    def __init__(self, pinned, start, work, args, items, on_done):
        self.ctx = multiprocessing.get_context("spawn")
        self.pinned, self.job, self.on_done = pinned, (start, work, args), on_done
        self.pending, self.left, self.deaths, self.lost = deque(items), set(items), Counter(), {}
        self.procs, self.current, self.idle, self.wids = {}, {}, set(), iter(range(1 << 30))  # wid: (slot, p, conn)

    def spawn(self, slot):
        conn, child = self.ctx.Pipe()
        quiet = slot > 0 or bool(self.procs)
        p = self.ctx.Process(target=serve, args=(slot, quiet, *self.job, child), daemon=True)
        gpu = dict(CUDA_VISIBLE_DEVICES=self.pinned[slot]) if self.pinned[slot] is not None else {}
        with environment(TQDM_DISABLE="1", **gpu):
            p.start()
        child.close()  # only the worker writes there: its death ends the pipe
        self.procs[next(self.wids)] = (slot, p, conn)

    def give(self, wid):
        if self.pending:
            self.current[wid] = self.pending.popleft()
            self.procs[wid][2].send((self.current[wid], len(self.pending) + 1))
        else:
            self.idle.add(wid)

    def died(self, wid, why):
        slot, p, conn = self.procs.pop(wid)
        conn.close()
        p.join(5)
        self.idle.discard(wid)
        item, name = self.current.pop(wid, None), worker_name(slot, self.pinned[slot])
        if item is None:  # it never took a task: its start failed, and each new one's would
            raise OneLineError(f"{name}: its worker died before taking a task ({why})")
        self.deaths[item] += 1
        again = self.deaths[item] <= RETRIES
        print(f"{name}: its worker died ({why}) on task {item}: "
              + ("back to the queue" if again else "given up, [[0]] in the submission"), file=sys.stderr)
        if again:
            self.pending.appendleft(item)
        else:
            self.lost[item] = f"its worker on {name} died twice ({why})"
            self.left.discard(item)
        if self.left:
            self.spawn(slot)
        while self.idle and self.pending:
            self.give(self.idle.pop())

    def handle(self, wid, message):
        kind, payload = message
        if kind == "fatal":
            slot = self.procs[wid][0]
            raise OneLineError(f"{worker_name(slot, self.pinned[slot])}: {payload}")
        if kind == "failed":
            return self.died(wid, payload)
        if kind == "done":
            item = self.current.pop(wid)
            self.left.discard(item)
            self.on_done(item, payload)
        self.give(wid)

    def step(self):
        """Wait for a message or a death, and deal with it: what a worker sent before dying counts first."""
        from multiprocessing.connection import wait
        by_object = {}
        for wid, (_, p, conn) in self.procs.items():
            by_object[conn], by_object[p.sentinel] = wid, wid
        for ready in wait(list(by_object), timeout=5):
            wid = by_object[ready]
            if wid not in self.procs:
                continue
            _, p, conn = self.procs[wid]
            try:
                while wid in self.procs and conn.poll():
                    self.handle(wid, conn.recv())
            except EOFError:
                pass
            if wid in self.procs and not p.is_alive():
                p.join(5)
                code = p.exitcode
                self.died(wid, f"killed by signal {-code}" if code and code < 0 else f"exit code {code}")

    def close(self):
        for _, p, conn in self.procs.values():
            try:
                conn.send(None)
            except OSError:
                pass
        for _, p, _ in self.procs.values():  # what a worker finished is in the cache already: nothing left to save
            p.join(2)
            if p.is_alive():
                p.terminate()


def run(n, pinned, start, work, args, items, on_done):
    """Run work() on every item over `n` spawned workers (serve), each pinned to pinned[slot], as Pool says.
    Returns {item: why} of the items given up."""
    pool = Pool(pinned, start, work, args, items, on_done)
    for slot in range(n):
        pool.spawn(slot)
    try:
        while pool.left:
            pool.step()
    finally:
        pool.close()
    return pool.lost
