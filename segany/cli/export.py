"""`segany export-onnx`: the prompt decoder (and optionally the image encoder) as ONNX graphs."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click


@click.command("export-onnx")
@click.option("--checkpoint", "-c", required=True, help="Checkpoint file or model name.")
@click.option("--out", "-o", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Decoder graph path (e.g. sam_decoder.onnx).")
@click.option("--encoder-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also export the image encoder to this path.")
def export_onnx(checkpoint: str, out: Path, encoder_out: Optional[Path]) -> None:
    """Export the prompt encoder + mask decoder (and with --encoder-out the image encoder) to ONNX.

    \b
    Decoder inputs: image_embeddings (1,256,64,64), point_coords (1,N,2) in the 1024 frame,
    point_labels (1,N) (1 fg, 0 bg, 2/3 box corners, -1 padding), mask_input (1,1,256,256),
    has_mask_input (1,), orig_im_size (2,). Outputs: masks (1,4,H,W) logits, iou_predictions (1,4),
    low_res_masks (1,4,256,256); channel 0 is the single-mask output. Use it with
    segany.predict.onnx_predictor.OnnxPredictor.
    """
    try:
        import onnx  # noqa: F401  (the exporter writes through it)
    except ImportError as err:
        raise click.UsageError("ONNX export needs the onnx extra: pip install 'segany[onnx]'") from err
    from .. import load_model
    from ..io.onnx_export import export_decoder, export_encoder

    model = load_model(checkpoint, mode="exact")
    click.echo(f"decoder: {export_decoder(model, out)}")
    if encoder_out is not None:
        click.echo(f"encoder: {export_encoder(model, encoder_out)}")
