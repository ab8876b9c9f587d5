"""Blend a warped source face into the target: mask, colour transfer, Poisson clone.

* Mask: the target landmarks' convex hull, eroded a little so the seam falls on skin
  rather than on the background or hair at the face edge, minus the target's inner
  mouth so its teeth and tongue stay (a closed source mouth pasted over an open target
  mouth looks wrong).
* Colour: Reinhard transfer in LAB (match the per-channel mean and spread of the warped
  face to the target face under the mask), so lighting and skin tone follow the target.
* Clone: ``cv2.seamlessClone`` NORMAL_CLONE solves a Poisson equation that keeps the
  source's gradients (its features) and the target's boundary values, hiding the seam.
  It runs on the face box only, never on the whole frame.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from .landmarks import INNER_LIPS
from .warp import WarpedFace

__all__ = ["blend_face", "face_mask", "reinhard_colour_transfer"]

FloatArray = npt.NDArray[np.float32]
ByteImage = npt.NDArray[np.uint8]

# Erosion and mouth dilation as fractions of the face width: the seam should sit a few
# percent inside the face outline whatever the face size.
_EROSION_FRACTION = 0.03
_MOUTH_DILATION_FRACTION = 0.015
# Bounds on the spread ratio: a near-uniform source patch must not blow up noise.
_MIN_SPREAD_RATIO, _MAX_SPREAD_RATIO = 0.5, 2.0


def _odd_kernel(size: float) -> npt.NDArray[np.uint8]:
    side = max(3, round(size) | 1)
    return np.asarray(cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side)), dtype=np.uint8)


def face_mask(target_points: FloatArray, warped: WarpedFace) -> ByteImage:
    """0/255 mask over ``warped.box``: eroded hull, minus the inner mouth, within the warped mesh."""
    box = warped.box
    local = target_points - np.array([box.x0, box.y0], dtype=np.float32)
    face_width = float(np.ptp(target_points[:, 0]))
    mask = np.zeros((box.height, box.width), dtype=np.uint8)
    hull = cv2.convexHull(np.round(local * 16).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_AA, shift=4)
    mask[~warped.covered] = 0
    mask = np.asarray(cv2.erode(mask, _odd_kernel(face_width * _EROSION_FRACTION)), dtype=np.uint8)
    mouth = np.zeros_like(mask)
    cv2.fillPoly(mouth, [np.round(local[list(INNER_LIPS)] * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    mouth = np.asarray(cv2.dilate(mouth, _odd_kernel(face_width * _MOUTH_DILATION_FRACTION)), dtype=np.uint8)
    mask[mouth > 0] = 0
    # seamlessClone needs a one-pixel frame of zeros round the mask.
    mask[[0, -1], :] = 0
    mask[:, [0, -1]] = 0
    return mask


def reinhard_colour_transfer(source: ByteImage, target: ByteImage, mask: ByteImage) -> ByteImage:
    """``source`` recoloured so its LAB mean and standard deviation under ``mask`` match ``target``'s."""
    if cv2.countNonZero(mask) < 16:
        return source
    source_lab = cv2.cvtColor(source, cv2.COLOR_BGR2LAB)
    target_lab = cv2.cvtColor(target, cv2.COLOR_BGR2LAB)
    source_mean, source_std = (values.reshape(3) for values in cv2.meanStdDev(source_lab, mask=mask))
    target_mean, target_std = (values.reshape(3) for values in cv2.meanStdDev(target_lab, mask=mask))
    ratio = np.clip(target_std / np.maximum(source_std, 1e-3), _MIN_SPREAD_RATIO, _MAX_SPREAD_RATIO)
    # One fused per-channel affine (scale, offset) on uint8: x * ratio + (mean_t - mean_s * ratio).
    offset = target_mean - source_mean * ratio
    recoloured = cv2.transform(source_lab, np.hstack([np.diag(ratio), offset[:, np.newaxis]]))
    return np.asarray(cv2.cvtColor(recoloured, cv2.COLOR_LAB2BGR), dtype=np.uint8)


def blend_face(target_image: ByteImage, target_points: FloatArray, warped: WarpedFace) -> None:
    """Blend ``warped`` into ``target_image`` in place (only the face box changes)."""
    box = warped.box
    if box.width < 8 or box.height < 8:
        return
    mask = face_mask(target_points, warped)
    ys, xs = np.nonzero(mask)
    if len(xs) < 16:
        return
    target_patch = target_image[box.y0 : box.y1, box.x0 : box.x1]
    recoloured = reinhard_colour_transfer(warped.pixels, target_patch, mask)
    # seamlessClone centres the mask's bounding rectangle on ``centre``; this centre puts
    # the patch back exactly where it came from.
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    centre = (x0 + (x1 - x0) // 2, y0 + (y1 - y0) // 2)
    cloned = cv2.seamlessClone(recoloured, np.ascontiguousarray(target_patch), mask, centre, cv2.NORMAL_CLONE)
    target_patch[:] = cloned
