"""Leave-one-slide-out validation of the VAE recipe: what users get on slides the model never saw.

For each slide: a VAE is trained (:func:`~wsi_xr.models.train.train_vae`) and a PCA fitted on
the tissue tiles of *all the other* slides only (held out before training: the held-out
slide's tiles are never drawn), then both, and k x k x 3 downsampling, are scored by
reconstruction MSE on the held-out slide's tissue tiles (:func:`wsi_xr.sampling.evaluate_slides`).
The shipped default weights are scored beside them, marked when the held-out slide was among
their training slides.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_xr.errors import InvalidArgumentError

__all__ = ["Fold", "leave_one_slide_out"]

#: Slides the shipped default weights were trained on (file names; README "The shipped weights").
DEFAULT_TRAINING_SLIDES = ("cmu-1-small-region.svs", "kidney-48-5.tif")


@dataclass
class Fold:
    """One held-out slide: its tile counts and the MSE of each method on it (None: not run, with ``note``)."""

    held_out: str
    train_slides: list[str]
    train_tiles: int
    eval_tiles: int
    mse: dict[str, float | None] = field(default_factory=dict)
    note: str = ""

    def beats_pca_by(self) -> float | None:
        """``1 - vae / pca``: the VAE's gain over PCA-32 (>= 0.10 is the goal), None when not run."""
        vae, pca = self.mse.get("vae"), self.mse.get("pca32")
        return None if vae is None or not pca else 1.0 - vae / pca

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "vae_gain_over_pca": self.beats_pca_by()}


#: The shipped weights' recipe (README "The shipped weights"), less its stride and epochs.
SHIPPED_RECIPE: dict[str, Any] = {
    "batch_size": 16,
    "lr": 5e-4,
    "loss": "mse",
    "schedule": "cosine",
    "warmup": 0.02,
    "init_logvar": -8.0,
    "stain_jitter": 0.05,
}


def leave_one_slide_out(
    slides: Sequence[str | os.PathLike[str]],
    *,
    epochs: int = 24,
    stride: int | None = None,
    max_train_tiles: int | None = None,
    max_eval_tiles: int | None = 1000,
    seed: int = 0,
    default_weights: bool = True,
    **train_options: Any,
) -> list[Fold]:
    """One :class:`Fold` per slide of ``slides`` (at least two): train on the others, score on it.

    ``train_options`` go to :func:`~wsi_xr.models.train.train_vae` over
    :data:`SHIPPED_RECIPE` (``lr``, ``kl_weight``, ``stain_jitter``, ``zoom``, ...);
    ``stride`` trains (and fits the PCA) also on the tissue tiles shifted by multiples of it,
    as ``wsi-xr train --stride``. A slide without tissue tiles is scored by nothing (its fold
    says so); a fold whose other slides have fewer than 2 tissue tiles trains nothing.
    """
    import numpy as np

    from wsi_xr.models.train import train_vae
    from wsi_xr.sampling import evaluate_slides, sample_tissue_tiles

    if len(slides) < 2:
        raise InvalidArgumentError("leave-one-slide-out needs at least two slides (one is held out, the others train).")

    def has_tissue(slide: str | os.PathLike[str]) -> bool:
        try:
            return len(sample_tissue_tiles([slide], max_tiles=1, seed=seed)[0]) > 0
        except InvalidArgumentError as err:
            if "no tissue tiles" in str(err):
                return False
            raise

    with_tissue = [has_tissue(s) for s in slides]
    folds: list[Fold] = []
    for i, held in enumerate(slides):
        others = [s for j, s in enumerate(slides) if j != i and with_tissue[j]]
        name = Path(os.fspath(held)).name
        fold = Fold(name, [Path(os.fspath(s)).name for s in others], 0, 0)
        folds.append(fold)
        if not with_tissue[i]:
            fold.note = "no tissue tile to score on"
            continue
        eval_tiles, _ = sample_tissue_tiles([held], max_tiles=max_eval_tiles, seed=seed)
        fold.eval_tiles = len(eval_tiles)
        train_tiles = (  # the held-out slide is never drawn
            sample_tissue_tiles(others, max_tiles=max_train_tiles, seed=seed, stride=stride)[0] if others else np.empty((0, 64, 64, 3), np.uint8)
        )
        fold.train_tiles = len(train_tiles)
        if len(train_tiles) < 2:
            fold.note = f"{len(train_tiles)} tissue tile(s) on the other slides: nothing to train on"
            continue
        model = train_vae(train_tiles, epochs=epochs, seed=seed, progress=False, **{**SHIPPED_RECIPE, **train_options}).model
        report = evaluate_slides(
            model, [held], train_slides=others, max_tiles=max_eval_tiles, max_train_tiles=max_train_tiles, seed=seed, train_stride=stride
        )
        row = next(iter(report.rows.values()))
        fold.mse = {method: float(row[method]) for method in report.methods}
        if default_weights:
            shipped = evaluate_slides(None, [held], max_tiles=max_eval_tiles, seed=seed)
            fold.mse["shipped"] = float(next(iter(shipped.rows.values()))["vae"])
            if name in DEFAULT_TRAINING_SLIDES:
                fold.note = "the shipped weights were trained on this slide (in-sample for them)"
    return folds


def fold_table(folds: Sequence[Fold]) -> str:
    """A Markdown table of the folds: tiles, each method's MSE, the VAE's gain over PCA-32."""
    methods: list[str] = []
    for fold in folds:
        methods += [m for m in fold.mse if m not in methods]
    lines = [
        "| held out | train tiles | eval tiles | " + " | ".join(methods) + " | VAE vs PCA-32 | note |",
        "|" + "---|" * (len(methods) + 5),
    ]
    for fold in folds:
        cells = [f"{fold.mse[m]:.4f}" if fold.mse.get(m) is not None else "–" for m in methods]
        gain = fold.beats_pca_by()
        gain_text = "–" if gain is None else f"{gain:+.1%}"
        lines.append(f"| {fold.held_out} | {fold.train_tiles} | {fold.eval_tiles} | " + " | ".join(cells) + f" | {gain_text} | {fold.note} |")
    return "\n".join(lines)
