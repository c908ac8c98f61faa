"""The embedded synthetic FER data set as a reader: ``fermine ingest synthetic SEED OUT -o size=64 ...``.

ROOT is not a folder here: a whole number is taken as the seed, anything else ("-", ".", "synthetic")
is ignored. Options are the fields of storage.synthetic.SyntheticConfig (size, train_per_class,
test_per_class, val_per_class, pool_size, label_noise, noise_kind, style, ...); strings from the
command line are converted to each field's type. ``occlusion_test_per_class`` and
``pose_test_per_class`` add the challenge test splits ``test_occlusion``, ``test_pose30`` and
``test_pose45`` (PASM Table III), written after the other splits; both default to 0 (none).
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any, Iterator

from storage.readers import register
from storage.readers.base import Record
from storage.synthetic import SyntheticConfig, config_from_options, generate


def _seed_from_root(root: Any) -> int | None:
    text = str(root if root is not None else "").strip()
    try:
        return int(text)
    except ValueError:
        return None  # not a seed: the generator needs no folder, so ROOT is ignored


@register("synthetic")
def read(root: str = "", **options: Any) -> Iterator[Record]:
    """Generate the synthetic set; options are SyntheticConfig fields. Bad options raise ValueError now."""
    seed = _seed_from_root(root)
    if seed is not None and options.get("seed") not in (None, seed):
        raise ValueError(f"seed given twice: ROOT says {seed}, the seed option says {options['seed']}; "
                         "give one of them")
    options = {k: v for k, v in options.items() if v is not None}  # `-o source=none` = the default
    if seed is not None:
        options["seed"] = seed
    cfg = config_from_options(**options)  # validated here, before the caller creates its output
    return generate(cfg)


# Advertise the config's fields as the reader's options (with defaults), so `fermine ingest` and
# `fermine formats` can list them and reject unknown ones before generating anything.
read.__signature__ = inspect.Signature(
    [inspect.Parameter("root", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="")]
    + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=getattr(SyntheticConfig(), f.name))
       for f in fields(SyntheticConfig)]
)
