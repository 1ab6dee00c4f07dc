"""Evaluation harness: benchmark readers, the click simulator, metrics, the SAM paper's protocols and
reports. See docs/eval.md."""
from .clicks import Click, first_click, next_click
from .datasets import CocoDataset, ImageSample, Instance, MaskFolderDataset, open_dataset
from .metrics import iou, noc
from .protocols import (PROTOCOLS, EvalSettings, Predictor, PredictorOutput, ProposalGenerator,
                        SeganyPredictor, evaluate_prompted, evaluate_proposals, mask_ap)

__all__ = ["Click", "CocoDataset", "EvalSettings", "ImageSample", "Instance", "MaskFolderDataset", "PROTOCOLS",
           "Predictor", "PredictorOutput", "ProposalGenerator", "SeganyPredictor", "evaluate_prompted",
           "evaluate_proposals", "first_click", "iou", "mask_ap", "next_click", "noc", "open_dataset"]
