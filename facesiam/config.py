"""Typed training configuration: dataclasses with a docstring per field, YAML files and command-line overrides.

One YAML per experiment lives in ``launch/configs/``. Sections mirror the dataclasses below (``model``,
``augment``, ``loss``, ``optim``; everything else is top level). Every field is also a command-line flag
(``embedding_dim`` -> ``--embedding-dim``), so field names are unique across sections. Unknown keys are
errors, never silently ignored: a typo in an experiment file must not train the wrong model for a day.

Fields that name a pluggable part (loss, miner, optimizer, scheduler, best_metric) are checked against the registry
beside the code that builds it (``REGISTRIES``; facesiam/registry.py), and the chosen entry checks the fields it
uses; plain enums are ``Literal`` annotations. ``CHOICES`` lists both for --help.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import InputError
from .fileio import write_text
from .losses import LOSSES, MINERS, loss_defaults, resolve_loss_defaults
from .optim import OPTIMIZERS, SCHEDULERS
from .registry import Registry
from .selection import SELECTION_METRICS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """What is needed to rebuild the embedding network (exported with ``best/``)."""

    backbone: str = "tf_efficientnetv2_b0"
    """A face backbone of facesiam/backbones (iresnet18/34/50/100/200, mobilefacenet: arcface_torch's networks, 112 px;
    ``--pretrained`` takes their backbone.pth) or any timm model name (its classifier removed, ``num_classes=0``, its
    pooled features feed the head)."""
    embedding_dim: int = 512
    """Size of the L2-normalised embedding."""
    head: Literal["linear", "face"] = "linear"
    """``linear`` (the seed article's Linear) or ``face`` (BN -> Dropout -> Linear -> BN, as in arcface_torch)."""
    dropout: float = 0.0
    """Dropout before the head's Linear (``face`` head only)."""
    pretrained: str = "none"
    """``none`` (random init), ``hub`` (timm's weights, needs the network), a local .safetensors/.pth file of trunk
    weights, or a facesiam export directory (RUN/best, e.g. a distilled student: trunk, and head when it fits)."""
    image_size: int = 224
    """Square input size in pixels, for training and inference."""
    center_crop: Optional[float] = None
    """Fraction of the shorter side kept around the centre before resizing (LFW: 0.6); None keeps all."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel normalisation mean."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel normalisation standard deviation."""


@dataclass
class AugmentConfig:
    """Training augmentations (the seed article's by default); 0 disables a stage."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    """RandomResizedCrop area range."""
    rotation: float = 15.0
    """RandomRotation range in degrees (±)."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    color_jitter: float = 0.2
    """ColorJitter strength for brightness, contrast and saturation."""
    augment_implementation: Literal["torchvision", "fused"] = "fused"
    """fused (the same random parameters as the reference, one OpenCV warp for flip + rotation + crop, one colour
    matrix, JPEGs decoded reduced when the crop allows: more images/s per loader core, see docs/benchmarks.md,
    "Training data path"; augment/fused.py)
    or torchvision (the reference: PIL stages one after another; the experiment YAMLs of docs/results.md pin it)."""
    augment_device: Literal["loader", "cuda", "cpu"] = "loader"
    """Where the fused augmentation runs. loader: per image in the DataLoader workers. cuda: the workers only decode
    and draw each sample's parameters (seeded as in the loader: resume stays exact); flip, rotation, crop and colour
    run on the whole batch on the training GPU (augment/batch.py), for when CPU cores are short. cpu: that
    batched code on the CPU, in the training process (tests, machines without a GPU)."""


@dataclass
class LossConfig:
    """The metric-learning loss, built from pytorch-metric-learning parts."""

    loss: str = "triplet"
    """A pair loss (sees the global batch) or a margin classification loss (trained class centres); losses.LOSSES."""
    margin: Optional[float] = None
    """The loss's margin, in that loss's unit; None takes the chosen loss's own default (listed in --help, resolved into
    RUN/config.yaml with its unit). ArcFace margins are in degrees, as in PML (28.6 deg = 0.5 rad)."""
    scale: Optional[float] = None
    """Logit scale of the margin classification losses; None takes the chosen loss's own default (64)."""
    subcenters: int = 3
    """Sub-centres per class for subcenter_arcface."""
    distance: Literal["cosine", "euclidean"] = "cosine"
    """Distance for pair losses: cosine (CosineSimilarity) or euclidean (LpDistance on normalised embeddings)."""
    miner: str = "none"
    """Which pairs/triplets the pair loss trains on (losses.MINERS)."""
    pair_loss: str = "none"
    """none, or a pair loss (PML's default margins, loss.miner) added to a margin classification loss; the two are
    summed."""
    pair_loss_weight: float = 1.0
    """Weight of pair_loss in the sum."""
    class_lr_mult: float = 1.0
    """Learning-rate multiplier for the class centres of margin losses."""
    init_centres: Literal["random", "imprint"] = "random"
    """random or imprint: start each class centre of a margin loss at the mean direction of its training images'
    embeddings (one forward pass over the train split before step 0, weight imprinting), so a pretrained trunk
    is fine-tuned towards meaningful centres from the first step instead of towards random ones."""
    partial_fc: float = 0.0
    """0: every rank holds every class centre (data parallel). RATE in (0, 1]: Partial FC (facesiam/partial_fc.py):
    each of W ranks holds 1/W of the centres and their optimizer state, and each step uses every positive centre of
    the global batch plus this share of the others (1.0: all, sharded; 0.1: a tenth). For margin losses; what lets
    millions of identities train on many GPUs."""


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    optimizer: str = "adamw"
    """The optimizer (optim.OPTIMIZERS)."""
    lr: float = 1e-4
    """Peak learning rate."""
    trunk_lr_mult: float = 1.0
    """Learning-rate multiplier for the timm trunk (e.g. 0.1-0.3 to keep a pretrained trunk's features while the
    new head and class centres learn at the full lr)."""
    trunk_frozen_steps: int = 0
    """Hold the trunk's lr at 0 for this many steps, then warm it up over warmup_steps (cosine/constant schedules):
    the head and class centres first learn on the pretrained features, and the trunk is then fine-tuned towards
    trained centres instead of random ones (linear probe, then fine-tune)."""
    weight_decay: float = 1e-5
    """Decoupled (AdamW) or L2 (SGD) weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """SGD: Nesterov momentum (false: plain momentum, as arcface_torch's recipes)."""
    poly_power: float = 2.0
    """poly: the decay's power (arcface_torch's PolyScheduler: 2; its later PolynomialLRWarmup: 1)."""
    scheduler: str = "cosine_epoch"
    """The learning-rate schedule (optim.SCHEDULERS); a schedule-free optimizer gets none."""
    t_max: int = 50
    """cosine_epoch: epochs of one cosine half-period."""
    eta_min: float = 1e-6
    """Lowest learning rate of the cosine schedules."""
    warmup_steps: int = 0
    """Linear warm-up steps (cosine and constant schedules)."""
    cooldown_steps: int = 0
    """constant: anneal linearly to eta_min over the run's last this-many steps (warmup-stable-decay, Hägele et al.
    2024): the lr stays at its peak for most of the run and still ends annealed; 0 keeps it constant to the end."""
    step_size: int = 10
    """step: epochs between decays."""
    gamma: float = 0.1
    """step/plateau: decay factor."""
    patience: int = 2
    """plateau: validations without improvement before decaying."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the embedding network's weights (timm's ModelEmaV3, with its decay
    warm-up, so short runs average over a window that grows with the run) and validate and export it instead of the
    live weights; e.g. 0.999. 0 disables."""
    clip_grad: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still measured)."""


@dataclass
class DistillConfig:
    """Distillation from a face teacher (facesiam/distill.py): set ``teacher`` and the run learns to reproduce the
    teacher's embedding of each training photo instead of a metric loss on labels (the ``loss`` section is unused
    unless ``label_weight`` adds it).

    The teacher embeds each photo once; the result is cached (training/teacher_pass.py) in SHARDS/teacher-cache/ for
    local shards this process may write, else (shards at s3://, gs://, https://, or a read-only folder) in
    ``$FACESIAM_CACHE/teacher-cache/`` (default ~/.cache/facesiam/; point it beside the run, or with several nodes at
    a folder they all see), keyed by the teacher, the shards and, there, the shards' location and index."""

    teacher: Optional[str] = None
    """None: a metric-learning run. ``dlib`` (dlib's ResNet face descriptor, pip install 'facesiam[teacher-dlib]') or
    ``onnx:PATH`` (any ONNX face embedder; a facesiam export configures itself)."""
    teacher_size: Optional[int] = None
    """Input size of an ONNX teacher that is not a facesiam export."""
    teacher_mean: Optional[tuple[float, float, float]] = None
    """Per-channel mean of an ONNX teacher that is not a facesiam export (RGB in [0, 1])."""
    teacher_std: Optional[tuple[float, float, float]] = None
    """Per-channel standard deviation of an ONNX teacher that is not a facesiam export."""
    teacher_align: Literal["auto", "arcface112", "none"] = "auto"
    """How an ONNX teacher wants its faces: arcface112 (5 points onto the ArcFace template at teacher_size), none
    (the whole photo resized), or auto (what a facesiam export's metadata says; other ONNX files must choose)."""
    teacher_source: Literal["auto", "originals", "shards"] = "auto"
    """Photos the teacher embeds. originals: the raw photos that aligned shards were made from (dataset.json records
    their folder and each one's landmarks: the teacher preprocesses them its own way). shards: the stored images.
    auto: originals when the shards are aligned and their source folder is there, else the stored images."""
    teacher_batch_size: int = 32
    """Photos per teacher call in the (cached, once per data set) teacher pass."""
    teacher_mirror: bool = False
    """The teacher embeds each photo and its mirror image, the target being their sum (faces/teachers.py
    MirroredTeacher): the teacher's own flip-averaged embedding, one more network pass per photo (no second
    detection), a cache of its own. A better target at equal steps; not fit's default, whose budget would pay the
    longer pass with training steps (measured in docs/results.md, "A teacher that sees each face twice")."""
    center_targets: bool = True
    """Subtract the mean teacher embedding of the training photos from every target before normalising. Face
    descriptors share a large common direction (dlib's on LFW: the mean has norm 0.91, two different people score
    cosine 0.83 +- 0.03), so a student that learnt only that direction would already score cosine 0.91; centred,
    different people score ~0 +- 0.17 and the loss sees the part that tells people apart."""
    relational_weight: float = 0.0
    """Weight of the relational term: the batch's student cosine-similarity matrix matched to the teacher's (mean
    squared difference); 0 disables it."""
    bank_weight: float = 0.0
    """Weight of the bank term (facesiam/distill.py): each photo's softmax similarity distribution over the teacher's
    embeddings of up to ``bank_size`` training photos, the student's matched to the teacher's (KL divergence, as in
    SEED): the teacher's geometry over the training set, where the relational term sees one batch; 0 disables it."""
    bank_temperature: float = 0.07
    """Temperature of the bank term's softmax over cosine similarities (lower: sharper, nearer the photo itself)."""
    bank_size: int = 16384
    """Training photos in the bank; past it, a fixed random subset (the same in every process and after a resume)."""
    label_weight: float = 0.0
    """Weight of the run's metric loss (the ``loss`` section) on the photos' labels, trained together with the
    distillation loss from the first step; 0: distillation alone, no labels used. A triplet loss needs
    m_per_class >= 2 (a positive in the batch)."""


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as RUN/config.yaml."""

    data: str = ""
    """Shard directory written by tools/make_shards.py."""
    output: str = ""
    """Run directory: checkpoints/, best/ (selected on val), final/ (last step), metrics.jsonl, tensorboard/, wandb/."""
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train_split: str = "train"
    """Split of the shards to train on."""
    val_split: str = "val"
    """Split used for validation (none: no validation); skipped with a warning when the shards lack it."""
    batch_size: int = 32
    """Images per process per step."""
    m_per_class: int = 4
    """Images of each identity in a batch (batch_size must be a multiple)."""
    epochs: int = 50
    """Passes over the training split."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides epochs when reached first)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None
    """None: follow the launcher (``accelerate launch --config_file`` sets it: bf16 in accelerate_configs' GPU
    files; no launcher: no). no | bf16 | fp16 (fp16 only on CUDA; it uses a GradScaler) must agree with the launcher's
    when there is one. RUN/config.yaml records what ran."""
    seed: int = 0
    """Seeds weights, sampling order and every augmentation."""
    num_workers: int = 2
    """DataLoader worker processes per training process."""
    channels_last: bool = False
    """Use channels-last memory format (faster convolutions on GPUs with tensor cores)."""
    compile: bool = False
    """torch.compile the embedding network."""
    val_every_steps: int = 0
    """Also validate every N steps (0: only at each epoch end and at the end of training)."""
    val_batch_size: int = 128
    """Batch size for embedding the validation split."""
    val_bin: str = ""
    """Verification sets in insightface's .bin format, comma-separated (lfw.bin,cfp_fp.bin: aligned 112x112 pairs;
    tools/make_bin.py makes one of your own people), scored at every validation with the field's 10-fold protocol
    (eval/verification_bin.py) and logged as bin/NAME/accuracy; best_metric bin:NAME selects best/ by one. With no
    val split (e.g. a .rec source) validation runs on them alone."""
    best_metric: str = "tar_at_far_1e-03"
    """Validation metric that selects RUN/best, higher is better (selection.SELECTION_METRICS)."""
    checkpoint_every_steps: int = 0
    """Save a resumable checkpoint every N steps (0: only at epoch ends and when training stops)."""
    keep_checkpoints: int = 3
    """How many of the newest checkpoints to keep."""
    resume: Optional[str] = None
    """latest (newest in RUN/checkpoints) or a checkpoint directory."""
    log_every_steps: int = 10
    """Steps between metric logs."""
    max_nonfinite_steps: int = 20
    """Stop the run after this many consecutive steps with a non-finite loss or gradient."""
    collective_timeout: float = 600.0
    """Seconds a process waits for the others in one collective (the gradient all-reduce, a barrier) before the run
    stops with a one-line error naming the peer: a node that drops off the network ends the run (torchrun may then
    restart it) instead of hanging it for torch's default 30 minutes. A shorter network outage is ridden out. Raise
    it when rank 0 alone does something long while the others wait (a large val split, a slow checkpoint store)."""
    wandb: Optional[Literal["off", "offline", "online"]] = None
    """off | offline | online. None: $WANDB_MODE if set, else offline. Nothing is uploaded unless online."""
    wandb_project: str = "facesiam"
    """W&B project name."""
    tensorboard: bool = True
    """Write TensorBoard event files to RUN/tensorboard."""


SECTIONS = {"model": ModelConfig, "augment": AugmentConfig, "loss": LossConfig, "optim": OptimConfig,
            "distill": DistillConfig}


def _flag_fields() -> dict[str, tuple[Optional[str], dataclasses.Field]]:
    """Map every leaf field name to (section or None, field); names must be unique to be flags."""
    out: dict[str, tuple[Optional[str], dataclasses.Field]] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS:
            for sf in dataclasses.fields(SECTIONS[f.name]):
                assert sf.name not in out, f"duplicate config field name {sf.name}"
                out[sf.name] = (f.name, sf)
        else:
            assert f.name not in out, f"duplicate config field name {f.name}"
            out[f.name] = (None, f)
    return out


FLAG_FIELDS = _flag_fields()


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, with a clear error naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise InputError(f"config key '{where}': expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is Literal:
        if value not in args:
            raise InputError(f"config key '{where}' is {value!r}; choose one of {', '.join(map(str, args))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise InputError(f"config key '{where}': expected true/false, got {value!r}")
    try:
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise InputError
        return tp(value)
    except (TypeError, ValueError):
        raise InputError(f"config key '{where}': expected {tp.__name__}, got {value!r}") from None


def _apply(cfg: TrainConfig, values: dict[str, Any], source: str) -> None:
    """Apply a nested dict (YAML layout) onto cfg; unknown keys raise."""
    for key, value in values.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise InputError(f"{source}: section '{key}' must be a mapping")
            section = getattr(cfg, key)
            known = {f.name for f in dataclasses.fields(section)}
            for sk, sv in value.items():
                if sk not in known:
                    raise InputError(f"{source}: unknown key '{key}.{sk}' (known: {', '.join(sorted(known))})")
                setattr(section, sk, _coerce(sv, _field_type(type(section), sk), f"{key}.{sk}"))
        elif key in FLAG_FIELDS and FLAG_FIELDS[key][0] is None:
            setattr(cfg, key, _coerce(value, _field_type(TrainConfig, key), key))
        else:
            hint = f" (did you mean '{FLAG_FIELDS[key][0]}.{key}'?)" if key in FLAG_FIELDS else ""
            raise InputError(f"{source}: unknown key '{key}'{hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with a clear error when it is not a mapping."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config file must be a mapping of keys to values")
    return data


def field_docs() -> dict[str, str]:
    """The docstring under each dataclass field (for --help), read from this file's source."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(inspect.getmodule(field_docs)))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            body = node.body
            for a, b in zip(body, body[1:]):
                if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                        and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                    docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def config_from_overrides(config_file: Optional[str | Path], overrides: dict[str, Any]) -> TrainConfig:
    """Defaults <- the experiment YAML <- flat overrides ({"embedding_dim": 256, ...}: field names, as flags give them)."""
    cfg = TrainConfig()
    if config_file:
        _apply(cfg, load_yaml(config_file), str(config_file))
    nested: dict[str, Any] = {}
    for name, value in overrides.items():
        if name not in FLAG_FIELDS:
            raise InputError(f"unknown config field {name!r}")
        section = FLAG_FIELDS[name][0]
        if section:
            nested.setdefault(section, {})[name] = value
        else:
            nested[name] = value
    _apply(cfg, nested, "command line")
    validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from a nested dict (e.g. a saved RUN/config.yaml)."""
    cfg = TrainConfig()
    _apply(cfg, values, "config")
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML, JSON and trackers."""
    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config (atomically) so every run records exactly what it ran; a comment on top gives the
    units of the loss's margin and scale (they differ from loss to loss)."""
    units = "".join(f"# loss.{key} {getattr(cfg.loss, key):g}: {unit} ({cfg.loss.loss})\n"
                    for key, (_, unit) in loss_defaults(cfg.loss).items() if getattr(cfg.loss, key) is not None)
    write_text(path, units + yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


def loss_defaults_help(key: str) -> str:
    """For --help of --margin / --scale: every loss's own default with its unit."""
    parts = []
    for name in LOSSES.names():
        default = loss_defaults(LossConfig(loss=name)).get(key)
        if default is not None:
            parts.append(f"{name} {default[0]:g} ({default[1]})")
    return f"Defaults: {'; '.join(parts)}." if parts else ""


REGISTRIES: dict[str, Registry] = {
    "loss.loss": LOSSES,
    "loss.miner": MINERS,
    "optim.optimizer": OPTIMIZERS,
    "optim.scheduler": SCHEDULERS,
    "best_metric": SELECTION_METRICS,
}
"""Fields whose value names a registry entry; the chosen entry's check validates the fields it uses."""


def _literal_values(tp: Any) -> Optional[tuple]:
    """The allowed values of a Literal annotation (None first when it is Optional); None for any other type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        values = _literal_values(inner[0]) if len(inner) == 1 else None
        return None if values is None else (None,) + values
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _choices() -> dict[str, tuple]:
    """Every field with a closed set of values ('section.name' -> the values): registry names and Literals."""
    out: dict[str, tuple] = {key: registry.names() for key, registry in REGISTRIES.items()}
    out["loss.pair_loss"] = ("none",) + LOSSES.names(family="pair")
    for name, (section, _) in FLAG_FIELDS.items():
        values = _literal_values(_field_type(SECTIONS[section] if section else TrainConfig, name))
        if values is not None:
            out[f"{section}.{name}" if section else name] = values
    return out


CHOICES = _choices()
"""'section.name' -> allowed values, for --help; the registries and the Literal annotations are the source."""


def _value(cfg: TrainConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: TrainConfig) -> None:
    """Check values that would otherwise fail late (after data loading) or silently.

    Names of registry entries are looked up first (an unknown one is a one-line error listing the known ones), then
    each chosen entry checks the fields it uses; only rules that belong to no entry are here. Literal fields were
    checked when the values were read (_coerce).
    """
    entries = []
    for key, registry in REGISTRIES.items():
        try:
            entries.append(registry.get(_value(cfg, key)))
        except InputError as err:
            raise InputError(f"config key '{key}': {err}") from None
    cfg.loss = resolve_loss_defaults(cfg.loss)  # the loss's own margin and scale, recorded as values
    for entry in entries:
        if entry.check is not None:
            entry.check(cfg)
    if cfg.m_per_class < 1 or cfg.batch_size % cfg.m_per_class:
        raise InputError(f"batch_size ({cfg.batch_size}) must be a positive multiple of m_per_class ({cfg.m_per_class})")
    if not 0 <= cfg.optim.ema_decay < 1:
        raise InputError("optim.ema_decay must be in [0, 1) (0 disables the moving average)")
    if cfg.grad_accum_steps < 1:
        raise InputError("grad_accum_steps must be >= 1")
    d = cfg.distill
    if d.relational_weight < 0:
        raise InputError("distill.relational_weight must be >= 0")
    if d.teacher_batch_size < 1:
        raise InputError("distill.teacher_batch_size must be >= 1")
    if d.bank_weight < 0 or d.bank_temperature <= 0 or d.bank_size < 1:
        raise InputError(f"distill.bank_weight must be >= 0, bank_temperature > 0 and bank_size >= 1 (got "
                         f"{d.bank_weight}, {d.bank_temperature}, {d.bank_size})")
    if d.teacher is not None and cfg.loss.init_centres == "imprint":
        raise InputError("loss.init_centres imprint has no class centres to imprint in a distillation run "
                         "(distill.teacher is set); drop one of them")
    if d.label_weight < 0:
        raise InputError("distill.label_weight must be >= 0")
    if d.label_weight and d.teacher is None:
        raise InputError("distill.label_weight adds the label loss to a distillation run: set distill.teacher, or "
                         "drop label_weight for a metric-learning run")
    if d.label_weight and d.teacher is not None:
        if LOSSES.get(cfg.loss.loss).info["family"] == "pair" and cfg.m_per_class < 2:
            raise InputError(f"distill.label_weight with the {cfg.loss.loss} loss needs positives in the batch: set "
                             f"--m-per-class 2 or more (now {cfg.m_per_class})")
        if cfg.loss.partial_fc:
            raise InputError("distill.label_weight does not combine with loss.partial_fc; use a full margin loss")
    if not cfg.collective_timeout > 0:
        raise InputError(f"collective_timeout must be a positive number of seconds (got {cfg.collective_timeout})")
    if cfg.model.center_crop is not None and not 0 < cfg.model.center_crop <= 1:
        raise InputError("model.center_crop must be in (0, 1]")
