"""Lung segmentation: a MONAI U-Net trained on public lung masks, its post-processing, a classical fallback.

Paper 000 removes dataset bias by keeping only the lungs: whatever lies outside them (text markers,
devices, the edge of the film) can identify the hospital, and a classifier learns it instead of the
disease. This package draws those lungs.

Two mask conventions, handled on purpose
----------------------------------------
The public mask sets do not draw the same lungs. OpenIST, Montgomery, Shenzhen and the COVID-19 Radiography
Database trace the *visible* lung fields and leave the heart out (``heart-excluded``). V7 Labs, on Cohen's
COVID-19 images, draws the *whole* lungs including the part hidden behind the heart, down to the
diaphragm (``behind-heart-included``). The second region contains the first. Training one output on the
mix would teach the model that the area behind the heart is lung on COVID-19 images and not on normal
ones: a label-correlated shape difference, the very kind of shortcut this preprocessing exists to remove.
Scoring a heart-excluded prediction against a v7labs mask would also penalise a correct model by the
whole retrocardiac area.

Design: **one network, one output channel per convention** (``class_names`` of the checkpoint:
``["heart-excluded", "behind-heart-included"]``).

* Each training row supervises the channel of its own convention (Dice + BCE); the other channel learns
  only what the containment guarantees: a heart-excluded lung pixel is also lung in the whole-lung
  convention, and a pixel outside the whole lungs is outside the visible fields too. The encoder is
  shared, so both channels learn from every image (adults, children, COVID-19 opacities).
* ``lungscreen lungs evaluate`` scores every row against the channel of its own convention and reports
  each (source, convention) separately; nothing is compared across conventions.
* Preprocessing picks one convention for every image (``segment_lungs.convention``), so all sources
  get the same kind of mask. The default is ``heart-excluded``, the convention of the masks paper 000
  trained on (Montgomery and Shenzhen); ``behind-heart-included`` keeps retrocardiac opacities, which
  V7 argue matter for COVID-19 pneumonia, at the price of keeping the heart's outline in the input.

Converting masks instead was rejected: removing the heart from v7labs masks or adding it to the others
would need a heart segmentation nobody published for these images.

Fallback
--------
Where no trained model exists, ``segment_lungs(method="auto")`` warns loudly and uses
:func:`~lungscreen.lungs.classical.classical_lung_mask` (thresholding + morphology, documented there);
``lungscreen preprocess --if-no-lung-model train`` trains the default model on the manifest's masks first.
The mask is never silently skipped.

Example:
    >>> from lungscreen.lungs import load_segmenter                        # doctest: +SKIP
    >>> segmenter = load_segmenter("unet", "lung_unet.pt", "heart-excluded")
    >>> mask = segmenter.segment(read_image("chest.png").pixels)          # bool (H, W)
"""

from lungscreen.lungs.classical import classical_lung_mask
from lungscreen.lungs.data import CONVENTIONS, mask_rows
from lungscreen.lungs.postprocess import clean_mask, fill_holes, keep_largest_components
from lungscreen.lungs.segmenter import (
    ClassicalSegmenter,
    UNetSegmenter,
    default_model_path,
    load_segmenter,
)
from lungscreen.lungs.step import LungModelWarning, SegmentLungs, find_lung_model

__all__ = [
    "CONVENTIONS",
    "LungModelWarning",
    "SegmentLungs",
    "find_lung_model",
    "ClassicalSegmenter",
    "UNetSegmenter",
    "classical_lung_mask",
    "clean_mask",
    "default_model_path",
    "fill_holes",
    "keep_largest_components",
    "load_segmenter",
    "mask_rows",
]
