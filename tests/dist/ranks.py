"""Run a function on N gloo ranks in fresh processes (CPU), with a timeout on everything."""

import datetime
import io
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = datetime.timedelta(seconds=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
        buf = io.BytesIO()  # tensors by value: the process may exit before the parent reads them
        torch.save(fn(rank, world, *args), buf)
        queue.put((rank, buf.getvalue(), None))
    except BaseException:  # report to the parent instead of hanging it
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 300):
    """fn(rank, world, *args) on `world` processes -> list of results by rank. fn must be importable."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        import time

        t0 = time.time()
        while len(results) + len(errors) < world:
            if time.time() - t0 > timeout:
                raise TimeoutError(f"ranks did not finish in {timeout} s")
            if queue.empty():
                if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                    time.sleep(0.5)
                    if queue.empty():
                        raise RuntimeError(f"a rank died: exit codes {[p.exitcode for p in procs]}")
                time.sleep(0.05)
                continue
            rank, value, err = queue.get()
            if err:
                errors.append(f"rank {rank}:\n{err}")
            else:
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
