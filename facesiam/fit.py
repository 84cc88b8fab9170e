"""facesiam fit: a folder of your own photos (one sub-folder per person, not cropped) to a served model, in stages.

    from facesiam.fit import fit
    summary = fit("PHOTOS", "RUN", minutes=60)      # or: facesiam fit PHOTOS --out RUN --minutes 60

Stages (facesiam/stages.py: each is skipped when done with the same inputs, continued when interrupted):
align + shards (held-out people for measuring) -> the teacher's pass (on every core) -> check (the doctor's report
from the alignment records and the teacher's cached embeddings; ``clean``: its suspects quarantined into
RUN/quarantine, undoable, and RUN/shards-clean written without them) -> plan (a throughput probe splits the time
budget into steps) -> distillation -> fine-tuning -> evaluation (RUN/report) -> ONNX export (+ a gallery) -> a
summary.

The recipe is RECIPE, the one definition (launch/configs/lfw_distill.yaml + lfw_finetune.yaml and docs/results.md:
distil dlib into EfficientNet-Lite0 from ImageNet, then fine-tune with the triplet loss); pass ``recipe=`` to
try another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .data.folder import available_cpus
from .errors import InputError
from .stages import Stage, StagedJob

log = logging.getLogger("facesiam.fit")

TEACHER_INSTALL = "pip install 'facesiam[teacher-dlib]'"
IMAGENET_INSTALL = "pip install 'facesiam[imagenet-lite0]'"
OPERATING_POINT = "far=1e-3"  # the strict point a deployed verifier uses (eval/compare.py's default)


def _recipe_stage(loss: Optional[dict], lr: float, warmup: int, m_per_class: int) -> dict:
    return {"model": {"backbone": "tf_efficientnet_lite0", "embedding_dim": 128, "head": "linear", "image_size": 112,
                      "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
            "augment": {"crop_scale": [0.9, 1.0], "rotation": 0.0, "hflip": 0.5, "color_jitter": 0.2},
            **({"loss": loss} if loss else {}),
            "optim": {"optimizer": "adamw", "lr": lr, "weight_decay": 1e-5, "scheduler": "cosine",
                      "warmup_steps": warmup, "eta_min": 1e-6},
            "batch_size": 32, "m_per_class": m_per_class, "channels_last": True}


@dataclass(frozen=True)
class Recipe:
    """What fit trains: TrainConfig values per training stage (steps, data, output and the teacher are fit's)."""

    distill: dict
    """The distillation stage (its ``distill`` section without the teacher)."""
    finetune: dict
    """Fine-tuning the distilled student on the user's people."""
    scratch: dict
    """Without a teacher: the metric-learning stage from ImageNet (or random) weights."""
    distill_share: float = 0.75
    """Fraction of the training time given to distillation (lfw_distill 1,800 steps : lfw_finetune 600)."""
    start: str = "imagenet-lite0"
    """The distillation's (or scratch run's) start: imagenet-lite0 (tools/convert_weights.py, when installed,
    else random init) or anything model.pretrained takes."""
    num_workers: int = 2
    """DataLoader workers of each training stage."""
    flip: bool = True
    """Embed each face with its mirror image (the sum, normalised) in the evaluation, the exported model.onnx that
    fit's serve command runs, and the gallery: on LFW's held-out people +0.024 TAR@FAR=1e-3 and +0.025 rank-1 for
    the same trained student, at twice the network's work per face (docs/results.md, "`facesiam fit` on LFW")."""

    def resized(self, image_size: int, batch_size: Optional[int] = None, **model: Any) -> "Recipe":
        """The same recipe at another input size (and batch size, other model fields): e.g. 64 px for a quick look
        on a CPU."""
        def one(stage: dict) -> dict:
            return {**stage, "model": {**stage["model"], "image_size": image_size, **model},
                    "batch_size": batch_size or stage["batch_size"]}

        return replace(self, distill=one(self.distill), finetune=one(self.finetune), scratch=one(self.scratch))


# launch/configs/lfw_distill.yaml + lfw_finetune.yaml (tests/commands/test_fit.py checks they agree).
RECIPE = Recipe(
    distill={**_recipe_stage(None, 1e-3, 100, 1),
             "distill": {"teacher_source": "auto", "center_targets": True, "relational_weight": 1.0,
                         "bank_weight": 1.0}},
    finetune=_recipe_stage({"loss": "triplet", "margin": 0.1, "distance": "cosine", "miner": "none"}, 5e-5, 50, 2),
    # lfw_aligned.yaml's triplet recipe (lr 2e-4) on the same student
    scratch=_recipe_stage({"loss": "triplet", "margin": 0.1, "distance": "cosine", "miner": "none"}, 2e-4, 60, 2),
)


# ------------------------------------------------------------------------------------------------- the budget

@dataclass(frozen=True)
class Probe:
    """Measured (or assumed) costs that the budget split needs, in seconds."""

    step_seconds: float
    """One training step of the recipe's batch (forward, backward, optimizer)."""
    embed_seconds: float
    """One image embedded (validation, evaluation)."""
    overhead_seconds: float = 20.0
    """Per training stage: building the model and loaders, checkpoints, exports."""


def split_steps(budget_seconds: float, spent_seconds: float, probe: Probe, *, stages: dict[str, float],
                val_images: int, train_images: int, batch_size: int, after_seconds: float = 0.0,
                min_steps: int = 1) -> dict[str, int]:
    """Steps per training stage so that the run ends within the budget: the time left after what is spent and what
    comes after training (``after_seconds``: evaluation, export) goes to the stages by ``stages``' shares, less each
    stage's overhead and its validations (one per epoch of ``train_images / batch_size`` steps, and one at the end).

    A pure function (tests/commands/test_fit.py). InputError when the time left cannot pay for one validation and
    ``min_steps`` steps in every stage.
    """
    left = budget_seconds - spent_seconds - after_seconds
    val_seconds = val_images * probe.embed_seconds
    per_epoch = max(1, train_images // max(1, batch_size))
    unit = probe.step_seconds + val_seconds / per_epoch  # a step, and its share of the validation at each epoch end
    fixed = len(stages) * (probe.overhead_seconds + val_seconds)  # each stage starts and validates at its end
    if left < fixed + len(stages) * min_steps * unit:
        need = (spent_seconds + after_seconds + fixed + len(stages) * min_steps * unit) / 60
        raise InputError(f"a budget of {budget_seconds / 60:.1f} minutes is too small for one validation of each "
                         f"training stage (about {need:.1f} minutes needed here); raise --minutes")
    total = sum(stages.values())
    steps = {name: max(min_steps, int(share / total * (left - fixed) / unit)) for name, share in stages.items()}
    return steps


def probe_throughput(model: dict, batch_size: int, steps: int = 3, channels_last: bool = False) -> Probe:
    """Time a few training steps of ``model`` (a recipe's model section) on random images: a step, and the forward
    pass of one image (validation, evaluation). The first step (allocation, kernel choice) is not counted.
    ``channels_last``: the recipe's memory format (1.5x faster steps for EfficientNet-Lite0 on this CPU: a probe
    without it gave LFW's fit a third less training than its budget paid for)."""
    import torch

    from .config import ModelConfig, config_from_dict
    from .model import build_model

    mc = config_from_dict({"model": {k: v for k, v in model.items() if k != "pretrained"}}).model
    net = build_model(replace(mc, pretrained="none") if isinstance(mc, ModelConfig) else mc)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, mc.image_size, mc.image_size)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    times = []
    net.train()
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = net(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    net.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        net(x)
        embed = (time.perf_counter() - t0) / batch_size
    # data loading and augmentation run beside the steps on the same cores: 1.2 covers them on a small CPU
    return Probe(step_seconds=1.2 * sum(times[1:]) / steps, embed_seconds=1.2 * embed)


# ------------------------------------------------------------------------------------------------- checks

def photo_listing(photos: Path, quarantine: Optional[Path] = None) -> list[tuple[str, int]]:
    """(relative path, size) of every image of PHOTOS and of those moved to the quarantine (so that cleaning does
    not change the fingerprint of the photos the stages started from)."""
    from .data.folder import is_image_file

    out = []
    for base in [photos] + ([quarantine] if quarantine is not None and quarantine.is_dir() else []):
        for root, _, files in os.walk(base):
            for name in files:
                if is_image_file(name):
                    p = Path(root) / name
                    out.append((p.relative_to(base).as_posix(), p.stat().st_size))
    return sorted(out)


def check_photos(photos: Path, out: Path, val_identities: float) -> dict:
    """The one-line errors about PHOTOS and RUN before any work: returns {people, photos, usable people}."""
    from .data.folder import list_image_folder

    if not photos.is_dir():
        raise InputError(f"{photos} is not a folder; give a folder of photos with one sub-folder per person")
    if out.resolve().is_relative_to(photos.resolve()):
        raise InputError(f"output folder {out} is inside the photos {photos}: it would be read as a person; choose a "
                         "folder outside it (e.g. --out runs/mine)")
    listing = list_image_folder(photos)
    if not listing.samples:
        raise InputError(f"no photos in {photos}: put each person's photos (JPEG, PNG) in a sub-folder named after "
                         "them, e.g. PHOTOS/alice/1.jpg")
    counts = [0] * len(listing.classes)
    for _, label in listing.samples:
        counts[label] += 1
    usable = sum(c >= 2 for c in counts)
    if usable < 2:
        raise InputError(f"{photos}: {usable} person with two or more photos; fit needs at least two people with two "
                         "photos each (more people and photos give a better model)")
    n_val = val_count(val_identities, usable)
    if usable - n_val < 2:
        raise InputError(f"{photos}: {usable} people with two or more photos; fit holds out {n_val} to measure the "
                         f"model and needs two more to train on: add people (at least {n_val + 2})")
    return {"people": len(listing.classes), "photos": len(listing.samples), "usable_people": usable,
            "val_people": n_val}


def val_count(val_identities: float, people: int) -> int:
    """Held-out people: a count, or a fraction of the people (at least 2, so impostor pairs exist)."""
    n = int(val_identities) if val_identities >= 1 else round(val_identities * people)
    return max(2, n)


def resolve_teacher(spec: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(teacher spec or None, a one-line note). ``auto``: dlib when installed, else none (with what that costs); a
    named teacher that is not installed is an InputError naming the pip command (build_teacher's)."""
    from .faces.teachers import build_teacher

    if spec in (None, "none"):
        return None, None
    if spec == "auto":
        try:
            build_teacher("dlib")
            return "dlib", None
        except InputError:
            return None, ("no teacher installed: the student starts from ImageNet (or random) weights, which on LFW "
                          "cost about 0.33 -> 0.09 TAR@FAR=1e-3 (docs/results.md); fix: " + TEACHER_INSTALL)
    build_teacher(spec)  # a missing dlib or ONNX file: its one-line error names the fix
    return spec, None


def start_note(recipe: "Recipe") -> Optional[str]:
    """One line, before any work, when the recipe starts from ImageNet Lite0 and its weights are not installed."""
    backbones = {stage["model"]["backbone"] for stage in (recipe.distill, recipe.finetune, recipe.scratch)}
    if recipe.start != "imagenet-lite0" or "tf_efficientnet_lite0" not in backbones:
        return None
    from .convert_weights import ConversionError, find_source, get_format

    try:
        find_source(get_format("efficientnet-lite0"))
        return None
    except ConversionError:
        return ("no ImageNet weights installed: the student starts from random init, which on LFW cost AUC 0.98 -> "
                "0.88 and TAR@FAR=1e-3 0.33 -> 0.04 (docs/results.md); fix: " + IMAGENET_INSTALL)


def start_weights(run: Path, start: str, backbone: str) -> tuple[str, str]:
    """(model.pretrained value, what it is): ImageNet Lite0 converted into RUN once when installed, else none."""
    if start != "imagenet-lite0":
        return start, start
    if backbone != "tf_efficientnet_lite0":
        return "none", "random init (ImageNet weights are for tf_efficientnet_lite0)"
    out = run / "lite0_imagenet.safetensors"
    if out.is_file():
        return str(out), "ImageNet (EfficientNet-Lite0)"
    from .convert_weights import ConversionError, convert

    try:
        convert("efficientnet-lite0", out)
        return str(out), "ImageNet (EfficientNet-Lite0)"
    except ConversionError:
        return "none", f"random init ({IMAGENET_INSTALL} for an ImageNet start)"


# ------------------------------------------------------------------------------------------------- fit

@dataclass
class FitOptions:
    """Everything fit takes besides PHOTOS and RUN (the command's flags)."""

    minutes: float = 60.0
    teacher: str = "auto"
    val_identities: float = 0.1
    clean: bool = False
    gallery: bool = False
    steps: Optional[tuple[int, int]] = None
    on_no_face: str = "skip"
    seed: int = 0
    recipe: Recipe = RECIPE
    progress: bool = True
    checkpoint_every_steps: int = 0
    say: Callable[[str], None] = field(default=print)


def fit(photos: Union[str, os.PathLike], out: Union[str, os.PathLike], *, minutes: float = 60.0,
        teacher: str = "auto", val_identities: float = 0.1, clean: bool = False, gallery: bool = False,
        steps: Optional[tuple[int, int]] = None, on_no_face: str = "skip", seed: int = 0, recipe: Recipe = RECIPE,
        progress: bool = True, checkpoint_every_steps: int = 0, say: Callable[[str], None] = print) -> dict:
    """Fit a face model to the people in PHOTOS, in RUN; returns the summary (stages, metrics, serve command).

    ``teacher``: auto (dlib when installed), dlib, onnx:FILE or none. ``steps``: (distillation, fine-tuning) steps
    instead of splitting ``minutes`` by a throughput probe (a run to reproduce). Rerun with the same arguments to
    continue an interrupted fit.
    """
    o = FitOptions(minutes, teacher, val_identities, clean, gallery, steps, on_no_face, seed, recipe, progress,
                   checkpoint_every_steps, say)
    return _Fit(Path(photos), Path(out), o).run()


class _Fit:
    def __init__(self, photos: Path, run: Path, o: FitOptions):
        self.photos, self.run_dir, self.o = photos, run, o
        self.t0 = time.perf_counter()
        self.counts = check_photos(photos, run, o.val_identities)
        if o.minutes <= 0:
            raise InputError(f"--minutes {o.minutes:g}: give a positive time budget")
        self.teacher, teacher_note = resolve_teacher(o.teacher)
        self.notes = [n for n in (teacher_note, start_note(o.recipe)) if n]
        if o.clean and self.teacher is None:
            raise InputError("--clean needs a face model to find wrong labels and duplicates: a teacher (--teacher "
                             f"dlib, {TEACHER_INSTALL}; or --teacher onnx:FILE)")
        # RUN/shards holds every aligned photo (the teacher's cache beside it); with --clean the stages after the
        # check train and evaluate on RUN/shards-clean, the same photos less the quarantined ones
        self.shards, self.quarantine = run / "shards", run / "quarantine"
        self.train_shards = run / "shards-clean" if o.clean else self.shards
        self.report = run / "report"

    def run(self) -> dict:
        o, run = self.o, self.run_dir
        run.mkdir(parents=True, exist_ok=True)
        for note in self.notes:
            o.say(note)
        listing = photo_listing(self.photos, self.quarantine)
        photos_key = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        teacher_key = self._teacher_key()
        # Alignment and the teacher's pass come before the doctor's check, which then reads the teacher's cached
        # embeddings and MTCNN's records: each photo is detected once and embedded by the teacher once (on LFW the
        # check's own detection and dlib pass took ~37 of fit's 60 minutes; docs/results.md).
        stages = [
            Stage("align", {"photos": photos_key, "val": o.val_identities, "seed": o.seed, "on_no_face": o.on_no_face},
                  [run / "faces", self.shards], self.align, fresh=True)]
        if self.teacher is not None:
            stages.append(Stage("teacher", {"teacher": teacher_key, "source": self._teacher_source()},
                                [self.shards / "teacher-cache"], self.teacher_pass))
        stages += [
            Stage("check", {"teacher": teacher_key, "clean": o.clean},
                  [run / "check"] + ([self.train_shards] if o.clean else []), self.check, fresh=True),
            Stage("plan", {"minutes": o.minutes, "steps": o.steps, "recipe": _recipe_key(o.recipe)},
                  [run / "plan.json"], self.plan, fresh=True)]
        if self.teacher is not None:
            stages.append(Stage("distill", {"ckpt": o.checkpoint_every_steps}, [run / "distill"], self.distill))
        stages += [
            Stage("finetune", {"ckpt": o.checkpoint_every_steps}, [run / "finetune"], self.finetune),
            Stage("evaluate", {"flip": o.recipe.flip}, [self.report], self.evaluate, fresh=True),
            Stage("export", {"gallery": o.gallery, "flip": o.recipe.flip},
                  [run / "model.onnx"] + ([run / "gallery"] if o.gallery else []), self.export, fresh=True)]
        results = StagedJob(run, say=o.say).run(stages)
        return self.summary(results)

    # --- stages ------------------------------------------------------------------------------------------
    def _teacher_key(self) -> Any:
        return None if self.teacher is None else self._build_teacher().fingerprint()

    def _build_teacher(self) -> Any:
        """The teacher as the distillation stage builds it (the recipe's distill section: its mirror option), so the
        teacher's pass fills the very cache the distillation and the check read."""
        from .config import DistillConfig
        from .training.setup import distill_teacher

        return distill_teacher(DistillConfig(**{**self.o.recipe.distill["distill"], "teacher": self.teacher}))

    def _teacher_source(self) -> str:
        return self.o.recipe.distill["distill"].get("teacher_source", "auto")

    def check(self, done: dict) -> dict:
        """The doctor's check of the aligned shards: MTCNN's records and the teacher's cached embeddings. --clean
        quarantines the suspects (PHOTOS -> RUN/quarantine) and writes RUN/shards-clean without them."""
        if self.teacher is None:
            c = self.counts
            return {"summary": f"{c['photos']} photos of {c['people']} people (no teacher: no doctor's check)",
                    **c}
        from functools import partial

        from .curate.doctor import run_doctor
        from .training.teacher_pass import teacher_targets

        embedder = self._build_teacher()
        out = self.run_dir / "check"
        s = run_doctor(self.shards, out, embedder, model=f"teacher {self.teacher}",
                       same_person=getattr(embedder, "same_person_threshold", None), progress=self.o.progress,
                       overwrite=True, teacher_pass=partial(teacher_targets, source=self._teacher_source()))
        result = {"photos": s["photos"], "suspects": s["suspects"], "counts": s["counts"]}
        text = f"{s['photos']} photos, {s['suspects']} suspects"
        if self.o.clean:
            text += self._clean(out, result, embedder)
        return {"summary": text + f"; report {out / 'report.html'}", **result}

    def _clean(self, check: Path, result: dict, teacher: Any) -> str:
        """Quarantine the check's suspects, then RUN/shards-clean: RUN/shards without them, the same held-out people
        (less any left without photos), the teacher's embeddings carried over; returns the summary's words."""
        from .curate.findings import read_findings, suspects
        from .curate.quarantine import apply_quarantine
        from .data import ShardDataset
        from .data.writer import write_shards
        from .faces.record import crops_of, read_alignment
        from .training.teacher_pass import carry_over

        findings = read_findings(check)
        named = set(suspects(findings))
        text = ""
        if named:
            reasons = {p: f"{f.kind}: {f.reason}" for f in findings for p in f.suspects}
            present = sorted(p for p in named if (self.photos / p).is_file())  # a rerun after a kill: moved already
            moved = apply_quarantine(present, self.photos, self.quarantine, reasons)[1] if present else 0
            manifest = _newest_manifest(self.quarantine)  # the one holding the moves (this try's or the killed one's)
            result.update(manifest=str(manifest), moved=len(named) - len(present) + moved)
            text = f", {result['moved']} quarantined (undo: facesiam doctor --undo {manifest})"
            check_photos(self.photos, self.run_dir, self.o.val_identities)  # still enough people?
        faces = self.run_dir / "faces"
        alignment = read_alignment(faces)
        exclude = crops_of(alignment, named)
        val = ShardDataset(self.shards, "val")
        held_out = {val.classes[label] for label in set(val.labels.tolist())}
        kept = {r["output"].split("/", 1)[0] for r in alignment["images"] if r["output"] and r["output"] not in exclude}
        write_shards(faces, self.train_shards, alignment=alignment, exclude=exclude, seed=self.o.seed,
                     val_identities=sorted(held_out & kept), overwrite=True, progress=self.o.progress)
        carry_over(self.shards, self.train_shards, teacher, source=self._teacher_source())
        return text

    def align(self, done: dict) -> dict:
        """align_faces PHOTOS RUN/faces, then make_shards RUN/faces RUN/shards (the two commands' library calls)."""
        from .data.writer import write_shards
        from .faces.folder import align_folder
        from .faces.record import read_alignment

        faces = self.run_dir / "faces"
        n_val = val_count(self.o.val_identities, check_photos(self.photos, self.run_dir,
                                                             self.o.val_identities)["usable_people"])
        from tqdm.auto import tqdm

        bar = tqdm(desc="align", unit="img", disable=not self.o.progress)

        def progress(step: int, total: int) -> None:
            bar.total = total
            bar.update(step)

        try:
            meta = align_folder(self.photos, faces, on_no_face=self.o.on_no_face, overwrite=True, progress=progress)
        finally:
            bar.close()
        c = meta["counts"]
        if not c["aligned"] and not c["center"]:
            raise InputError(f"no face found in any of the {c['images']} photos of {self.photos}; use photos with a "
                             "visible face, or --on-no-face center for photos that are already face crops")
        shards = write_shards(faces, self.shards, alignment=read_alignment(faces), val_identities=n_val,
                              seed=self.o.seed, overwrite=True, progress=self.o.progress)
        return {"summary": f"{c['aligned']} of {c['images']} photos aligned ({c['center']} centre-cropped, "
                           f"{c['skipped']} skipped), {n_val} people held out",
                "counts": c, "splits": shards.get("splits")}

    def teacher_pass(self, done: dict) -> dict:
        from .training.teacher_pass import teacher_targets

        teacher = self._build_teacher()
        found = {}
        for split in ("train", "val"):  # on every core (dlib's network runs on one)
            _, hit = teacher_targets(self.shards, split, teacher, source=self._teacher_source(),
                                     processes=available_cpus())
            found[split] = [int(hit.sum()), int(len(hit))]
        return {"summary": f"teacher {self.teacher}: faces in {found['train'][0]} of {found['train'][1]} training "
                           "photos", "found": found}

    def _data(self) -> tuple[int, int, int]:
        """(training photos, training people, held-out photos) of the shards."""
        from .data import ShardDataset

        train, val = ShardDataset(self.train_shards, "train"), ShardDataset(self.train_shards, "val")
        return len(train), len(set(train.labels.tolist())), len(val)

    def _batch(self, stage: dict, people: int) -> int:
        """The recipe's batch, or as many people as there are (the sampler draws m_per_class photos of each)."""
        m = stage.get("m_per_class", 1)
        return max(m, min(stage.get("batch_size", 32), people * m) // m * m)

    def plan(self, done: dict) -> dict:
        r = self.o.recipe
        images, people, val_images = self._data()
        names = (["distill"] if self.teacher is not None else []) + ["finetune"]
        configs = {"distill": r.distill, "finetune": r.finetune if self.teacher is not None else r.scratch}
        batches = {n: self._batch(configs[n], people) for n in names}
        if self.o.steps is not None:
            steps = dict(zip(names, self.o.steps[-len(names):]))
            probe = None
        else:
            probe = probe_throughput(configs["finetune"]["model"], max(batches.values()),
                                     channels_last=bool(configs["finetune"].get("channels_last")))
            after = 2 * (val_images * probe.embed_seconds) + 30.0  # evaluation (with flips) and the export
            shares = {"distill": r.distill_share, "finetune": 1 - r.distill_share} if len(names) == 2 else \
                {"finetune": 1.0}
            spent = sum(r["seconds"] for r in done.values())  # stages done now or in earlier calls of this fit
            steps = split_steps(self.o.minutes * 60, spent, probe,
                                stages=shares, val_images=val_images, train_images=images,
                                batch_size=max(batches.values()), after_seconds=after)
        plan = {"steps": steps, "batch_size": batches, "probe": None if probe is None else probe.__dict__}
        from .fileio import write_json

        write_json(self.run_dir / "plan.json", plan)
        text = ", ".join(f"{n} {s} steps of {batches[n]}" for n, s in steps.items())
        if probe is not None:
            text += f" (probe: {probe.step_seconds:.2f} s/step)"
        return {"summary": text, **plan}

    def _train(self, name: str, values: dict, pretrained: str, done: dict) -> dict:
        from .config import config_from_dict
        from .training import train

        plan = done["plan"]
        steps = int(plan["steps"][name])
        cfg = {**values, "model": {**values["model"], "pretrained": pretrained},
               "data": str(self.train_shards), "output": str(self.run_dir / name), "max_steps": steps,
               "epochs": 10**6, "batch_size": plan["batch_size"][name], "val_every_steps": 0, "seed": self.o.seed,
               "resume": "latest", "wandb": "off", "num_workers": self.o.recipe.num_workers,
               "checkpoint_every_steps": self.o.checkpoint_every_steps, "log_every_steps": max(1, steps // 10)}
        summary = train(config_from_dict(cfg))
        return {"summary": f"{summary['steps']} steps, best {summary['best_metric']} "
                           f"{_num(summary['best_value'])} at step {summary['best_step']}", **summary}

    def distill(self, done: dict) -> dict:
        r = self.o.recipe
        pretrained, what = start_weights(self.run_dir, r.start, r.distill["model"]["backbone"])
        values = {**r.distill, "distill": {**r.distill["distill"], "teacher": self.teacher}}
        result = self._train("distill", values, pretrained, done)
        return {**result, "summary": f"from {what}: {result['summary']}", "start": what}

    def finetune(self, done: dict) -> dict:
        r = self.o.recipe
        if self.teacher is not None:  # the distilled student's last step, as docs/results.md measured it
            return self._train("finetune", r.finetune, str(self.run_dir / "distill" / "final"), done)
        pretrained, what = start_weights(self.run_dir, r.start, r.scratch["model"]["backbone"])
        result = self._train("finetune", r.scratch, pretrained, done)
        return {**result, "summary": f"from {what}: {result['summary']}", "start": what}

    def evaluate(self, done: dict) -> dict:
        from .eval.embed import embed_path
        from .eval.pipeline import evaluate
        from .eval.report import write_report_dir
        from .eval.worst_pairs import write_worst_pairs

        model = self.run_dir / "finetune" / "best"
        t0 = time.time()
        data = embed_path(model, self.train_shards, split="val", flip=self.o.recipe.flip, progress=self.o.progress,
                          device="cpu")
        data["meta"]["timing"] = {"embed": time.time() - t0}
        metrics = evaluate(data, progress=self.o.progress)
        metrics["source"]["command"] = f"facesiam fit {shlex.quote(str(self.photos))} --out " \
                                       f"{shlex.quote(str(self.run_dir))}"
        write_report_dir(metrics, self.report)
        write_worst_pairs(data, self.report, threshold=operating_point(self.report)[1])
        v, i = metrics.get("verification") or {}, metrics.get("identification") or {}
        keep = {"auc": v.get("auc"), "eer": v.get("eer"), "tar_at_far_1e-3": (v.get("tar_at_far") or {}).get("1e-03"),
                "rank1": i.get("rank1"), "val_images": int(len(data["labels"]))}
        return {"summary": ", ".join(f"{k} {_num(x)}" for k, x in keep.items()), "metrics": keep}

    def export(self, done: dict) -> dict:
        from .export import export_onnx

        s = export_onnx(self.run_dir / "finetune" / "best", self.run_dir / "model.onnx", flip=self.o.recipe.flip,
                        overwrite=True)
        text = f"{s['out']} ({s['bytes'] / 1e6:.1f} MB)"
        result: dict = {"onnx": str(s["out"])}
        if self.o.gallery:
            from .eval.embed import embed_path
            from .eval.gallery import Gallery

            data = embed_path(self.run_dir / "finetune" / "best", self.train_shards, split="train",
                              flip=self.o.recipe.flip, progress=self.o.progress, device="cpu")
            names = [data["classes"][int(label)] for label in data["labels"]]
            Gallery.build(data["embeddings"], names, data.get("paths")).save(self.run_dir / "gallery")
            result["gallery"] = str(self.run_dir / "gallery")
            text += f"; gallery of {len(set(names))} people in {self.run_dir / 'gallery'}"
        return {"summary": text, **result}

    # --- the summary ---------------------------------------------------------------------------------------
    def summary(self, results: dict) -> dict:
        run = self.run_dir
        point, threshold = operating_point(self.report)
        # the exported file: it embeds as the evaluation that set the threshold did (with the mirror image)
        serve = ["facesiam", "serve", "--onnx", str(run / "model.onnx"), "--report", str(self.report),
                 "--operating-point", point]
        if self.o.gallery:
            serve += ["--gallery", str(run / "gallery")]
        rows = [(name, r["seconds"] / 60, ("(earlier) " if r["skipped"] else "") + r.get("summary", ""))
                for name, r in results.items()]
        total = sum(r["seconds"] for r in results.values()) / 60
        width = max(len(n) for n, _, _ in rows)
        lines = [f"{'stage':<{width}}  minutes  result"] + [f"{n:<{width}}  {m:7.1f}  {t}" for n, m, t in rows]
        lines.append(f"{'total':<{width}}  {total:7.1f}  budget {self.o.minutes:g} min")
        lines += self.notes
        command = " ".join(shlex.quote(a) for a in serve)
        lines += ["", f"report: {self.report / 'report.html'}  (worst pairs: {self.report / 'worst_pairs.html'})",
                  f"serve it (same person when cosine >= {_num(threshold)}, the report's threshold at {point}):",
                  f"  {command}"]
        text = "\n".join(lines)
        self.o.say(text)
        from .fileio import write_text

        write_text(run / "summary.txt", text + "\n")
        return {"stages": {n: {k: v for k, v in r.items()} for n, r in results.items()}, "minutes": total,
                "metrics": results["evaluate"].get("metrics"), "threshold": threshold,
                "operating_point": point, "serve": command, "flip": self.o.recipe.flip,
                "report": str(self.report), "model": str(run / "finetune" / "best"), "onnx": str(run / "model.onnx"),
                "gallery": str(run / "gallery") if self.o.gallery else None, "teacher": self.teacher,
                "notes": self.notes, "table": text}


def _newest_manifest(quarantine: Path) -> Optional[Path]:
    """The newest quarantine manifest in ``quarantine`` that moved photos (names sort by time)."""
    for path in sorted(quarantine.glob("manifest-*.json"), reverse=True):
        if json.loads(path.read_text(encoding="utf-8")).get("moves"):
            return path
    return None


def operating_point(report: Path) -> tuple[str, float]:
    """(operating point, threshold) of the report: FAR 1e-3, or the strictest FAR the held-out pairs can measure
    (a few people give too few impostor pairs for 1e-3), else the balanced-accuracy threshold."""
    from .eval.compare import threshold_from_report

    for point in (OPERATING_POINT, "far=1e-2", "far=1e-1", "best"):
        try:
            return point, threshold_from_report(report, point)[0]
        except InputError:
            continue
    raise InputError(f"{report}/metrics.json has no threshold; evaluate the model on more held-out people")


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def _recipe_key(r: Recipe) -> str:
    return hashlib.sha256(json.dumps(r.__dict__, sort_keys=True, default=str).encode()).hexdigest()


__all__ = ["RECIPE", "Probe", "Recipe", "fit", "split_steps", "probe_throughput"]
