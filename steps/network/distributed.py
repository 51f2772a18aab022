"""Training on several workers with TensorFlow's own collectives (``MultiWorkerMirroredStrategy``).

The cluster is TensorFlow's ``TF_CONFIG`` (one entry per machine), or ``train.workers`` > 1 on one
machine, where the chief starts the others on 127.0.0.1 (``start_local_workers``). Worker 0 is the
chief: the only one that writes to MLflow. The others decode the same data, train, wait for the
chief between sets, and exit with its status (``Session.sync``).

Keras 3.15's ``fit`` fails under this strategy (keras-team/keras#20585: ``PerReplica`` values reach
``convert_to_eager_tensor``), so ``fit_distributed`` is a loop of its own around the same network,
optimizer, loss, learning-rate schedule and early stopping as ``steps.network.training.fit``. Each
step's global batch is split between the workers (``steps.datasets.batches.shard_batches``); the
gradients and the batch-norm statistics are summed over them, so a step is the one a single process
takes on that global batch, dropout masks aside (each worker draws its own).

Every collective has a deadline, ``train.worker_timeout``. TensorFlow's heartbeats notice a worker
that died or stopped within about ten seconds; one that hangs fails the others at the deadline.
Either way the failure is one line (``WorkerError``, exit 7), and the chief's run ends FAILED. A
cluster that never forms is killed by a watchdog process after the timeout (``_deadline``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from steps.core.config import PROJECT_DIR, Config, ConfigError, HParams
from steps.core.errors import WorkerError
from steps.datasets.batches import image_batches, shard_batches
from steps.datasets.stored import Rows, as_rows

logger = logging.getLogger(__name__)

# The chief hands its resolved configuration to the workers it starts (as JSON): they train exactly its sets.
CONFIG_ENV = "DEFECT_WORKER_CONFIG"
# Seconds the chief gives its local workers to exit after it failed, before it kills them.
FAILED_GRACE = 5.0
# The collectives' own failures: a peer gone (Unavailable, Aborted), or past the deadline.
LOST = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
        tf.errors.CancelledError, tf.errors.InternalError)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The workers' addresses (``host:port``) and which of them this process is."""

    workers: tuple[str, ...]
    index: int

    @property
    def chief(self) -> bool:
        return self.index == 0

    def tf_config(self, index: int | None = None) -> str:
        task = self.index if index is None else index
        return json.dumps({"cluster": {"worker": list(self.workers)}, "task": {"type": "worker", "index": task}})


def from_tf_config(text: str) -> Cluster:
    """The cluster ``TF_CONFIG`` describes, or a ``ConfigError`` saying what is wrong with it."""
    try:
        spec = json.loads(text)
        workers, task = spec["cluster"]["worker"], spec["task"]
        jobs = set(spec["cluster"]) - {"worker"}
        index = task["index"]
    except (ValueError, KeyError, TypeError) as err:
        shape = "{'cluster': {'worker': [host:port, ...]}, 'task': {'type': 'worker', 'index': i}}"
        raise ConfigError("TF_CONFIG", f"expected {shape}, got {text[:200]!r} ({type(err).__name__}: {err})") from None
    if jobs or task.get("type") != "worker":
        raise ConfigError("TF_CONFIG", f"only 'worker' tasks are used (worker 0 is the chief), got jobs "
                          f"{sorted(spec['cluster'])} and task type {task.get('type')!r}")  # fmt: skip
    if not isinstance(workers, list) or not workers or not all(isinstance(w, str) and ":" in w for w in workers):
        raise ConfigError("TF_CONFIG", f"cluster.worker must list host:port addresses, got {workers!r}")
    if not isinstance(index, int) or not 0 <= index < len(workers):
        raise ConfigError("TF_CONFIG", f"task.index must be in [0, {len(workers) - 1}], got {index!r}")
    return Cluster(tuple(workers), index)


def resolve(config: Config, environ: Mapping[str, str] = os.environ) -> Cluster | None:
    """This process's cluster: ``TF_CONFIG``'s, or ``train.workers`` local ones (this one the chief);
    None for one worker, which trains exactly as without this module."""
    text = environ.get("TF_CONFIG", "")
    cluster = _resolve(config, text)
    if cluster is None:
        return None
    # What a worker's fit loop does not do: (field, what it does).
    unsupported = (("ema", "keeps an average of its weights"), ("start_size", "trains its first epochs smaller"))
    for field, does in unsupported:
        sets = [name for name, hp in config.selected_hparams().items() if getattr(hp, field)]
        if sets:
            raise ConfigError(
                "train.hparams",
                f"set {', '.join(map(repr, sets))} {does} ({field}), which training on {len(cluster.workers)} "
                f"workers does not; train it on one, or set its {field} to 0",
            )
    return cluster


def _resolve(config: Config, text: str) -> Cluster | None:
    if text:
        if config.train.workers > 1:
            raise ConfigError(
                "train.workers",
                f"{config.train.workers} with TF_CONFIG set: TF_CONFIG names the workers of a cluster, "
                "train.workers starts local ones; give one or the other",
            )
        cluster = from_tf_config(text)
        return cluster if len(cluster.workers) > 1 else None
    if config.train.workers == 1:
        return None
    return Cluster(tuple(f"127.0.0.1:{port}" for port in free_ports(config.train.workers)), 0)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Session:
    """This process's part of the cluster: the strategy, and the chief's word to the others."""

    def __init__(self, cluster: Cluster, timeout: float) -> None:
        self.cluster = cluster
        self.timeout = timeout
        os.environ["TF_CONFIG"] = cluster.tf_config()
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
        with _deadline(timeout, f"worker {cluster.index}: the {len(cluster.workers)} workers did not all join "
                       f"{', '.join(cluster.workers)} within {timeout:.0f} s (train.worker_timeout)"):  # fmt: skip
            self.strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
            self.sum(0.0)  # every worker is up, and the collectives work
        logger.info("worker %d of %d joined %s", cluster.index, len(cluster.workers), ", ".join(cluster.workers))

    # True from the end of a set's training to the next sync: the other workers wait there for the chief.
    waiting = False

    def sum(self, value: float) -> float:
        """``value`` summed over the workers: every worker must call it, in the same order."""
        with lost_worker(self.cluster, "waiting for the others"):
            total = self.strategy.run(lambda: tf.constant(value, tf.float32))
            return float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, total, axis=None))

    def sync(self, status: int = 0) -> int:
        """Wait for every worker; return the chief's ``status`` (0: go on), which the others exit with."""
        total = self.sum(float(status) if self.cluster.chief else 0.0)
        self.waiting = False
        return int(total)


# A process apart: TensorFlow joins the cluster in C++ without a limit, holding the interpreter, so
# neither a thread nor a signal handler of this process gets to run until it returns.
_WATCHDOG = """
import os, select, signal, sys
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
if not select.select([sys.stdin], [], [], seconds)[0]:
    sys.stderr.write("error: " + message + "\\n")
    sys.stderr.flush()
    os.kill(pid, signal.SIGKILL)
"""


@contextlib.contextmanager
def _deadline(seconds: float, message: str) -> Iterator[None]:
    """Kill this process with ``message`` (one line on stderr) if the block has not ended within ``seconds``."""
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message],
                                stdin=subprocess.PIPE)  # fmt: skip
    try:
        yield
    finally:
        assert watchdog.stdin is not None
        watchdog.stdin.close()  # the watchdog reads the end of its input and leaves
        watchdog.wait()


@contextlib.contextmanager
def lost_worker(cluster: Cluster, doing: str) -> Iterator[None]:
    """A collective's failure as one line: which worker saw it, while doing what, and why."""
    try:
        yield
    except LOST as err:
        reason = (getattr(err, "message", "") or str(err)).strip().splitlines()
        why = next((line.strip() for line in reason if "aborted" in line or "timed out" in line or "reset" in line),
                   reason[0].strip() if reason else type(err).__name__)  # fmt: skip
        raise WorkerError(
            f"worker {cluster.index} of {len(cluster.workers)} lost the others while {doing} "
            f"({type(err).__name__}: {why[:200]}); every worker stops: start them all again"
        ) from None


def start_local_workers(cluster: Cluster, config: Config) -> list[subprocess.Popen]:
    """Workers 1..N-1 of a local cluster, as ``python -m steps.train`` with their ``TF_CONFIG`` and the
    chief's configuration; they log to this process's stderr and write nothing to MLflow."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    # The chief's configuration, but the cluster is the TF_CONFIG each gets.
    env[CONFIG_ENV] = json.dumps(
        dataclasses.replace(config, train=dataclasses.replace(config.train, workers=1)).as_dict()
    )
    started = []
    for index in range(1, len(cluster.workers)):
        process = subprocess.Popen(
            [sys.executable, "-m", "steps.train"], cwd=PROJECT_DIR, env={**env, "TF_CONFIG": cluster.tf_config(index)}
        )
        logger.info("started worker %d of %d (pid %d) at %s", index, len(cluster.workers), process.pid,
                    cluster.workers[index])  # fmt: skip
        started.append(process)
    return started


def stop_local_workers(processes: Sequence[subprocess.Popen], timeout: float) -> None:
    """Wait for the workers to exit after the chief's last word; kill those that do not (a worker
    blocked in a collective does not give way to SIGTERM)."""
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("worker pid %d still running %.0f s after the chief's end: killed", process.pid, timeout)
            process.kill()
            process.wait()


def _batch_norms(model: keras.Model) -> Iterator[keras.layers.BatchNormalization]:
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            yield layer


def fit_distributed(
    session: Session,
    hp: HParams,
    seed: int,
    precision: str,
    train_xy: tuple[np.ndarray | Rows, np.ndarray],
    val_xy: tuple[np.ndarray | Rows, np.ndarray],
    eval_batch_size: int,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> tuple[keras.Model, int, int]:
    """``steps.network.training.fit`` on the cluster: the same return, on every worker the same weights.

    Each epoch's ``loss`` and ``accuracy`` (training) and ``val_loss`` and ``val_accuracy`` are the
    cluster's, summed over the workers' parts, as ``fit`` reports them for the whole batch and split."""
    from steps.network.model import make_model, schedule, set_seed
    from steps.network.training import StopOnSignal, early_stopping

    strategy, cluster = session.strategy, session.cluster
    set_seed(seed)
    keras.mixed_precision.set_global_policy(precision)
    try:
        with strategy.scope():
            model = make_model(hp, seed)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    for layer in _batch_norms(model):
        layer.synchronized = True  # the statistics of the global batch, as one process computes them
    loss_fn = keras.losses.BinaryCrossentropy(label_smoothing=hp.label_smoothing, reduction="none")
    optimizer = model.optimizer
    n = len(train_xy[1])
    steps = max(1, math.ceil(n / hp.batch_size))

    def shard(context: tf.distribute.InputContext) -> tf.data.Dataset:
        part = (context.input_pipeline_id, context.num_input_pipelines)
        return shard_batches(*train_xy, hp.batch_size, seed, hp.augment, part)[0]

    batches = iter(strategy.distribute_datasets_from_function(shard))

    def replica_step(x: tf.Tensor, y: tf.Tensor, total: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            prob = model(x, training=True)
            per_image = loss_fn(y[:, None], prob)
            loss = tf.reduce_sum(per_image) / tf.cast(total, per_image.dtype)  # the global batch's mean
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))  # summed over the workers
        return _sums(y, prob, per_image)

    @tf.function
    def train_step(x: tf.Tensor, y: tf.Tensor, total: tf.Tensor) -> tf.Tensor:
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=(x, y, total)), axis=None)

    val_images, val_labels = as_rows(val_xy[0]), np.asarray(val_xy[1], np.float32)
    mine = np.arange(cluster.index, len(val_labels), len(cluster.workers))
    val_batches = image_batches(val_images.take(mine), eval_batch_size)
    val_loss_fn = keras.losses.BinaryCrossentropy(label_smoothing=hp.label_smoothing, reduction="none")

    @tf.function
    def predict(x: tf.Tensor) -> tf.Tensor:
        return model(x, training=False)

    def validate() -> tuple[float, float]:
        prob = np.concatenate([predict(x).numpy() for x in val_batches]) if len(mine) else np.zeros((0, 1))
        y = tf.constant(val_labels[mine])
        local = _sums(y, tf.constant(prob, tf.float32), val_loss_fn(y[:, None], prob)).numpy()
        loss, correct, count = (session.sum(float(v)) for v in local)
        return loss / max(count, 1.0), correct / max(count, 1.0)

    best = early_stopping(hp)
    every = [StopOnSignal(), schedule(hp), *callbacks, best]
    for callback in every:
        callback.set_model(model)
        callback.on_train_begin()
    logger.info("training on worker %d of %d (%s, %d steps an epoch): %s", cluster.index, len(cluster.workers),
                precision, steps, hp)  # fmt: skip
    epochs_run = 0
    with lost_worker(cluster, f"training {hp.arch}"):
        for epoch in range(hp.epochs):
            for callback in every:
                callback.on_epoch_begin(epoch)
            totals = np.zeros(3)
            for step in range(steps):
                totals += train_step(*next(batches)).numpy()
                for callback in every:
                    callback.on_train_batch_end(step)
            val_loss, val_accuracy = validate()
            logs = {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2],
                    "val_loss": val_loss, "val_accuracy": val_accuracy}  # fmt: skip
            logger.info("worker %d epoch %d: %s", cluster.index, epoch + 1,
                        " ".join(f"{k}={v:.4f}" for k, v in logs.items()))  # fmt: skip
            epochs_run += 1
            for callback in every:
                callback.on_epoch_end(epoch, logs)
            if model.stop_training:
                break
        for callback in every:
            callback.on_train_end()
    # Scored, logged and exported outside the strategy: a plain float32 network with these weights.
    plain = make_model(hp, seed)
    plain.set_weights(model.get_weights())
    logger.info("worker %d: %s trained, weights %s", cluster.index, hp.arch, weights_digest(plain))
    session.waiting = True
    return plain, best.best_epoch + 1, epochs_run


def _sums(y: tf.Tensor, prob: tf.Tensor, per_image: tf.Tensor) -> tf.Tensor:
    """``[loss sum, correct, images]`` of a part of a batch (accuracy as Keras's at 0.5)."""
    y = tf.cast(y, tf.float32)
    hit = tf.cast(tf.equal(y, tf.cast(tf.reshape(prob, [-1]) > 0.5, tf.float32)), tf.float32)
    count = tf.cast(tf.shape(y)[0], tf.float32)
    return tf.stack([tf.reduce_sum(tf.cast(per_image, tf.float32)), tf.reduce_sum(hit), count])


def weights_digest(model: keras.Model) -> str:
    """A short digest of a network's weights, to show in the log that the workers agree."""
    import hashlib

    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def is_worker(environ: Mapping[str, str]) -> bool:
    """Whether ``TF_CONFIG`` makes this process a worker other than the chief (``train`` refuses a malformed one)."""
    try:
        return bool(environ.get("TF_CONFIG")) and not from_tf_config(environ["TF_CONFIG"]).chief
    except ConfigError:
        return False


def worker_config() -> dict[str, Any] | None:
    """The configuration a chief handed to this worker, if it started it."""
    text = os.environ.get(CONFIG_ENV)
    return json.loads(text) if text else None
