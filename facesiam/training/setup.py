"""Everything the loop needs, built from a TrainConfig: the accelerator, data (datasets, sampler, loader), the
learner (embedding model + criterion), the run's length in steps and the imprinted class centres (the optimizer and
its schedule: facesiam/optim.py).

The loop (training/loop.py) only wires these together; nothing here runs a training step.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..config import DistillConfig, TrainConfig
from ..augment.transforms import build_eval_transform, build_train_transform
from ..data import DistributedPerClassSampler, RecordDataset, ShardDataset
from ..data.recordio import is_record_folder
from ..augment.batch import DeferredTrainTransform, ModelInput, collate
from ..data.format import METADATA_FILE, read_metadata
from ..data.remote import is_remote
from ..device import resolve_device
from ..distill import DistillCriterion
from ..errors import InputError
from ..eval.embed import LOADER_TIMEOUT
from ..losses import Criterion
from ..model import EmbeddingModel, batch_statistics, build_model
from ..partial_fc import exclude_from_ddp

log = logging.getLogger("facesiam.train")

Batch = tuple[torch.Tensor, torch.Tensor]


class MetricLearner(nn.Module):
    """The module handed to DDP: embedding model + criterion, so class centres are synchronised like weights."""

    def __init__(self, model: EmbeddingModel, criterion: Criterion | DistillCriterion):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.model(images)
        # Losses in fp32: margins of 0.1 in cosine and logit scales of 64 do not survive bf16/fp16.
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.criterion(embeddings.float(), labels)


LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"  # what `accelerate launch --config_file X` sets from X


def resolve_precision(cfg: TrainConfig) -> str:
    """The run's precision, with one source of truth: the launcher's unless the config names one, and then the two
    must agree (Accelerate itself silently prefers the argument, so an 8-GPU bf16 launch config would train in fp32)."""
    launcher = os.environ.get(LAUNCHER_PRECISION) or None
    if cfg.mixed_precision is not None and launcher is not None and cfg.mixed_precision != launcher:
        raise InputError(f"mixed_precision {cfg.mixed_precision} in the run's config disagrees with the launcher's "
                         f"{launcher} ({LAUNCHER_PRECISION}, from accelerate launch --config_file); drop one of them "
                         f"or make them agree")
    return cfg.mixed_precision or launcher or "no"


def build_accelerator(cfg: TrainConfig):
    """Accelerate on CUDA when there is one, else CPU (gloo between processes); accumulation is the loop's own.

    cfg.mixed_precision is set to the precision that runs (resolve_precision), so RUN/config.yaml records it."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    use_cuda = resolve_device().type == "cuda"
    precision = resolve_precision(cfg)
    if precision == "fp16" and not use_cuda:
        raise InputError("mixed_precision fp16 needs CUDA (fp16 autocast does nothing on CPU); use bf16 or no")
    cfg.mixed_precision = precision
    # Every collective fails after collective_timeout, not torch's 30 minutes: a node gone from the network stops the
    # run with an error (loop.py names the peer) that torchrun sees, where it would otherwise hang.
    wait = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.collective_timeout))
    return Accelerator(cpu=not use_cuda, mixed_precision=precision, kwargs_handlers=[wait])


@dataclass
class TrainData:
    """The train split with its sampler and loader, and the (optional) validation split."""

    train: ShardDataset | RecordDataset
    val: Optional[ShardDataset]
    sampler: DistributedPerClassSampler
    loader: DataLoader
    accumulation: int
    model_input: ModelInput  # a loader batch -> the model's input on the device (augment/batch.py)
    alignment: Optional[dict] = None  # dataset.json's face alignment (detector, template, size), None: unaligned

    def close(self) -> None:
        """Stop the loader's persistent workers now, at the end of the run.

        They ignore SIGTERM (preemption.shield_loader_workers), and multiprocessing's exit handler ends daemonic
        children with SIGTERM and then joins them: left to it, a finished run would wait for them forever. torch
        has no public call for this; its iterator's own shutdown (what deleting the iterator runs) is used.
        """
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches of an epoch that make whole accumulation windows (a partial last window is dropped)."""
        return self.sampler.steps_per_epoch() // self.accumulation * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch // self.accumulation

    def steps_left(self, epoch: int, earlier: Sequence[Sequence[int]] = (), start_batch: int = 0) -> int:
        """Optimizer steps of the epoch from micro-batch ``start_batch`` (of its re-dealt rest after ``earlier``
        stretches on other world sizes: TrainState.earlier_stretches)."""
        self.sampler.set_epoch(epoch, start_step=start_batch, earlier=earlier)
        return (self.batches_per_epoch - start_batch) // self.accumulation

    def windows(self, epoch: int, start_batch: int = 0, earlier: Sequence[Sequence[int]] = ()
                ) -> Iterator[list[Batch]]:
        """The epoch's accumulation windows (lists of `accumulation` micro-batches), from micro-batch ``start_batch``
        (of the epoch's rest after ``earlier`` stretches on other world sizes, as in ``steps_left``).

        The sampler decides the batches from (seed, epoch, earlier, position) alone, so a resumed epoch continues
        exactly. With $FACESIAM_TRACE_SAMPLES set, each window's sample indices are appended to a file there first.
        """
        self.sampler.set_epoch(epoch, start_step=start_batch, earlier=earlier)
        trace = _sample_trace(self.sampler, epoch)
        window: list[Batch] = []
        left = self.batches_per_epoch - start_batch
        for position, batch in enumerate(self.loader, start_batch):
            if left <= 0:
                break  # the partial window at the epoch's end: never trained on
            window.append(batch)
            left -= 1
            if len(window) == self.accumulation:
                if trace is not None:
                    trace(range(position + 1 - len(window), position + 1))
                yield window
                window = []


TRACE_ENV = "FACESIAM_TRACE_SAMPLES"
"""A folder: each process appends the dataset indices of every window it trains on to a JSON-lines file there (a
check that an epoch trains on each sample once, elastic resizes included; off when unset)."""


def _sample_trace(sampler: DistributedPerClassSampler, epoch: int) -> Optional[Callable[[range], None]]:
    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return None
    path = Path(folder) / f"samples-{os.getpid()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    stretch = len(sampler.earlier)  # which stretch of the epoch (0 unless it was resized)

    def write(batches: range) -> None:
        indices = [i for b in batches for i in sampler.batch_indices(b)]
        record = {"epoch": epoch, "stretch": stretch, "world_size": sampler.num_replicas, "rank": sampler.rank,
                  "batches": [batches.start, batches.stop], "indices": indices}
        with open(path, "a", encoding="utf-8") as out:  # a line per window, flushed: a killed run keeps its lines
            out.write(json.dumps(record) + "\n")

    return write


def record_metadata(data: str) -> dict:
    """What build_data reads of dataset.json, for a RecordIO folder: one split, and the alignment insightface's data
    has (faces/record.recorded_alignment), so exported models detect and align raw photos as it was made."""
    from ..faces.record import recorded_alignment

    return {"splits": {"train": {}}, "alignment": {"info": recorded_alignment(data)}}


def build_data(cfg: TrainConfig, accelerator, *, loader_timeout: float = LOADER_TIMEOUT) -> TrainData:
    """Shards -> datasets (seeded augmentation), the distributed per-class sampler and the loader (with workers, one
    that delivers nothing for ``loader_timeout`` seconds is an error)."""
    record = not is_remote(cfg.data) and is_record_folder(cfg.data)  # insightface RecordIO, read directly
    if not (record or is_remote(cfg.data) or (Path(cfg.data) / METADATA_FILE).is_file()):  # URL: read_metadata says
        raise InputError(f"{Path(cfg.data) / METADATA_FILE} not found; make shards first: "
                         f"python tools/make_shards.py FACES/ {cfg.data}")
    m, a = cfg.model, cfg.augment
    meta = record_metadata(cfg.data) if record else read_metadata(cfg.data)
    if (meta.get("options") or {}).get("unlabeled"):
        if cfg.distill.teacher is None:
            raise InputError(f"{cfg.data} holds unlabelled photos (make_shards --unlabeled): a metric loss needs "
                             "identities; distil a teacher from them (--teacher dlib) or pack labelled folders")
        if cfg.m_per_class != 1:
            raise InputError(f"{cfg.data} holds unlabelled photos, each its own identity: set --m-per-class 1")
        if cfg.distill.label_weight:
            raise InputError(f"{cfg.data} holds unlabelled photos: distill.label_weight needs identities; set it to 0 "
                             "or pack labelled folders")
    alignment = (meta.get("alignment") or {}).get("info")
    if alignment and m.center_crop:
        log.warning("center_crop %.2f on faces aligned onto the template (%s/dataset.json) cuts into the face; "
                    "aligned data wants center_crop: null", m.center_crop, cfg.data)
    train_tf = build_train_transform(m.image_size, crop_scale=a.crop_scale, rotation=a.rotation, hflip=a.hflip,
                                     color_jitter=a.color_jitter, center_crop=m.center_crop, mean=m.mean, std=m.std,
                                     implementation=a.augment_implementation)
    if a.augment_device != "loader" and a.augment_implementation != "fused":
        raise InputError(f"augment_device {a.augment_device} runs the fused augmentation on the batch; "
                         f"set --augment-implementation fused (or --augment-device loader)")
    # Checked here, before any worker starts: cuda augmentation needs a CUDA training device.
    model_input = ModelInput(accelerator.device, mean=m.mean, std=m.std, image_size=m.image_size,
                             augment_device=a.augment_device, channels_last=cfg.channels_last)
    deferred = a.augment_device != "loader"
    train = (RecordDataset if record else ShardDataset)(cfg.data, cfg.train_split, transform=DeferredTrainTransform(
        train_tf) if deferred else train_tf)
    if a.augment_implementation == "fused":  # JPEGs decode reduced (1/2, 1/4, 1/8) while the crop allows,
        train.draft_size = train_tf.draft_size  # by OpenCV straight into the array the fused warp reads
        train.decode_array = True
    val = None
    if cfg.val_split in meta.get("splits", {}):
        val = ShardDataset(cfg.data, cfg.val_split, transform=build_eval_transform(
            m.image_size, center_crop=m.center_crop, mean=m.mean, std=m.std))
    elif cfg.val_split.lower() != "none":
        log.warning("no '%s' split in %s: no validation; best/ will hold the final model "
                    "(make shards with --val-identities to validate on held-out people)", cfg.val_split, cfg.data)
    sampler = DistributedPerClassSampler(train.labels, cfg.batch_size, cfg.m_per_class,
                                         num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                                         seed=cfg.seed)
    # The loader is not prepared by Accelerate: the sampler already shards batches across ranks and keeps its own
    # position. Its own generator: creating a loader iterator must not draw from the global RNG, or a resumed run
    # diverges. Persistent workers: a worker's open shards, connections and signed URLs (shards at a URL) last the
    # run instead of an epoch; every sample's augmentation is seeded by its key, never by the worker's RNG.
    loader = DataLoader(train, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=collate,
                        pin_memory=accelerator.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed), persistent_workers=cfg.num_workers > 0,
                        prefetch_factor=4 if cfg.num_workers else None,
                        timeout=loader_timeout if cfg.num_workers else 0)  # a dead worker raises, not hangs
    data = TrainData(train, val, sampler, loader, cfg.grad_accum_steps, model_input, alignment)
    if data.steps_per_epoch == 0:
        raise InputError(f"an epoch of {sampler.steps_per_epoch()} batches holds no whole accumulation window of "
                         f"{cfg.grad_accum_steps}; lower --grad-accum-steps or --batch-size")
    return data


@dataclass
class Distillation:
    """A distillation run's teacher targets: (embeddings N x D, found N bool) per split, row i = dataset index i."""

    teacher: str
    dim: int
    train: tuple[np.ndarray, np.ndarray]
    val: Optional[tuple[np.ndarray, np.ndarray]]
    labels: Optional[np.ndarray] = None
    """The training photos' identities (row i = dataset index i) when distill.label_weight adds the label loss."""


def distill_teacher(d: DistillConfig) -> Any:
    """The teacher a ``distill`` section names, with its preprocessing and mirror option (faces/teachers.py): the one
    place a config becomes a teacher (training, and fit's teacher pass and check, which fill the same cache)."""
    from ..faces.teachers import build_teacher

    return build_teacher(d.teacher, size=d.teacher_size, mean=d.teacher_mean, std=d.teacher_std,
                         align=None if d.teacher_align == "auto" else d.teacher_align, mirror=d.teacher_mirror)


def build_distillation(cfg: TrainConfig, accelerator, data: TrainData) -> Optional[Distillation]:
    """The teacher's embeddings of the train (and val) photos, from the cache beside the shards or computed once;
    None for a metric-learning run. The training split then yields sample indices instead of labels."""
    d = cfg.distill
    if d.teacher is None:
        return None
    from .teacher_pass import teacher_targets

    teacher = distill_teacher(d)
    options = dict(source=d.teacher_source, batch_size=d.teacher_batch_size, accelerator=accelerator)
    train = teacher_targets(cfg.data, cfg.train_split, teacher, **options)
    val = teacher_targets(cfg.data, cfg.val_split, teacher, **options) if data.val is not None else None
    if not train[1].any():
        raise InputError(f"teacher {teacher.name} found no face in any of the {len(train[1])} training photos of "
                         f"{cfg.data}; check the photos or the teacher's options (--teacher-align, --teacher-size)")
    if d.center_targets:  # the training photos' mean, for the val targets too (distill.center_targets)
        mean = train[0][train[1]].mean(axis=0)
        log.info("teacher targets centred: the training photos' mean teacher embedding (norm %.3f) subtracted",
                 float(np.linalg.norm(mean)))
        train, val = (train[0] - mean, train[1]), (None if val is None else (val[0] - mean, val[1]))
    data.train.return_index = True  # before the loader starts its workers: they pickle the dataset
    labels = np.asarray(data.train.labels) if d.label_weight else None
    return Distillation(teacher.name, teacher.dim, train, val, labels)


def build_learner(cfg: TrainConfig, num_classes: int, distillation: Optional[Distillation] = None,
                  device: torch.device | str = "cpu") -> MetricLearner:
    """The embedding model (random, hub, local or facesiam-checkpoint weights; channels-last, compiled as asked) and
    its criterion: the metric loss, or with a teacher the distillation loss (its targets on ``device``)."""
    model = build_model(cfg.model)  # fails here, before any training, when pretrained weights are unreachable
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model = torch.compile(model)
    if distillation is None:
        learner = MetricLearner(model, Criterion(cfg.loss, cfg.model.embedding_dim, num_classes=num_classes))
        if learner.criterion.partial is not None:  # each rank's centres differ: DDP must neither sync nor average them
            exclude_from_ddp(learner, learner.criterion.partial.ddp_ignored("criterion.loss"))
        return learner
    label_loss = None
    if cfg.distill.label_weight:
        label_loss = Criterion(cfg.loss, cfg.model.embedding_dim, num_classes=num_classes)
    criterion = DistillCriterion(cfg.model.embedding_dim, distillation.dim, cfg.distill.relational_weight,
                                 label_loss=label_loss, label_weight=cfg.distill.label_weight,
                                 bank_weight=cfg.distill.bank_weight, bank_temperature=cfg.distill.bank_temperature,
                                 bank_size=cfg.distill.bank_size)
    criterion.set_targets(*distillation.train, device=device)
    if distillation.labels is not None:
        criterion.set_labels(distillation.labels, device=device)
    return MetricLearner(model, criterion)


def total_steps(cfg: TrainConfig, steps_per_epoch: int, offset: int = 0) -> int:
    """Optimizer steps of the run: epochs x steps per epoch (+ ``offset``: TrainState.steps_offset after an elastic
    resize), or max_steps when that comes first."""
    steps = steps_per_epoch * cfg.epochs + offset
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def imprint_centres(accelerator, learner: MetricLearner, data: TrainData) -> None:
    """Start each class centre at its class's mean embedding over one epoch of the training batches.

    The embeddings are the ones the loss would see at step 0: the same sampler (epoch 0), augmentation and batch
    size, BatchNorm on batch statistics; batch statistics over a batch of P identities differ from running ones,
    which matters most for the face head's BatchNorm, still at its initial running averages here.
    """
    from tqdm.auto import tqdm

    t0 = time.time()
    chunks, labels = [], []
    loader, sampler, model_input = data.loader, data.sampler, data.model_input
    sampler.set_epoch(0)
    with batch_statistics(learner.model), torch.inference_mode(), accelerator.autocast():
        for images, batch_labels in tqdm(loader, desc="imprint centres", disable=not accelerator.is_main_process,
                                         leave=False):
            chunks.append(learner.model(model_input(images)).float())
            labels.append(batch_labels.to(accelerator.device))
    # Every rank has the same number of batches of the same size (the sampler guarantees it), so a plain gather.
    embeddings, labels = accelerator.gather(torch.cat(chunks)), accelerator.gather(torch.cat(labels))
    count = learner.criterion.imprint_centres(embeddings, labels)
    seconds = time.time() - t0
    log.info("imprinted the centres of %d classes from %d training images in %.1fs (%.1f img/s)", count,
             len(labels), seconds, len(labels) / max(seconds, 1e-9))
