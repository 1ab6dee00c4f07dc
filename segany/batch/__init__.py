"""Batch runs over many images (everything mode, embeddings): in-process or on a Ray cluster.

Above segany.predict and segany.io, below the CLI: sources (folders, lists, manifests, SA-1B tar
shards), workers (one model replica each), sinks (SA-1B JSON, Parquet shards) and the runner.
"""
from .runner import RayOptions, Summary, run_embed, run_everything
from .sources import Item, list_items

__all__ = ["RayOptions", "Summary", "run_embed", "run_everything", "Item", "list_items"]
