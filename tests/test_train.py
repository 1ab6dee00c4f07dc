"""Training end to end on a tiny model: overfitting, bit-for-bit resume, checkpoints that load in segany
and in the released code, LoRA merging, the CLI."""
from __future__ import annotations

import contextlib
import copy
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import segany
from segany.modeling import ImageEncoderConfig, MaskDecoderConfig, SamConfig, build_sam
from segany.train.data import AugmentConfig, eval_objects, folder_records
from segany.train.lora import LoRALinear, add_lora, merge_lora
from segany.train.prompts import PromptConfig
from segany.train.trainer import MODEL_FILE, Trainer, TrainConfig, release_state_dict

from .conftest import import_reference
from .smallsam import one_thread as smallsam_one_thread


def tiny_config(side: int = 128, dim: int = 64) -> SamConfig:
    # Decoder heads stay at 8: the released layout has no key that records them.
    return SamConfig(
        encoder=ImageEncoderConfig(img_size=side, embed_dim=dim, depth=2, num_heads=2, window_size=4,
                                   out_chans=dim, global_attn_indexes=(1,)),
        prompt_embed_dim=dim,
        mask_in_chans=8,
        decoder=MaskDecoderConfig(transformer_mlp_dim=2 * dim, iou_head_hidden_dim=dim),
    )


def tiny_model(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_sam(tiny_config(**kw))


def synthetic_images(root: Path, n: int = 4, size: int = 128, seed: int = 0) -> Path:
    """n noisy images, each with a disc and a rectangle of random colours (label PNGs 1 and 2)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        img = (rng.random((size, size, 3)) * 60 + 40).astype(np.uint8)
        label = np.zeros((size, size), np.uint8)
        for k in range(2):
            cx, cy = rng.integers(size // 4.5, size - size // 4.5, 2)
            r = rng.integers(size // 9, size // 5)
            shape = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) if k == 0 else ((abs(xx - cx) < r) & (abs(yy - cy) < 0.6 * r))
            img[shape] = rng.integers(0, 255, 3)
            label[shape] = k + 1
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        Image.fromarray(label).save(root / "masks" / f"{i}.png")
    return root


# Tiny models run faster on one thread (the fixtures' generator, used here as a context manager).
one_thread = contextlib.contextmanager(smallsam_one_thread)


def test_overfit_four_images(tmp_path):
    root = synthetic_images(tmp_path / "data")
    records = folder_records(root / "images", root / "masks")
    val = eval_objects(records, max_per_image=2)
    cfg = TrainConfig(
        mode="full", steps=200, images_per_step=2, max_instances=2, lr=3e-3, weight_decay=0.0, warmup_steps=10,
        val_every=0, val_clicks=1, save_every=0, augment=AugmentConfig.none(),
        prompts=PromptConfig(num_point_rounds=1, num_mask_only_rounds=0, box_probability=0.0),
    )
    with one_thread():
        trainer = Trainer(tiny_model(), cfg, tmp_path / "run", records, {"train": val}, progress=False)
        history = trainer.run()
    before, after = history[0]["val_train_miou@1"], history[-1]["val_train_miou@1"]
    assert before < 0.5
    assert after >= 0.9, f"1-click mIoU on the training images {before:.3f} -> {after:.3f}"
    assert (tmp_path / "run" / MODEL_FILE).is_file() and (tmp_path / "run" / "curves.png").is_file()
    header = (tmp_path / "run" / "log.csv").read_text().splitlines()[0]
    assert header.startswith("step,lr,loss,focal,dice,iou_mse") and "val_train_miou@1" in header


@pytest.mark.parametrize("mode", ["decoder", "lora"])
def test_resume_is_bit_for_bit(tmp_path, mode):
    root = synthetic_images(tmp_path / "data", n=3)
    records = folder_records(root / "images", root / "masks")
    cfg = dict(mode=mode, steps=4, images_per_step=2, max_instances=2, lr=1e-3, warmup_steps=2, val_every=0,
               save_every=0, prompts=PromptConfig(num_point_rounds=2, num_mask_only_rounds=1),
               augment=AugmentConfig(flip=True, scale_range=(0.8, 1.3)), cache_dir=str(tmp_path / "cache"))
    with one_thread():
        straight = Trainer(tiny_model(dim=32), TrainConfig(**cfg), tmp_path / "a", records, progress=False)
        straight.run()
        first = Trainer(tiny_model(dim=32), TrainConfig(**cfg), tmp_path / "b", records, progress=False)
        first.run(stop_after=2)
        assert first.step == 2
        # A new process would start here: a fresh model and trainer, then the saved state.
        resumed = Trainer(tiny_model(seed=5, dim=32), TrainConfig(**{**cfg, "workers": 1}), tmp_path / "b", records, progress=False)
        resumed.load_state_dict(Trainer.resume_state(tmp_path / "b"))
        resumed.run()
    assert resumed.step == 4
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    initial = tiny_model(dim=32).state_dict()
    changed = 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
        changed += int(not torch.equal(a[key], initial.get(key, a[key])))
    assert changed > 0  # training did move the weights
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    with pytest.raises(ValueError, match="different settings"):
        Trainer(tiny_model(dim=32), TrainConfig(**{**cfg, "lr": 5e-4}), tmp_path / "c", records, progress=False).load_state_dict(
            Trainer.resume_state(tmp_path / "b"))


def reference_sam_from_config(cfg: SamConfig):
    """The released Sam built from its modules for any ViT config (its registry knows only b/l/h)."""
    import_reference("segment_anything")
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    e, d = cfg.encoder, cfg.decoder
    side = e.img_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=e.img_size, patch_size=e.patch_size, in_chans=e.in_chans, embed_dim=e.embed_dim, depth=e.depth,
            num_heads=e.num_heads, mlp_ratio=e.mlp_ratio, out_chans=e.out_chans, qkv_bias=e.qkv_bias,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_abs_pos=e.use_abs_pos, use_rel_pos=e.use_rel_pos,
            window_size=e.window_size, global_attn_indexes=tuple(e.global_attn_indexes),
        ),
        prompt_encoder=PromptEncoder(embed_dim=cfg.prompt_embed_dim, image_embedding_size=(side, side),
                                     input_image_size=(e.img_size, e.img_size), mask_in_chans=cfg.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=d.num_multimask_outputs,
            transformer=TwoWayTransformer(depth=d.transformer_depth, embedding_dim=cfg.prompt_embed_dim,
                                          mlp_dim=d.transformer_mlp_dim, num_heads=d.transformer_num_heads),
            transformer_dim=cfg.prompt_embed_dim, iou_head_depth=d.iou_head_depth, iou_head_hidden_dim=d.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def compare_with_reference(path: Path, image: np.ndarray, tol: float = 1e-4) -> float:
    """Load a checkpoint in segany and in the released code; run the same prompts; return the max logit gap."""
    ours = segany.load_model(path)
    ref = reference_sam_from_config(ours.config)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    ref.load_state_dict({k: v.float() for k, v in sd.items()})
    side = ours.image_size
    from segany.predict.transforms import ResizeLongestSide

    resized = ResizeLongestSide(side).apply_image(image)
    h, w = image.shape[:2]
    tensor = torch.as_tensor(np.array(resized)).permute(2, 0, 1).float()
    coords = ResizeLongestSide(side).apply_coords(np.array([[[w * 0.3, h * 0.4], [w * 0.6, h * 0.5]]]), (h, w))
    record = {"image": tensor, "original_size": (h, w), "point_coords": torch.as_tensor(coords, dtype=torch.float32),
              "point_labels": torch.tensor([[1, 0]])}
    gap = 0.0
    for multimask in (True, False):
        a = ours([dict(record)], multimask)[0]
        b = ref([dict(record)], multimask)[0]
        gap = max(gap, (a["low_res_logits"] - b["low_res_logits"]).abs().max().item(),
                  (a["iou_predictions"] - b["iou_predictions"]).abs().max().item())
    assert gap <= tol, f"segany and the released code differ by {gap}"
    return gap


def test_lora_merges_into_a_plain_checkpoint(tmp_path):
    model = tiny_model(dim=32)
    plain_keys = set(model.state_dict())
    adapters = add_lora(model, rank=2, alpha=4.0)
    assert len(adapters) == 2 and all(isinstance(a, LoRALinear) for a in adapters)
    torch.manual_seed(1)
    for a in adapters:
        torch.nn.init.normal_(a.lora_b, std=0.5)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        with_adapters = model.image_encoder(x)
        base = copy.deepcopy(model)
        for a in [m for m in base.modules() if isinstance(m, LoRALinear)]:
            a.lora_b.zero_()
        assert (with_adapters - base.image_encoder(x)).abs().max() > 1e-2  # the adapters do act
    sd = release_state_dict(model)
    assert set(sd) == plain_keys
    path = segany.io.save_checkpoint(sd, tmp_path / "merged.pth")
    loaded = segany.load_model(path)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    with torch.no_grad():
        np.testing.assert_allclose(loaded.image_encoder(x).numpy(), with_adapters.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(merged.image_encoder(x).numpy(), with_adapters.numpy(), atol=1e-5, rtol=0)


def test_trained_checkpoint_loads_in_segany_and_the_released_code(tmp_path):
    root = synthetic_images(tmp_path / "data", n=2)
    records = folder_records(root / "images", root / "masks")
    cfg = TrainConfig(mode="lora", steps=3, images_per_step=1, max_instances=2, lr=1e-2, warmup_steps=1,
                      val_every=0, save_every=0, prompts=PromptConfig(num_point_rounds=1, num_mask_only_rounds=0))
    with one_thread():
        initial = release_state_dict(tiny_model())
        trainer = Trainer(tiny_model(), cfg, tmp_path / "run", records, progress=False)
        trainer.run()
    path = tmp_path / "run" / MODEL_FILE
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert set(sd) == set(initial)
    moved = [k for k in sd if not torch.equal(sd[k], initial[k])]
    assert any(k.startswith("image_encoder.blocks") and k.endswith("qkv.weight") for k in moved)  # LoRA merged
    assert any(k.startswith("mask_decoder") for k in moved)
    image = np.array(Image.open(root / "images" / "0.png").convert("RGB"))
    compare_with_reference(path, image)


def test_cli_train_writes_and_resumes(tmp_path):
    from segany.cli.main import main

    root = synthetic_images(tmp_path / "data", n=2)
    ckpt = segany.io.save_checkpoint(tiny_model(dim=32), tmp_path / "tiny.pth")
    spec = f"folder:{root / 'images'},{root / 'masks'}"
    args = ["train", "-c", str(ckpt), "-d", spec, "--val", f"syn={spec}", "-o", str(tmp_path / "run"),
            "--point-rounds", "1", "--mask-rounds", "0", "--workers", "0", "--no-progress", "--val-clicks", "2",
            "--threads", "1", "--instances", "1", "--lr", "1e-3"]
    with one_thread():
        main(args + ["--steps", "3", "--stop-after", "2"])
        state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)
        assert state["step"] == 2
        with pytest.raises(SystemExit) as exc:
            main(args + ["--steps", "3"])  # the run exists: must ask for --resume
        assert exc.value.code == 2
        main(args + ["--steps", "3", "--resume"])
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(log) == 1 + 1 + 3  # header, step-0 validation, 3 steps
    assert "val_syn_miou@2" in log[0]
    assert segany.load_model(tmp_path / "run" / MODEL_FILE) is not None
    with pytest.raises(SystemExit) as exc:
        main(["train", "-c", str(ckpt), "-d", "folder:/nonexistent,/nowhere", "-o", str(tmp_path / "x")])
    assert exc.value.code == 2


def test_distill_tinyvit_student_learns_teacher_embeddings(tmp_path):
    from segany.train.distill import DistillConfig, Distiller

    root = synthetic_images(tmp_path / "data", n=3)
    records = folder_records(root / "images", root / "masks")
    teacher = tiny_model(dim=32)
    student = {"embed_dims": (16, 24, 32, 32), "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2),
               "window_sizes": (4, 4, 4, 4), "num_classes": 0}
    cfg = DistillConfig(steps=40, images_per_step=3, lr=3e-3, warmup_steps=2, save_every=0, student=student, flip=False)
    with one_thread():
        distiller = Distiller(teacher, cfg, tmp_path / "run", records, progress=False)
        history = distiller.run()
    assert distiller.cache.misses == 3 and distiller.cache.hits == 3 * 39  # teacher embeddings computed once
    first, last = history[0]["loss"], np.mean([r["loss"] for r in history[-3:]])
    assert last < 0.5 * first, (first, last)
    cfg_student = distiller.student.config
    loaded = segany.load_model(tmp_path / "run" / "model.pth", config=cfg_student)
    assert type(loaded.image_encoder).__name__ == "TinyViT"
    for key, value in teacher.mask_decoder.state_dict().items():
        assert torch.equal(loaded.mask_decoder.state_dict()[key], value)
    with torch.no_grad():
        x = torch.randn(1, 3, 128, 128)
        distiller.student.eval()  # TinyViT has batch norm: compare in eval mode
        np.testing.assert_allclose(loaded.image_encoder(x).numpy(), distiller.encoder(x).numpy(), atol=1e-5)
