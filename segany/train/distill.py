"""MobileSAM-style decoupled distillation (Zhang et al., 2023): a TinyViT image encoder learns to
reproduce a teacher SAM encoder's image embeddings (MSE); the teacher's prompt encoder and mask
decoder are kept as they are, so the student drops into the teacher's decoder.

Teacher embeddings are computed once per image view and cached on disk (keyed by the teacher's
fingerprint and the image hash). The output model.pth holds the student encoder with the teacher's
prompt encoder and mask decoder, in MobileSAM's released key layout.
"""
from __future__ import annotations

import copy
import csv
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..io.atomic import atomic_write_bytes, atomic_write_text
from ..io.checkpoint import save_checkpoint
from ..modeling import Sam, SamConfig, build_sam
from ..modeling.tiny_vit import TinyViTConfig
from .cache import EmbeddingCache
from .data import AugmentConfig, ImageRecord, augment
from .loop import run_steps
from .trainer import _rng_state, _set_rng_state, lr_factor, plot_history

STATE_FILE = "distill_state.pt"
MODEL_FILE = "model.pth"
LOG_FILE = "log.csv"
PLOT_FILE = "curves.png"


@dataclass
class DistillConfig:
    steps: int = 1000
    images_per_step: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    flip: bool = True
    seed: int = 0
    save_every: int = 100
    cache_dir: Optional[str] = None
    student: Dict[str, Any] = field(default_factory=dict)  # TinyViTConfig overrides; default MobileSAM's vit_t

    def __post_init__(self) -> None:
        if self.steps < 1 or self.images_per_step < 1:
            raise ValueError("steps and images per step must be >= 1")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def student_sam(teacher: Sam, cfg: DistillConfig) -> Sam:
    """A SAM with a fresh TinyViT encoder (sized for the teacher's frame and embedding) and copies of the
    teacher's prompt encoder and mask decoder."""
    overrides = {"img_size": teacher.image_size, "out_chans": teacher.prompt_encoder.embed_dim, **cfg.student}
    for key in ("embed_dims", "depths", "num_heads", "window_sizes"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    teacher_cfg = getattr(teacher, "config", None) or SamConfig()
    sam_cfg = copy.deepcopy(teacher_cfg)
    sam_cfg.encoder, sam_cfg.encoder_kind, sam_cfg.variant = TinyViTConfig(**overrides), "tiny_vit", "sam"
    torch.manual_seed(cfg.seed)
    student = build_sam(sam_cfg)
    student.prompt_encoder.load_state_dict(teacher.prompt_encoder.state_dict())
    student.mask_decoder.load_state_dict(teacher.mask_decoder.state_dict())
    return student


def _frame(record: ImageRecord, side: int, flip: bool, rng: np.random.Generator) -> Tuple[torch.Tensor, Tuple[int, int]]:
    image = record.load_image()
    image, _ = augment(image, np.zeros((0,) + image.shape[:2], bool), side, AugmentConfig(flip=flip), rng)
    h, w = image.shape[:2]
    frame = torch.zeros((3, side, side), dtype=torch.uint8)
    frame[:, :h, :w] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    return frame, (h, w)


class Distiller:
    def __init__(self, teacher: Sam, cfg: DistillConfig, out: Union[str, Path], records: Sequence[ImageRecord], progress: bool = True) -> None:
        if not records:
            raise ValueError("no images to distil on")
        self.cfg = cfg
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student = student_sam(teacher, cfg)
        self.encoder = self.student.image_encoder.train()
        self.params = [p for p in self.encoder.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))  # type: ignore[arg-type]
        self.cache = EmbeddingCache(self.teacher, cfg.cache_dir or self.out / "teacher_cache")
        self.records = list(records)
        self.progress = progress
        self.step = 0
        self.history: List[Dict[str, Any]] = []

    def state_dict(self) -> Dict[str, Any]:
        return {
            "format": "segany-distill-state/1",
            "config": self.cfg.to_dict(),
            "step": self.step,
            "encoder": {k: v.detach().clone() for k, v in self.encoder.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "history": self.history,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("format") != "segany-distill-state/1":
            raise ValueError("not a segany distillation state")
        self.encoder.load_state_dict(state["encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])

    @classmethod
    def resume_state(cls, out: Union[str, Path]) -> Dict[str, Any]:
        path = Path(out) / STATE_FILE
        if not path.is_file():
            raise ValueError(f"nothing to resume: {path} does not exist")
        return torch.load(path, map_location="cpu", weights_only=False)

    def save(self) -> None:
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        atomic_write_bytes(self.out / STATE_FILE, buffer.getvalue())
        save_checkpoint(self.student, self.out / MODEL_FILE)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["step", "lr", "loss", "seconds"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.out / LOG_FILE, text.getvalue())
        plot_history(self.history, self.out / PLOT_FILE, title="distillation loss (embedding MSE)")

    def batch(self, step: int) -> List[Tuple[torch.Tensor, Tuple[int, int]]]:
        """The images of a step: a seeded permutation per epoch, views decided by (seed, epoch, index)."""
        n, k = len(self.records), self.cfg.images_per_step
        out = []
        for position in range(step * k, step * k + k):
            epoch, offset = divmod(position, n)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch))
            index = int(order[offset])
            rng = np.random.default_rng([self.cfg.seed, epoch, index])
            out.append(_frame(self.records[index], self.teacher.image_size, self.cfg.flip, rng))
        return out

    def train_step(self) -> Dict[str, Any]:
        started = time.perf_counter()
        frames = self.batch(self.step)
        targets = torch.cat([self.cache.get(f, size)["image_embeddings"] for f, size in frames])
        images = torch.cat([self.student.preprocess(f[:, : s[0], : s[1]].float()[None]) for f, s in frames])
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(self.encoder(images), targets)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        return {"step": self.step + 1, "lr": lr, "loss": float(loss.detach()), "seconds": time.perf_counter() - started}

    def run(self, stop_after: Optional[int] = None) -> List[Dict[str, Any]]:
        end = self.cfg.steps if stop_after is None else min(self.cfg.steps, self.step + stop_after)

        def next_row() -> Dict[str, Any]:
            row = self.train_step()
            self.step += 1
            return row

        return run_steps(self, end, next_row, "distill", lambda row: {"loss": f"{row['loss']:.4g}"})
