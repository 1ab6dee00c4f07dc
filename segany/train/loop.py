"""The step loop shared by training and distillation: progress bar, periodic saves, save on Ctrl-C."""
from __future__ import annotations

from typing import Any, Callable, Dict, List


def run_steps(
    trainer: Any,
    end: int,
    next_row: Callable[[], Dict[str, Any]],
    desc: str,
    postfix: Callable[[Dict[str, Any]], Dict[str, str]],
) -> List[Dict[str, Any]]:
    """Run `next_row` (one step; it advances trainer.step) until trainer.step reaches `end`.

    `trainer` has step, history, progress, cfg.steps, cfg.save_every and save(). The state is saved
    at `end`, every cfg.save_every steps, and at the last finished step when interrupted.
    """
    bar = None
    if trainer.progress:
        from tqdm import tqdm

        bar = tqdm(total=trainer.cfg.steps, initial=trainer.step, desc=desc, unit="step", dynamic_ncols=True)
    save_every = trainer.cfg.save_every
    try:
        while trainer.step < end:
            row = next_row()
            trainer.history.append(row)
            if bar is not None:
                bar.set_postfix(postfix(row))
                bar.update(1)
            if trainer.step == end or (save_every > 0 and trainer.step % save_every == 0):
                trainer.save()
    except KeyboardInterrupt:
        trainer.save()
        raise
    finally:
        if bar is not None:
            bar.close()
    return trainer.history
