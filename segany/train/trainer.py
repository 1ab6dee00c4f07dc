"""Training and fine-tuning SAM with the paper's recipe.

Modes:
- "decoder": the image encoder is frozen and its embeddings are cached on disk (keyed by image hash
  and encoder fingerprint); the prompt encoder and mask decoder train. The fast path on a CPU.
- "full": encoder and decoder train end to end.
- "lora": the encoder is frozen except for low-rank adapters on its attention qkv projections; the
  decoder trains too. The adapters are merged into a plain checkpoint when it is written.

Outputs in the run folder:
- model.pth: the model in the released key layout (loads with segany.load_model and the released
  code), written atomically;
- train_state.pt: everything needed to continue bit-for-bit (model, optimizer, scheduler, step, RNG
  states, the data position, the log history);
- log.csv: per-step losses and, at validation steps, click mIoU; curves.png: their plot.
"""
from __future__ import annotations

import copy
import csv
import io
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..io.atomic import atomic_write_bytes, atomic_write_text
from ..engine.training import training_twin
from ..io.checkpoint import save_checkpoint
from ..predict.transforms import ResizeLongestSide
from .cache import EmbeddingCache, cached_or_fresh, encode_frame
from .data import AugmentConfig, EvalObject, ImageRecord, InstanceDataset, make_loader
from .loop import run_steps
from .lora import add_lora, merge_lora
from .prompts import PromptConfig, RoundResult, interactive_rounds
from .validate import evaluate_clicks

MODES = ("decoder", "full", "lora")
STATE_FILE = "train_state.pt"
MODEL_FILE = "model.pth"
LOG_FILE = "log.csv"
PLOT_FILE = "curves.png"
LOSS_COLUMNS = ["step", "lr", "loss", "focal", "dice", "iou_mse", "train_iou_first", "train_iou_last", "seconds"]


@dataclass
class TrainConfig:
    mode: str = "decoder"
    steps: int = 1000
    images_per_step: int = 1
    max_instances: int = 4  # instances sampled per image, prompted together in one batch
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decay down to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables
    lora_rank: int = 4
    lora_alpha: float = 4.0
    train_prompt_encoder: bool = True
    loss_side: Optional[int] = None  # resolution of the mask loss; None: the model frame (1024)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    workers: int = 0
    val_every: int = 100  # steps; 0: only before and after
    val_clicks: int = 3
    save_every: int = 100
    cache_dir: Optional[str] = None  # decoder mode; default <out>/embedding_cache
    # Forward and backward through the engine's training twin (segany.engine.training: the same
    # parameters and math, folded attention); False: through the plain modules.
    training_twin: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown training mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.steps < 1 or self.images_per_step < 1 or self.max_instances < 1:
            raise ValueError("steps, images per step and instances per image must be >= 1")
        if isinstance(self.prompts, dict):
            self.prompts = PromptConfig(**self.prompts)
        if isinstance(self.augment, dict):
            aug = dict(self.augment)
            aug["scale_range"] = tuple(aug.get("scale_range", (1.0, 1.0)))
            self.augment = AugmentConfig(**aug)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def prepare_model(model: nn.Module, cfg: TrainConfig) -> List[nn.Parameter]:
    """Set requires_grad by mode (adding LoRA adapters in 'lora' mode); returns the trained parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.mode == "lora":
        torch.manual_seed(cfg.seed)  # adapter initialisation is part of the run's determinism
        add_lora(model, cfg.lora_rank, cfg.lora_alpha)
        for name, p in model.image_encoder.named_parameters():
            p.requires_grad_(name.endswith("lora_a") or name.endswith("lora_b"))
    elif cfg.mode == "full":
        for p in model.image_encoder.parameters():
            p.requires_grad_(True)
    for p in model.mask_decoder.parameters():
        p.requires_grad_(True)
    if cfg.train_prompt_encoder:
        for p in model.prompt_encoder.parameters():
            p.requires_grad_(True)
    return [p for _, p in model.named_parameters() if p.requires_grad]


def release_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's weights in the released layout (LoRA merged)."""
    plain = merge_lora(copy.deepcopy(model))
    return {k: v.detach().clone() for k, v in plain.state_dict().items()}


def _rng_state() -> Dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def plot_history(history: List[Dict[str, Any]], path: Path, title: str = "training loss (20 focal + dice + IoU MSE)") -> Optional[Path]:
    """Loss (raw and smoothed) and validation curves of a run's history as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional (extra "plots")
        return None
    train = [r for r in history if "loss" in r]
    val_keys = sorted({k for r in history for k in r if k.startswith("val_")})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = np.array([r["step"] for r in train])
        loss = np.array([r["loss"] for r in train])
        axes[0].plot(steps, loss, alpha=0.3, color="C0", label="loss")
        window = max(1, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        axes[0].plot(steps[window - 1 :], smooth, color="C0", label=f"loss (mean of {window})")
        axes[0].set_yscale("log")
        axes[0].legend()
    axes[0].set_xlabel("step")
    axes[0].set_title(title)
    for key in val_keys:
        rows = [r for r in history if key in r]
        axes[1].plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", label=key[4:])
    axes[1].set_xlabel("step")
    axes[1].set_title("validation mIoU")
    if val_keys:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


class Trainer:
    """Runs the training loop; construct with an initial model (already loaded) and the data."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        out: Path,
        train_records: Sequence[ImageRecord],
        val_sets: Optional[Dict[str, Tuple[Sequence[ImageRecord], Sequence[EvalObject]]]] = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.params = prepare_model(model, cfg)
        # What steps run: the model itself, or its training twin (built after LoRA was added).
        self.net = training_twin(model) if cfg.training_twin else model
        if not self.params:
            raise ValueError("nothing to train: every parameter is frozen")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.dataset = InstanceDataset(train_records, model.image_size, cfg.max_instances, cfg.augment, cfg.seed)
        self.val_sets = dict(val_sets or {})
        self.progress = progress
        self.step = 0
        self.history: List[Dict[str, Any]] = []
        self.cache: Optional[EmbeddingCache] = None
        if cfg.mode == "decoder":
            self.cache = EmbeddingCache(model, cfg.cache_dir or self.out / "embedding_cache")
        self._val_frames: Dict[Tuple[str, int], Tuple[torch.Tensor, Tuple[int, int]]] = {}

    # ------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, Any]:
        return {
            "format": "segany-train-state/1",
            "config": self.cfg.to_dict(),
            "step": self.step,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "data_position": self.step * self.cfg.images_per_step,
            "history": self.history,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("format") != "segany-train-state/1":
            raise ValueError("not a segany training state (train_state.pt)")
        saved = TrainConfig(**state["config"]).to_dict()
        current = self.cfg.to_dict()
        changed = [k for k in current if k not in ("steps", "val_every", "save_every", "workers", "cache_dir") and saved[k] != current[k]]
        if changed:
            raise ValueError(f"--resume with different settings than the saved run: {', '.join(changed)}")
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])

    def save(self) -> None:
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        atomic_write_bytes(self.out / STATE_FILE, buffer.getvalue())
        save_checkpoint(release_state_dict(self.model), self.out / MODEL_FILE)
        self.write_log()

    @classmethod
    def resume_state(cls, out: Path) -> Dict[str, Any]:
        path = Path(out) / STATE_FILE
        if not path.is_file():
            raise ValueError(f"nothing to resume: {path} does not exist")
        return torch.load(path, map_location="cpu", weights_only=False)

    # ------------------------------------------------------------ logs

    def write_log(self) -> None:
        val_columns = sorted({k for row in self.history for k in row if k.startswith("val_")})
        columns = LOSS_COLUMNS + val_columns
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write_text(self.out / LOG_FILE, text.getvalue())
        self.plot()

    def plot(self) -> Optional[Path]:
        return plot_history(self.history, self.out / PLOT_FILE)

    # ------------------------------------------------------------ validation

    def _val_embed(self, name: str, records: Sequence[ImageRecord]) -> Callable[[int], Tuple[Dict[str, torch.Tensor], Tuple[int, int]]]:
        side = self.model.image_size
        transform = ResizeLongestSide(side)

        def embed(index: int):
            key = (name, index)
            if key not in self._val_frames:
                image = transform.apply_image(records[index].load_image())
                h, w = image.shape[:2]
                frame = torch.zeros((3, side, side), dtype=torch.uint8)
                frame[:, :h, :w] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
                self._val_frames[key] = (frame, (h, w))
            frame, size = self._val_frames[key]
            return cached_or_fresh(self.cache, self.model, frame, size), size

        return embed

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        row: Dict[str, float] = {}
        was_training = self.model.training
        self.model.eval()
        for name, (records, objects) in self.val_sets.items():
            scores = evaluate_clicks(self.model, records, objects, self._val_embed(name, records), self.cfg.val_clicks)
            for clicks, value in scores.items():
                row[f"val_{name}_miou@{clicks}"] = value
        self.model.train(was_training)
        return row

    # ------------------------------------------------------------ training

    def _train_image(self, sample: Dict[str, Any], step: int, slot: int, weight: float) -> List[RoundResult]:
        rng = np.random.default_rng([self.cfg.seed, 7, step, slot])
        frame, size = sample["image"], tuple(sample["size"])
        if self.cache is not None:
            features = self.cache.get(frame, size)
            leaves = None
        else:
            encoded = encode_frame(self.net, frame, size)
            # Rounds backpropagate one at a time into detached leaves; the encoder once at the end.
            leaves = {k: v.detach().requires_grad_() for k, v in encoded.items()}
            features = leaves
        features = {k: v.to(self.model.device) for k, v in features.items()}
        num_rounds = 1 + self.cfg.prompts.num_point_rounds + self.cfg.prompts.num_mask_only_rounds

        def decode(points, boxes, masks, multimask):
            dev = self.model.device
            points = None if points is None else (points[0].to(dev), points[1].to(dev))
            return self.net.decode(
                features, points, None if boxes is None else boxes.to(dev), None if masks is None else masks.to(dev), multimask
            )

        def backward(result: RoundResult) -> None:
            (result.loss.total * (weight / num_rounds)).backward()

        results = interactive_rounds(
            decode, sample["masks"], size, rng, self.cfg.prompts, backward, loss_side=self.cfg.loss_side
        )
        if leaves is not None:
            grads = [(encoded[k], leaves[k].grad) for k in leaves if leaves[k].grad is not None]
            if grads:
                torch.autograd.backward([g[0] for g in grads], [g[1] for g in grads])
        return results

    def train_step(self, batch: List[Dict[str, Any]]) -> Dict[str, Any]:
        started = time.perf_counter()
        self.model.train()
        self.net.train()  # (the twin's own modules; the rest are the model's)
        self.optimizer.zero_grad(set_to_none=True)
        rounds: List[List[RoundResult]] = []
        for slot, sample in enumerate(batch):
            rounds.append(self._train_image(sample, self.step, slot, 1.0 / len(batch)))
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()

        def mean(get) -> float:
            return float(np.mean([get(r) for image in rounds for r in image]))

        return {
            "step": self.step + 1,
            "lr": lr,
            "loss": mean(lambda r: float(r.loss.total.detach())),
            "focal": mean(lambda r: float(r.loss.focal)),
            "dice": mean(lambda r: float(r.loss.dice)),
            "iou_mse": mean(lambda r: float(r.loss.iou)),
            "train_iou_first": float(np.mean([float(image[0].loss.mask_iou.mean()) for image in rounds])),
            "train_iou_last": float(np.mean([float(image[-1].loss.mask_iou.mean()) for image in rounds])),
            "seconds": time.perf_counter() - started,
        }

    def run(self, stop_after: Optional[int] = None) -> List[Dict[str, Any]]:
        """Train up to cfg.steps (or stop after `stop_after` steps of this call, saving a resumable state).

        Ctrl-C saves the state at the last finished step before re-raising.
        """
        cfg = self.cfg
        if self.step == 0 and self.val_sets and not any(k.startswith("val_") for r in self.history for k in r):
            self.history.append({"step": 0, **self.validate()})
            self.write_log()
        end = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        loader = make_loader(self.dataset, cfg.images_per_step, self.step * cfg.images_per_step, cfg.workers, cfg.seed)
        batches = iter(loader)

        def next_row() -> Dict[str, Any]:
            row = self.train_step(next(batches))
            self.step += 1
            validate_now = self.val_sets and (
                self.step == cfg.steps or (cfg.val_every > 0 and self.step % cfg.val_every == 0)
            )
            if validate_now:
                row.update(self.validate())
            return row

        def postfix(row: Dict[str, Any]) -> Dict[str, str]:
            shown = {"loss": f"{row['loss']:.3f}", "iou": f"{row['train_iou_last']:.3f}"}
            shown.update({k[4:]: f"{v:.3f}" for k, v in row.items() if k.startswith("val_")})
            return shown

        return run_steps(self, end, next_row, f"train ({cfg.mode})", postfix)
