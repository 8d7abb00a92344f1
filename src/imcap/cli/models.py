"""`imcap models`: the captioning families imcap knows."""

from __future__ import annotations

import typer

from imcap.cli.common import (
    command,
)


@command()
def models() -> None:
    """List the model families imcap runs: well-known hub ids, size, licence, prompts.

    Information only: nothing is downloaded.
    """
    from imcap.families import FAMILIES

    typer.echo("family\tmodel_type\tprompt\tcheckpoint\tparams\tlicence")
    for family in FAMILIES:
        prompt = f"default: {family.default_prompt}" if family.default_prompt else "optional"
        prompt = prompt if family.takes_prompt else "no"
        for checkpoint in family.checkpoints:
            row = (family.name, ",".join(family.model_types), prompt, *vars(checkpoint).values())
            typer.echo("\t".join(row))
    typer.echo(
        "other image-text-to-text models of transformers load too (untested): with a chat template they "
        "take --prompt (default: a one-sentence caption)",
        err=True,
    )
