"""Piecewise-affine warp of the source face onto the target's landmarks.

The source landmarks are triangulated once (Delaunay); the same vertex indices then
describe a mesh over any target face. Warping triangle by triangle with
``cv2.warpAffine`` costs one full-image pass per triangle (~900 of them), so instead
every pixel of the target's face box gets its triangle's label from a raster of the
target mesh, its source position from that triangle's affine (one batched matrix
product) and the colour from a single ``cv2.remap``.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import numpy.typing as npt

__all__ = ["FaceBox", "WarpedFace", "delaunay_triangles", "warp_face"]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int32]


def delaunay_triangles(points: FloatArray) -> IntArray:
    """Delaunay triangles of ``points`` (N, 2) as (T, 3) vertex indices.

    ``cv2.Subdiv2D`` returns vertex coordinates and adds three far-away virtual
    vertices; triangles touching those are dropped and the rest are mapped back to
    indices by nearest point.
    """
    low = np.floor(points.min(axis=0)) - 1
    high = np.ceil(points.max(axis=0)) + 1
    subdiv = cv2.Subdiv2D((int(low[0]), int(low[1]), int(high[0] - low[0]) + 1, int(high[1] - low[1]) + 1))
    subdiv.insert([(float(x), float(y)) for x, y in points])
    vertices = np.asarray(subdiv.getTriangleList(), dtype=np.float32).reshape(-1, 3, 2)
    inside = ((vertices >= low) & (vertices <= high)).all(axis=(1, 2))
    vertices = vertices[inside]
    distances = np.linalg.norm(vertices.reshape(-1, 1, 2) - points[None, :, :], axis=2)
    indices: IntArray = distances.argmin(axis=1).reshape(-1, 3).astype(np.int32)
    distinct: npt.NDArray[np.bool_] = (
        (indices[:, 0] != indices[:, 1]) & (indices[:, 1] != indices[:, 2]) & (indices[:, 0] != indices[:, 2])
    )
    return indices[distinct]


@dataclasses.dataclass(frozen=True)
class FaceBox:
    """An axis-aligned box of whole pixels: columns [x0, x1), rows [y0, y1)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @classmethod
    def around(cls, points: FloatArray, image_shape: tuple[int, ...], margin: int) -> FaceBox:
        """The points' bounding box grown by ``margin`` and clipped to the image."""
        height, width = image_shape[:2]
        x0 = max(0, int(np.floor(points[:, 0].min())) - margin)
        y0 = max(0, int(np.floor(points[:, 1].min())) - margin)
        x1 = min(width, int(np.ceil(points[:, 0].max())) + margin + 1)
        y1 = min(height, int(np.ceil(points[:, 1].max())) + margin + 1)
        return cls(x0, y0, max(x0, x1), max(y0, y1))


@dataclasses.dataclass(frozen=True)
class WarpedFace:
    """The source face drawn in the target's geometry, inside ``box`` of the target."""

    box: FaceBox
    pixels: npt.NDArray[np.uint8]  # (box.height, box.width, 3) BGR
    covered: npt.NDArray[np.bool_]  # pixels that fall inside some mesh triangle


def _affines_target_to_source(
    source_points: FloatArray, target_points: FloatArray, triangles: IntArray
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Per triangle, the 2x3 affine taking target pixels to source pixels; and which triangles
    are usable (a target triangle folded flat has no inverse)."""
    target_tri = target_points[triangles].astype(np.float64)  # (T, 3, 2)
    source_tri = source_points[triangles].astype(np.float64)
    # In closed form (a batched np.linalg.solve of ~900 3x3 systems cost ten times more): the
    # linear part M maps the target's edge vectors E = [t1 - t0, t2 - t0] onto the source's
    # F, so M = F E^-1; the translation takes t0 to s0.
    target_edges = target_tri[:, 1:] - target_tri[:, :1]  # (T, 2 edges, 2 coordinates)
    source_edges = source_tri[:, 1:] - source_tri[:, :1]
    determinant = (
        target_edges[:, 0, 0] * target_edges[:, 1, 1] - target_edges[:, 1, 0] * target_edges[:, 0, 1]
    )
    usable: npt.NDArray[np.bool_] = np.abs(determinant) > 1e-6
    inverse_determinant = np.divide(1.0, determinant, out=np.zeros_like(determinant), where=usable)
    # E^-1 = [[e2y, -e2x], [-e1y, e1x]] / det with e1, e2 the columns of E.
    inverse = np.empty((len(triangles), 2, 2))
    inverse[:, 0, 0] = target_edges[:, 1, 1]
    inverse[:, 0, 1] = -target_edges[:, 1, 0]
    inverse[:, 1, 0] = -target_edges[:, 0, 1]
    inverse[:, 1, 1] = target_edges[:, 0, 0]
    inverse *= inverse_determinant[:, None, None]
    linear = source_edges.transpose(0, 2, 1) @ inverse  # F (columns f1, f2) @ E^-1: (T, 2, 2)
    affines = np.empty((len(triangles), 2, 3))
    affines[:, :, :2] = linear
    affines[:, :, 2] = source_tri[:, 0] - (linear @ target_tri[:, 0, :, None])[..., 0]
    return affines, usable


def warp_face(
    source_image: npt.NDArray[np.uint8],
    source_points: FloatArray,
    triangles: IntArray,
    target_points: FloatArray,
    target_shape: tuple[int, ...],
    margin: int = 2,
) -> WarpedFace:
    """Warp the source face onto ``target_points`` within the target's face box."""
    box = FaceBox.around(target_points, target_shape, margin)
    affines, usable = _affines_target_to_source(source_points, target_points, triangles)

    # Uncovered pixels keep the label one past the last triangle: an extra "triangle" whose
    # coefficients map them off the source (-1, -1).
    outside = len(triangles)
    labels = np.full((box.height, box.width), outside, dtype=np.int32)
    local = np.round((target_points - [box.x0, box.y0]) * 16).astype(np.int32)
    drawn = np.flatnonzero(usable)
    # One fancy index for every triangle's vertices up front: per triangle in the loop it
    # cost as much as the drawing (the loop is ~900 OpenCV calls, ~1 us each).
    for index, polygon in zip(drawn.tolist(), local[triangles[drawn]], strict=True):
        # shift=4: sub-pixel vertices, so neighbouring triangles meet without gaps.
        cv2.fillConvexPoly(labels, polygon, index, lineType=cv2.LINE_8, shift=4)

    covered = labels != outside
    # Coefficients gathered per pixel by label: six whole-box takes, no boolean indexing.
    coefficients = np.zeros((outside + 1, 6), dtype=np.float32)
    coefficients[:-1] = affines.reshape(-1, 6)
    coefficients[-1] = (0, 0, -1, 0, 0, -1)
    xs = np.arange(box.x0, box.x1, dtype=np.float32)[np.newaxis, :]
    ys = np.arange(box.y0, box.y1, dtype=np.float32)[:, np.newaxis]
    per_pixel = [coefficients[:, index].take(labels) for index in range(6)]
    map_x = per_pixel[0]
    map_x *= xs
    map_x += per_pixel[1] * ys
    map_x += per_pixel[2]
    map_y = per_pixel[3]
    map_y *= xs
    map_y += per_pixel[4] * ys
    map_y += per_pixel[5]
    pixels = cv2.remap(source_image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return WarpedFace(box, np.asarray(pixels, dtype=np.uint8), covered)
