"""Launch geometry shared by the kernels' launch helpers: shapes and strides as the kernels index
them, centre grids, tile grids. Pure Python."""

from .config import cdiv


def as_volume(t, dims):
    """(shape, strides) of a (B, [C,] H, W) image as the (B, [C,] 1, H, W) volume the kernels
    index (the strides ``unsqueeze(-3)`` would give), of a volume its own. Tuples, not a view:
    a view per tensor and call costs host time."""
    shape, strides = t.shape, t.stride()
    if t.dim() == dims + 1:
        return tuple(shape), strides
    return (*shape[:-2], 1, *shape[-2:]), (*strides[:-2], shape[-2] * strides[-2],
                                           *strides[-2:])


def centre_shape(spatial, stride):
    return tuple(-(-n // stride) for n in spatial)


def grid_of(rows, tile_w, centres):
    """(tiles_h, tiles_w, programs) for tiles of rows x tile_w over a (B, D, H, W) grid of
    centres or pixels."""
    batch, depth, height, width = centres
    tiles_h, tiles_w = cdiv(height, rows), cdiv(width, tile_w)
    return tiles_h, tiles_w, batch * depth * tiles_h * tiles_w
