"""Blend a warped source face into the target: mask, colour transfer, Poisson clone.

* Mask: the target landmarks' convex hull, eroded a little so the seam falls on skin
  rather than on the background or hair at the face edge, minus the target's inner
  mouth so its teeth and tongue stay (a closed source mouth pasted over an open target
  mouth looks wrong).
* Colour: Reinhard transfer in LAB (match the per-channel mean and spread of the warped
  face to the target face under the mask), so lighting and skin tone follow the target.
* Clone: a Poisson equation that keeps the source's gradients (its features) and the
  target's boundary values, hiding the seam: the equations of ``cv2.seamlessClone``
  NORMAL_CLONE (guidance field: the source's gradients under the mask eroded by 3 px, the
  target's elsewhere; the target's values on the rectangle's border), solved exactly
  with a 2-D discrete sine transform in numpy (float32). OpenCV solves the same system with its
  DFT over the mask's bounding rectangle, whatever its size: a side like 173 (a prime)
  made it the largest cost of a video frame. Here the rectangle is grown, inside the
  face box, to a side whose transform is fast (``_fast_side``). It runs on the face box
  only, never on the whole frame.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from .landmarks import INNER_LIPS
from .warp import WarpedFace

__all__ = ["blend_face", "face_mask", "poisson_clone", "reinhard_colour_transfer"]

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


def _is_fast(length: int) -> bool:
    """True when ``length`` has no prime factor above 7 (a fast FFT length)."""
    for prime in (2, 3, 5, 7):
        while length % prime == 0:
            length //= prime
    return length == 1


def _fast_side(low: int, high: int, room: int) -> tuple[int, int]:
    """``(start, end)`` of a span holding ``low..high`` within ``0..room`` whose sine
    transform is fast (its FFT has length 2 x (side - 1)); the span itself if none fits."""
    needed = high - low
    for side in range(needed, min(room, needed + 32) + 1):
        if _is_fast(side - 1):
            start = max(0, min(low - (side - needed) // 2, room - side))
            return start, start + side
    return low, high


def _dst1(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Type-I discrete sine transform along the last axis, times -2,
    -2 X[k] = -2 sum_n x[n] sin(pi (n + 1) (k + 1) / (N + 1)), through a real FFT of the odd
    extension (the factor is left for the caller to fold into one scale)."""
    n = values.shape[-1]
    extended = np.empty((*values.shape[:-1], 2 * (n + 1)), dtype=np.float32)
    extended[..., 0] = 0
    extended[..., n + 1] = 0
    extended[..., 1 : n + 1] = values
    np.negative(values[..., ::-1], out=extended[..., n + 2 :])
    # OpenCV's real row transform, packed output (CCS: Re0, Re1, Im1, Re2, Im2, ...): the
    # imaginary part of frequency k sits at 2k. On these sizes it costs a tenth of
    # numpy.fft.rfft, which was the largest single cost of a video frame.
    packed = cv2.dft(extended.reshape(-1, 2 * (n + 1)), flags=cv2.DFT_ROWS)
    return np.asarray(packed[:, 2 : 2 * n + 1 : 2], dtype=np.float32).reshape(*values.shape[:-1], n)


def _dst2(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The 2-D type-I sine transform over the last two axes, times 4 (see _dst1)."""
    rows = _dst1(values)
    return _dst1(np.ascontiguousarray(rows.swapaxes(-1, -2))).swapaxes(-1, -2)


def poisson_clone(source: ByteImage, target: ByteImage, mask: ByteImage) -> ByteImage:
    """``source`` cloned into ``target`` (same size) under ``mask``: what
    ``cv2.seamlessClone(source, target, mask, centre of the mask's box, NORMAL_CLONE)``
    computes, within a level (both solve in float32), on a rectangle grown to a fast
    transform size. Pixels outside that rectangle keep ``target``."""
    mask = mask.copy()
    mask[[0, -1], :] = 0
    mask[:, [0, -1]] = 0
    result = target.copy()
    box_x, box_y, box_width, box_height = cv2.boundingRect(mask)
    if box_width == 0:
        return result
    height, width = mask.shape
    y0, y1 = _fast_side(box_y, box_y + box_height, height)
    x0, x1 = _fast_side(box_x, box_x + box_width, width)
    if y1 - y0 < 3 or x1 - x0 < 3:
        return result
    # Channels first: each transform runs along a contiguous last axis. float32 throughout,
    # in place where numpy allows: this solve was the largest cost of a video frame.
    fixed = np.moveaxis(target[y0:y1, x0:x1], -1, 0).astype(np.float32)
    # As OpenCV: the source counts only where the mask is set (zero elsewhere).
    inside = mask[y0:y1, x0:x1] > 0
    delta = np.moveaxis(source[y0:y1, x0:x1], -1, 0).astype(np.float32)
    delta *= inside
    delta -= fixed
    # Eroded over the whole mask (OpenCV erodes a view into it, so the zeros round the
    # rectangle erode it too), then cut to the rectangle.
    eroded = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=3)
    weight = eroded[y0:y1, x0:x1].astype(np.float32)
    weight *= np.float32(1 / 255)
    # OpenCV's guidance field is w grad(source) + (1 - w) grad(target) (forward differences,
    # w the eroded mask) and the target's values hold on the border. Written as the target
    # plus a correction, the target's own Laplacian and border cancel: the correction has
    # the divergence of w grad(source - target) and zero on the border.
    field_x = np.diff(delta, axis=2)
    field_x *= weight[:, :-1]
    field_y = np.diff(delta, axis=1)
    field_y *= weight[:-1]
    # Its divergence (backward differences) at the interior.
    rhs = field_x[:, 1:-1, 1:] - field_x[:, 1:-1, :-1]
    rhs += field_y[:, 1:, 1:-1]
    rhs -= field_y[:, :-1, 1:-1]
    rows, columns = rhs.shape[1:]
    eigen_y = 2.0 * np.cos(np.pi * np.arange(1, rows + 1) / (rows + 1)) - 2.0
    eigen_x = 2.0 * np.cos(np.pi * np.arange(1, columns + 1) / (columns + 1)) - 2.0
    # The transform is its own inverse up to 2 / (N + 1) per axis; the four transforms'
    # factor of -2 each (see _dst1) makes the 1 / 16.
    scale = (4.0 / (16.0 * (rows + 1) * (columns + 1))) / (eigen_y[:, np.newaxis] + eigen_x[np.newaxis, :])
    spectrum = _dst2(rhs)
    spectrum *= scale.astype(np.float32)
    solved = _dst2(spectrum)
    solved += fixed[:, 1:-1, 1:-1]
    # Clamped, then truncated, as OpenCV writes its solution.
    np.clip(solved, 0, 255, out=solved)
    result[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = np.moveaxis(solved, 0, -1).astype(np.uint8)
    return result


def blend_face(target_image: ByteImage, target_points: FloatArray, warped: WarpedFace) -> None:
    """Blend ``warped`` into ``target_image`` in place (only the face box changes)."""
    box = warped.box
    if box.width < 8 or box.height < 8:
        return
    mask = face_mask(target_points, warped)
    if cv2.countNonZero(mask) < 16:
        return
    target_patch = target_image[box.y0 : box.y1, box.x0 : box.x1]
    recoloured = reinhard_colour_transfer(warped.pixels, target_patch, mask)
    target_patch[:] = poisson_clone(recoloured, np.ascontiguousarray(target_patch), mask)
