"""Where images come from, for the commands that take ``--data``: a folder, a list file of
paths / URLs, local tar shards or the built-in generated shapes, as one dataset
(``open_images``) or as the labelled train / held-out pair of the evaluation commands
(``labelled_splits``). It sits above ``datasets`` and ``shards``, which both formats need."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from cmae.data.datasets import (
    DataError,
    SyntheticShapes,
    is_list_file,
    is_shards,
    open_folder_or_list,
    split_dirs,
)
from cmae.data.shards import open_shard_files, shard_file_splits


def open_images(
    path: str | Path, transform: Callable | None = None, command: str = "this command"
) -> Dataset:
    """A folder (``ImageFiles``), a list file (``ImageList``) or local tar shards
    (``cmae.data.shards.ShardFiles``; ``pipe:`` shards are refused naming ``command``)."""
    if is_shards(path):
        return open_shard_files(str(path), transform, command)
    return open_folder_or_list(path, transform)


def labelled_splits(
    path: str | None,
    train_transform: Callable,
    eval_transform: Callable,
    synthetic: dict[str, Any],
    command: str = "this command",
) -> tuple[Dataset, Dataset, list[str]]:
    """(train set, held-out set, class names) for the evaluation commands.

    ``path=None`` uses the generated shapes (the same train / held-out seeds as pretraining);
    local tar shards (a pattern with "train" and a "val" or "test" twin, as kNN finds them)
    are read with random access (``cmae.data.shards.shard_file_splits``; ``pipe:`` shards are
    refused naming ``command``); otherwise ``path`` must hold train/ and val/ (or test/) with
    the same class folders.
    """
    if path is None:
        n, size, s = synthetic["train"], synthetic["size"], synthetic["seed"]
        colors = synthetic.get("colors", "color")
        train = SyntheticShapes(n, size, s, train_transform, colors=colors)
        held = SyntheticShapes(synthetic["val"], size, s + 1_000_003, eval_transform, colors=colors)
        return train, held, train.classes
    if is_shards(path):
        return shard_file_splits(str(path), train_transform, eval_transform, command)
    root = Path(path).expanduser()
    if not (root.is_dir() or (root.is_file() and is_list_file(root))):
        raise DataError(f"data path does not exist or is not a directory or list file: {root}")
    train_dir, held_dir = split_dirs(root)
    if held_dir is None:
        raise DataError(
            f"{root}: evaluation needs train/ and val/ (or test/) class folders, or a list "
            "file whose name has 'train' with a 'val' (or 'test') twin beside it"
        )
    train, held = open_images(train_dir, train_transform), open_images(held_dir, eval_transform)
    if len(train.classes) < 2 or -1 in train.labels or -1 in held.labels:
        raise DataError(f"{root}: train/ and {held_dir.name}/ must hold one folder per class")
    if held.classes != train.classes:
        raise DataError(f"class folders of {held_dir} differ from those of {train_dir}")
    return train, held, train.classes
