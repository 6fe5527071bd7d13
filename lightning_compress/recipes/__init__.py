"""Ready-made LightningCLI configurations: the ``trainer`` part of a compression run, to combine with your model.

Each recipe is a YAML file in this folder holding ``trainer.callbacks`` (and nothing about the model or the
data), so it composes with your own configuration::

    python train.py fit --config $(python -c "import lightning_compress.recipes as r; print(r.path('int8_qat'))") \\
        --config my_model_and_data.yaml

Example::

    >>> from lightning_compress import recipes
    >>> recipes.names()
    ['deep_compression', 'distillation', 'full_pipeline', 'int8_qat', 'low_rank', 'structured_2x']
    >>> recipes.path("int8_qat").name
    'int8_qat.yaml'
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    """The names of the shipped recipes, sorted."""
    return sorted(p.stem for p in _HERE.glob("*.yaml"))


def path(name: str) -> Path:
    """The YAML file of recipe ``name`` (see :func:`names`), to pass to ``--config``."""
    candidate = _HERE / f"{name}.yaml"
    if not candidate.is_file():
        raise ValueError(f"Unknown recipe `name={name!r}`; choose one of {names()}.")
    return candidate
