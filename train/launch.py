"""Run a training job in several processes: `accelerate launch` here, or Ray Train on a Ray cluster.

Both run the same loop (train/loop.py) on the same job file (`TrainJob`), so the weights do not
depend on how the processes were started, only on how many there are.

- This machine (`executor: local`): `accelerate launch --multi_gpu --num_processes N -m train.loop
  job.json` as a subprocess (with `--config_file` for FSDP/DeepSpeed). Its output is echoed and
  kept in `<state>/launch.log`; a failure raises with the last lines.
- A Ray cluster (`executor: ray`): Ray Train's `TorchTrainer` with N workers. Ray documents this as
  the way to run an Accelerate loop on a Ray cluster ("Distributed Training with Hugging Face
  Accelerate"): Ray places the workers (GPUs across nodes), sets up torch.distributed and the
  rank variables that `Accelerator()` reads, and restarts nothing we would have to write. The
  alternative, `accelerate launch` on every node, needs each node's rank and the head's address
  by hand. The workspace must be on storage that every node sees (the job names files in it).

On a machine without CUDA the processes train on the CPU (gloo), which is how the tests run it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from datamill.errors import DatamillError

TAIL_LINES = 40


def _cpu_only(device: str) -> bool:
    from datamill.devices import resolve_device

    return resolve_device(device) == "cpu"


def _free_port() -> int:
    """A free TCP port for the processes' rendezvous: two runs at once must not share 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(job_path: Path, num_processes: int, mixed_precision: str, config_file: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    else:  # DDP; the rest stated so that accelerate does not warn about defaults
        cmd += ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    cmd += ["--num_processes", str(num_processes), "--mixed_precision", mixed_precision,
            "--main_process_port", str(_free_port()), "-m", "train.loop", str(job_path)]
    return cmd


def launch_local(job_path: Path, *, num_processes: int, mixed_precision: str, device: str,
                 config_file: Path | None, log_path: Path, timeout_s: float | None = None) -> None:
    """`accelerate launch` the job; its output is echoed to stderr and saved in `log_path`. After
    `timeout_s` seconds (None: never) the processes are killed and the launch fails."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if _cpu_only(device):
        env["ACCELERATE_USE_CPU"] = "1"  # processes on the CPU (gloo), as a machine without GPUs needs
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    cmd = accelerate_command(job_path, num_processes, mixed_precision, config_file)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with open(log_path, "w") as log, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, start_new_session=True) as proc:
        # past the limit, the launcher's whole session goes: its training processes with it
        timed_out = threading.Event()
        watchdog = threading.Timer(timeout_s, lambda: (timed_out.set(), _kill_group(proc))) if timeout_s else None
        if watchdog:
            watchdog.start()
        try:
            for line in proc.stdout:
                log.write(line)
                tail.append(line.rstrip())
                if not _noise(line):
                    print(line, end="", file=sys.stderr)
        except BaseException:  # Ctrl-C: stop the processes too (a rerun resumes from the checkpoint)
            _kill_group(proc)
            raise
        finally:
            if watchdog:
                watchdog.cancel()
    if timed_out.is_set():
        raise DatamillError(f"`accelerate launch` of {num_processes} training processes did not finish within "
                            f"launch.timeout_s = {timeout_s:g} s and was stopped (a rerun resumes from the last "
                            f"checkpoint); the end of its output ({log_path} has all of it):\n" + "\n".join(tail))
    if proc.returncode != 0:
        raise DatamillError(f"`accelerate launch` of {num_processes} training processes failed (exit code "
                            f"{proc.returncode}); the end of its output ({log_path} has all of it):\n"
                            + "\n".join(tail))


def _kill_group(proc) -> None:
    """SIGKILL a process started with start_new_session and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _noise(line: str) -> bool:
    """torchrun's per-launch chatter about OMP_NUM_THREADS, not the user's business."""
    return "OMP_NUM_THREADS" in line or line.startswith("*****")


def launch_ray(ray, job_path: Path, *, num_processes: int, device: str, num_cpus: float, num_gpus: float,
               storage: Path) -> None:
    """The job as a Ray Train run of `num_processes` workers (`num_gpus` each, or the CPU)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = num_gpus > 0 and not _cpu_only(device)
    resources = {"CPU": num_cpus, **({"GPU": num_gpus} if use_gpu else {})}
    trainer = TorchTrainer(
        _ray_worker, train_loop_config={"job": str(job_path), "cpu": not use_gpu},
        scaling_config=ScalingConfig(num_workers=num_processes, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=job_path.parent.name, storage_path=str(storage)))
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps the worker's error; its message holds the worker's traceback
        raise DatamillError(f"Ray Train run of {num_processes} training workers failed: {e}") from None


def _ray_worker(config: dict) -> None:
    """One Ray Train worker: the loop on the job (Ray has set the ranks and the process group)."""
    from train.loop import TrainJob, train

    if config["cpu"]:
        os.environ["ACCELERATE_USE_CPU"] = "1"
    train(TrainJob.load(Path(config["job"])))


@contextmanager
def following(path: Path, on_header, on_row, every_s: float = 1.0):
    """While the block runs, read the launched run's live log (train.loop._LiveLog) as it grows:
    `on_header(total_steps, start_step)` once, `on_row(step, metrics)` per logged step. The rest
    is read when the block ends, so no row is missed."""
    path.unlink(missing_ok=True)  # a killed attempt's log: the new run writes its own
    stop = threading.Event()
    position = 0

    def read() -> None:
        nonlocal position
        if not path.is_file():
            return
        with open(path, "rb") as f:
            f.seek(position)
            for line in f:
                if not line.endswith(b"\n"):  # being written: next time
                    break
                position += len(line)
                row = json.loads(line)
                if "total_steps" in row:
                    on_header(row["total_steps"], row["start_step"])
                else:
                    on_row(row.pop("step"), row)

    def follow() -> None:
        while not stop.wait(every_s):
            read()

    thread = threading.Thread(target=follow, name="live-log", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        read()
