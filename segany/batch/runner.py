"""Run a job over many images: in this process, or on Ray (a local one or a cluster).

On Ray, Ray Data holds the list of images in blocks of `batch_size`; a pool of actors, each with its
own model replica (CPU threads or a GPU), maps the blocks through the same worker as the in-process
run. Ray restarts an actor that dies and re-runs its unfinished block on a live one; since outputs are
written whole under names fixed by the images, a redone block replaces rather than duplicates.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TypeVar

from . import sinks
from .sources import Item, list_items
from .workers import EmbedJob, EmbedWorker, EverythingJob, EverythingWorker, ModelSpec, OnOneThread

RAY_INSTALL = "--ray needs Ray: pip install 'segany[ray]'"
_ADDRESS = re.compile(r"^(auto|local|(ray|http|https)://\S+|[A-Za-z0-9_.\-\[\]:]+:\d+)$")


class RayRunFailed(RuntimeError):
    """The Ray run stopped (its cause chained); what was written so far stays and a rerun resumes."""


@dataclass
class RayOptions:
    address: Optional[str] = None  # None: RAY_ADDRESS if set, else a new local Ray; or "host:port", "auto"
    actors: Optional[int] = None  # model replicas; default: as many as the cluster's CPUs (or GPUs) allow
    cpus_per_actor: Optional[float] = None  # default: 1 with a GPU, else min(4, the cluster's CPUs)
    gpus_per_actor: float = 0.0
    batch_size: int = 4  # images per actor call; also the unit redone if an actor dies
    # True: the driver loads the model once, while Ray starts, and the actors take it from Ray's object
    # store (the nodes need no checkpoint). False: each actor loads the checkpoint itself, which is
    # quicker on a small machine, where the driver's loading competes with Ray's start (docs/scale.md).
    share_model: bool = False


@dataclass
class Summary:
    total: int = 0
    done: int = 0
    skipped: int = 0  # already done before this run
    failed: int = 0
    masks: int = 0
    seconds: float = 0.0
    errors: List[Dict[str, str]] = field(default_factory=list)  # {"id", "reason"}
    where: str = "in-process"
    what: str = "everything"  # everything | embed
    # Where the run's wall time went, in seconds (see TIMINGS); wall-clock marks taken on the driver and
    # in the workers, so on a cluster they are as exact as the nodes' clocks agree.
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.done and self.seconds > 0 else 0.0

    def to_dict(self) -> Dict[str, Any]:
        return {"total": self.total, "done": self.done, "skipped": self.skipped, "failed": self.failed,
                "masks": self.masks, "seconds": round(self.seconds, 3),
                "images_per_second": round(self.images_per_second, 4), "ran": self.where, "job": self.what,
                "timings": {k: round(v, 3) for k, v in self.timings.items()}, "errors": self.errors}

    def line(self) -> str:
        masks = f" ({self.masks} masks)" if self.what == "everything" else ""
        return (f"{self.done} done{masks}, {self.skipped} skipped (already done), {self.failed} failed, "
                f"{self.images_per_second:.2f} images/s over {self.seconds:.1f} s ({self.where})")


def import_ray():
    """Ray, once Ray Data is known to be installed; `ray.data` itself is imported by `_import_ray_data`."""
    import importlib.util

    try:
        import ray

        if importlib.util.find_spec("ray.data") is None:
            raise ImportError("ray.data")
    except ImportError:
        raise ValueError(RAY_INSTALL) from None
    return ray


def _import_ray_data():
    """Import Ray Data (pyarrow, pandas: about a CPU second), here beside `ray.init`, which mostly waits."""
    import ray.data  # noqa: F401


def check_address(address: Optional[str]) -> Optional[str]:
    if address in (None, "", "local"):
        return None
    if not _ADDRESS.match(address):
        raise ValueError(f"--ray {address!r} is not a Ray address (host:port, ray://host:port or auto); "
                         "put --ray after the sources or write --ray=ADDRESS")
    return address


# ----------------------------------------------------------------------------- executors

def _batches(items: Sequence[Item], size: int) -> Iterator[List[Item]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _columns(items: Sequence[Item]) -> Dict[str, List[Any]]:
    rows = [i.to_row() for i in items]
    return {k: [r[k] for r in rows] for k in rows[0]}


def _in_process(worker_cls, job, items: Sequence[Item], batch_size: int) -> Iterator[Dict[str, Any]]:
    worker = worker_cls(job)
    for chunk in _batches(items, batch_size):
        out = worker(_columns(chunk))
        for i in range(len(out["id"])):
            yield {k: v[i] for k, v in out.items()}


_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): (.+)$")


def _root_cause(exc: BaseException) -> str:
    """The user code's own error ("RuntimeError: ...") from the traceback text Ray wraps around it."""
    chain, current = [], exc
    while isinstance(current, BaseException) and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in chain:
        for line in reversed(str(error).splitlines()):
            match = _ERROR_LINE.match(line)
            if match and not match.group(1).startswith("ray") and "UserCodeException" not in match.group(1):
                return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2).strip()}"
    return type(exc).__name__


TIMINGS = {
    "setup": "the driver's own set-up: listing the sources, hashing the checkpoint, the resume check; "
             "on Ray also importing Ray Data and (share_model) loading the model once for the actors",
    "ray_start": "ray.init (a new local Ray, or joining a cluster); runs while the driver does its set-up",
    "workers_ready": "pipeline start to the first worker ready: Ray Data's start, the actor's process and "
                     "imports, its model loading (in-process: the model loading)",
    "model_put": "the driver's model put into Ray's object store (its loading is part of setup)",
    "model_load": "of which the first worker's model loading (on Ray: taking the driver's from the object store)",
    "first_result": "first worker ready to its first batch back at the driver",
    "images": "first batch back to the last (the steady part of the run)",
    "shutdown": "stopping the local Ray this run started",
    "total": "the whole call",
}

T = TypeVar("T")


def _start_ray(ray, options: RayOptions) -> bool:
    """Start a local Ray or join a cluster (unless this process already is connected); True if started."""
    if ray.is_initialized():
        return False
    address = check_address(options.address) or os.environ.get("RAY_ADDRESS") or None
    kwargs: Dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    if address is None:  # a local Ray on this machine, reachable from it only
        kwargs["_node_ip_address"] = "127.0.0.1"
    ray.init(address=address, **kwargs)
    return True


def _stop_ray(ray) -> None:
    """ray.shutdown of the local Ray this run started, less the second its autoscaler monitor costs.

    ray.shutdown stops Ray's processes one after another, the GCS before the monitor; the monitor
    answers SIGTERM by reporting to the GCS, which is gone by then, so shutdown waits its full second
    before killing it. The monitor of a local Ray about to stop has nothing to save or report: it is
    killed first. (Ray's own record of the processes it started is private: if it moved, shutdown
    simply takes its usual time.)
    """
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    processes = getattr(node, "all_processes", None)
    if isinstance(processes, dict):
        for info in processes.get("monitor", []):
            with contextlib.suppress(Exception):
                info.process.kill()
                info.process.wait(timeout=1)
    ray.shutdown()


@contextlib.contextmanager
def _session(options: Optional[RayOptions], prepare: Callable[[], T], timings: Dict[str, float]) -> Iterator[T]:
    """Yield prepare()'s result; with Ray, start Ray while prepare() runs, and stop the Ray started here.

    ray.init stays on this (the calling) thread and prepare() runs beside it: Ray's processes are tied
    to the thread that starts them and would die with a helper thread. prepare() reads files and hashes
    the checkpoint, which release the GIL, while ray.init mostly waits for Ray's processes to start.
    """
    if options is None:
        start = time.time()
        result = prepare()
        timings["setup"] = time.time() - start
        yield result
        return
    ray = import_ray()

    def timed() -> T:
        start = time.time()
        try:
            _import_ray_data()
            return prepare()
        finally:
            timings["setup"] = time.time() - start

    with ThreadPoolExecutor(1, thread_name_prefix="segany-setup") as pool:
        future = pool.submit(timed)
        start = time.time()
        started = False
        try:
            started = _start_ray(ray, options)
            timings["ray_start"] = time.time() - start
            result = future.result()
        except BaseException:
            if started:
                _stop_ray(ray)
            raise
    try:
        yield result
    finally:
        if started:
            start = time.time()
            _stop_ray(ray)
            timings["shutdown"] = time.time() - start


def _on_ray(worker_cls, job, items: Sequence[Item], options: RayOptions) -> Iterator[Dict[str, Any]]:
    ray = import_ray()
    _import_ray_data()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver shows one bar of its own
    context.print_on_execution_start = False
    # No per-task thread polling each actor's memory every second (a statistic nobody reads here): on
    # a machine whose cores the actors' torch threads fill, every wake-up beside them costs them time.
    if hasattr(context, "memory_usage_poll_interval_s"):
        context.memory_usage_poll_interval_s = None
    resources = ray.cluster_resources()
    gpus = float(options.gpus_per_actor or 0)
    cpus = options.cpus_per_actor
    if cpus is None:
        cpus = 1.0 if gpus > 0 else float(max(1, min(4, int(resources.get("CPU", 1)))))
    actors = options.actors
    if actors is None:
        by_gpu = int(resources.get("GPU", 0) // gpus) if gpus > 0 else None
        by_cpu = int(resources.get("CPU", 1) // cpus)
        actors = max(1, min(by_cpu, by_gpu) if by_gpu is not None else by_cpu)
    job.model.threads = max(1, int(cpus))
    if gpus > 0 and job.model.device == "cpu":
        job.model.device = "cuda"
    batch_size = max(1, int(options.batch_size))
    blocks = max(1, -(-len(items) // batch_size))
    dataset = ray.data.from_items([i.to_row() for i in items], override_num_blocks=blocks)
    mapped = dataset.map_batches(
        OnOneThread, fn_constructor_args=(worker_cls, job), batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=int(actors)), num_cpus=cpus, num_gpus=gpus if gpus > 0 else None,
    )
    try:
        for row in mapped.iter_rows():
            yield {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    except ray.exceptions.RayError as exc:  # e.g. a replica could not load the model on its node
        raise RayRunFailed(f"the Ray run stopped: {_root_cause(exc)}") from exc


def _run(worker_cls, job, items: Sequence[Item], skipped: int, ray: Optional[RayOptions], batch_size: int,
         progress: bool, desc: str, timings: Dict[str, float]) -> Summary:
    from tqdm import tqdm

    summary = Summary(total=len(items) + skipped, skipped=skipped, where="ray" if ray is not None else "in-process",
                      what=desc, timings=timings)
    start = time.perf_counter()
    started_at = time.time()
    first = last = None
    ready_at = load_seconds = None
    if items:
        rows = _on_ray(worker_cls, job, items, ray) if ray is not None else _in_process(worker_cls, job, items,
                                                                                        batch_size)
        with tqdm(total=len(items), unit="img", desc=desc, dynamic_ncols=True, disable=not progress) as bar:
            for row in rows:
                last = time.time()
                first = first or last
                if ready_at is None or row["ready_at"] < ready_at:
                    ready_at, load_seconds = float(row["ready_at"]), float(row["load_seconds"])
                if row["status"] == "failed":
                    summary.failed += 1
                    summary.errors.append({"id": str(row["id"]), "reason": str(row["reason"])})
                    bar.write(f"failed: {row['id']}: {row['reason']}")
                elif row["status"] == "skipped":
                    summary.skipped += 1
                else:
                    summary.done += 1
                    summary.masks += int(row["masks"])
                bar.update(1)
                bar.set_postfix(failed=summary.failed)
    summary.seconds = time.perf_counter() - start
    if first is not None:
        timings.update(workers_ready=ready_at - started_at, model_load=load_seconds, first_result=first - ready_at,
                       images=last - first)
    return summary


def _driver_model(ray: Optional[RayOptions], path, mode: str, todo: int):
    """On Ray, the model loaded once here (on the CPU, while Ray starts) for the actors to share."""
    if ray is None or not ray.share_model or todo == 0:
        return None
    from ..io.models import load_model

    return load_model(path, mode=mode, device="cpu")


def _spec(ray: Optional[RayOptions], model, path, mode: str, device: str, threads: int,
          timings: Dict[str, float]) -> ModelSpec:
    spec = ModelSpec(str(path), mode, device, threads)
    if model is not None:
        start = time.time()
        spec.shared = import_ray().put(model)  # kept alive by this driver: a restarted actor gets it again
        timings["model_put"] = time.time() - start
    return spec


# ----------------------------------------------------------------------------- jobs

def run_everything(
    sources: Sequence[str], checkpoint: str, out: str, *, fmt: str = "sa1b", settings: Optional[Dict[str, Any]] = None,
    mode: str = "exact", device: str = "cpu", ray: Optional[RayOptions] = None, batch_size: Optional[int] = None,
    recursive: bool = False, progress: bool = True, threads: int = 0,
    before_image: Optional[Callable[[str], None]] = None,
) -> Summary:
    """Everything mode over `sources` into `out` (see segany.batch.sinks for the layout); resumes.

    `settings` are AmgSettings fields (the released generator's argument names). `ray=None` runs here
    (`threads` > 0 sets torch's threads); `RayOptions()` runs on a local Ray or, with an address or
    RAY_ADDRESS, on a cluster, each actor with `cpus_per_actor` threads. Results are bit-identical for
    the same thread count; across thread counts scores may differ in the last float bits.
    The summary's `timings` say where the wall time went (see TIMINGS).
    """
    from ..io.embedding_cache import file_sha256
    from ..io.models import resolve_checkpoint
    from ..predict.amg import AmgSettings

    begin = time.time()
    timings: Dict[str, float] = {}
    formats = sinks.formats_of(fmt)
    options = dict(settings or {})
    options.pop("output_mode", None)
    options = {k: v for k, v in AmgSettings(**options).validate().to_dict().items() if k != "output_mode"}
    if ray is not None:
        check_address(ray.address)
        import_ray()
    items = list_items(sources, recursive)  # missing sources and checkpoints fail here, before Ray starts
    path = resolve_checkpoint(checkpoint)
    sinks.check_run(out, {"settings": options, "format": fmt}, write=False)  # the model is checked once hashed

    def prepare():
        model_id = f"{file_sha256(path)[:16]}-{mode}"
        sinks.make_dirs(out)
        sinks.check_run(out, {"model": model_id, "settings": options, "format": fmt})
        done = sinks.done_ids(out, formats)
        return model_id, done, _driver_model(ray, path, mode, len(items) - len(done))

    with _session(ray, prepare, timings) as (model_id, done, model):
        todo = [i for i in items if i.id not in done]
        job = EverythingJob(_spec(ray, model, path, mode, device, threads, timings), out, sorted(formats), options,
                            model_id, before_image)
        del model  # the object store holds it now
        size = batch_size or (ray.batch_size if ray is not None else 4)
        if ray is not None:
            ray.batch_size = size
        summary = _run(EverythingWorker, job, todo, len(items) - len(todo), ray, size, progress, "everything",
                       timings)
    timings["total"] = time.time() - begin
    sinks.write_summary(out, summary.to_dict())
    return summary


def run_embed(
    sources: Sequence[str], checkpoint: str, data_dir: str, *, mode: str = "exact", device: str = "cpu",
    ray: Optional[RayOptions] = None, batch_size: Optional[int] = None, recursive: bool = False,
    progress: bool = True, threads: int = 0, before_image: Optional[Callable[[str], None]] = None,
) -> Summary:
    """Precompute the annotation server's embedding cache (<data>/embeddings/<model key>/) for `sources`."""
    from ..io.embedding_cache import cache_dir, model_key
    from ..io.models import resolve_checkpoint

    begin = time.time()
    timings: Dict[str, float] = {}
    if mode not in ("exact", "fast"):
        raise ValueError(f"mode must be exact or fast, got {mode!r}")
    if ray is not None:
        check_address(ray.address)
        import_ray()
    items = list_items(sources, recursive)
    path = resolve_checkpoint(checkpoint)

    def prepare():
        directory = cache_dir(data_dir, model_key(path, mode))  # model_key hashes the checkpoint
        if not sinks.is_url(str(data_dir)):
            directory.mkdir(parents=True, exist_ok=True)
        return directory, _driver_model(ray, path, mode, len(items))

    with _session(ray, prepare, timings) as (directory, model):
        job = EmbedJob(_spec(ray, model, path, mode, device, threads, timings), str(directory), before_image)
        del model
        size = batch_size or (ray.batch_size if ray is not None else 4)
        if ray is not None:
            ray.batch_size = size
        summary = _run(EmbedWorker, job, items, 0, ray, size, progress, "embed", timings)
    timings["total"] = time.time() - begin
    return summary


def summary_json(summary: Summary) -> str:
    return json.dumps(summary.to_dict(), indent=1)
