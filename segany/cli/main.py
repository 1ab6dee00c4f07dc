"""`segany` entry point: a Click group whose sub-commands are imported only when used, so that
`segany --help` stays fast and a sub-command's heavy imports (torch, FastAPI) load only for it."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Dict, List, Optional

import click

# name -> (module, attribute, one-line help)
COMMANDS: Dict[str, tuple] = {
    "segment": ("segany.cli.segment", "segment", "Segment an image from points and/or a box."),
    "everything": ("segany.cli.everything", "everything", "Segment everything in images (automatic masks)."),
    "embed": ("segany.cli.batch", "embed", "Precompute the annotation server's image embeddings."),
    "models": ("segany.cli.zoo", "models", "List the known checkpoints."),
    "download": ("segany.cli.zoo", "download", "Download a released checkpoint into the cache."),
    "export-onnx": ("segany.cli.export", "export_onnx", "Export the model to ONNX."),
    "eval": ("segany.cli.eval", "eval_group", "Evaluate a model on benchmark datasets."),
    "serve": ("segany.cli.serve", "serve", "Run the annotation server and browser tool."),
    "train": ("segany.cli.train", "train", "Train or fine-tune a model."),
    "distill": ("segany.cli.train", "distill", "Distil a light image encoder from a teacher."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> List[str]:
        present = [n for n, (mod, _, _) in COMMANDS.items() if importlib.util.find_spec(mod) is not None]
        return sorted(set(present) | set(super().list_commands(ctx)))

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name in COMMANDS:
            module_name, attr, _ = COMMANDS[name]
            if importlib.util.find_spec(module_name) is None:
                return None
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, COMMANDS[n][2]) for n in self.list_commands(ctx) if n in COMMANDS]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="segany")
def cli() -> None:
    """segany: Segment Anything on your own machine.

    \b
    Quick start:
      segany download vit_b
      segany segment photo.jpg --checkpoint vit_b --point 320,200 --out out/
      segany everything photos/ --checkpoint vit_b --out masks/

    Checkpoints are given as a file path or a model name (see `segany models`).
    """


def main(argv: Optional[List[str]] = None) -> None:
    """Run the CLI; a user error (ValueError, missing file) is one line on stderr and exit code 2."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (ValueError, OSError) as exc:  # bad input, missing / unwritable / existing-as-file paths
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
