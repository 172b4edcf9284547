"""Cutout geometry (per-image and batched), batched crop / flip semantics, and bit-identical normalisation
against torchvision, each checked against a brute-force description of the operation."""
import numpy as np
import pytest
import torch

from fisherbench.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    BatchAugment,
    Cutout,
    cutout,
    random_crop,
    random_hflip,
)


def hole_rectangles(mask: torch.Tensor):
    """For a boolean (H, W) mask of zeroed pixels: the bounding box and whether the mask is exactly that box."""
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    box = torch.zeros_like(mask)
    box[y0:y1, x0:x1] = True
    return (y0, y1, x0, x1), bool((box == mask).all())


def check_one_hole(y0, y1, size, length):
    """The hole is [c - L//2, c - L//2 + L) clipped to the image, for some centre c in [0, size)."""
    candidates = [c for c in range(size)
                  if (max(c - length // 2, 0), min(c - length // 2 + length, size)) == (y0, y1)]
    assert candidates, f"hole [{y0}, {y1}) is not a clipped length-{length} window of a {size}-pixel side"
    return candidates


@pytest.mark.parametrize("length,size", [(16, 32), (16, 20), (5, 12)])
def test_cutout_per_image_geometry(length, size):
    torch.manual_seed(1)
    op = Cutout(length)
    img = torch.randn(3, size, size) + 5.0  # never exactly zero
    clipped = 0
    for _ in range(300):
        out = op(img)
        zero = out == 0
        assert (zero == zero[0:1]).all(), "the hole must cover all channels alike"
        (y0, y1, x0, x1), is_box = hole_rectangles(zero[0])
        assert is_box, "exactly one rectangular hole"
        check_one_hole(y0, y1, size, length)
        check_one_hole(x0, x1, size, length)
        assert (y1 - y0) <= length and (x1 - x0) <= length
        clipped += (y1 - y0) < length or (x1 - x0) < length
        assert torch.equal(out[~zero], img[~zero]), "pixels outside the hole are untouched"
    assert clipped > 0, "holes near the border must be clipped"
    assert torch.all(img != 0), "Cutout must not modify its input in place"


def test_cutout_centre_is_uniform_over_the_image():
    """Recover each hole's centre (unambiguous for L=16 on 32 px: a hole never touches both borders)."""
    x = torch.ones(4000, 1, 32, 32)
    out = cutout(x, 16, torch.Generator().manual_seed(3))
    centres = []
    for img in out[:, 0]:
        (y0, y1, _, _), is_box = hole_rectangles(img == 0)
        assert is_box
        centres.append(y0 + 8 if y0 > 0 else y1 - 8)
    counts = np.bincount(centres, minlength=32)
    assert counts.min() > 70 and counts.max() < 190, counts  # expected 125 each
    # full-size (16x16) holes happen only for centres 8..24 on both axes: probability (17/32)^2
    full = ((out == 0).sum((1, 2, 3)) == 256).float().mean().item()
    assert abs(full - (17 / 32) ** 2) < 0.04


def test_batched_cutout_geometry_and_zero_value():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, 32, 32) + 10.0
    out = cutout(x, 16, g)
    for img, src in zip(out, x):
        zero = img == 0
        assert (zero == zero[0:1]).all()
        (y0, y1, x0, x1), is_box = hole_rectangles(zero[0])
        assert is_box
        check_one_hole(y0, y1, 32, 16)
        check_one_hole(x0, x1, 32, 16)
        assert torch.equal(img[~zero], src[~zero])


def test_batched_ops_are_deterministic_given_the_generator():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    aug = BatchAugment(CIFAR10_MEAN, CIFAR10_STD, cutout_length=16)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def brute_force_crop_offset(out: torch.Tensor, src: torch.Tensor, padding: int):
    """All (dy, dx) such that `out` is the window at (dy, dx) of `src` zero-padded by `padding`."""
    padded = torch.nn.functional.pad(src, (padding,) * 4)
    h, w = src.shape[-2:]
    return [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
            if torch.equal(padded[..., dy:dy + h, dx:dx + w], out)]


def test_random_crop_matches_zero_padded_windows_with_uniform_offsets():
    x = torch.randint(1, 256, (600, 3, 8, 8), dtype=torch.uint8)  # no zero pixels: padding is recognisable
    out = random_crop(x, 4, torch.Generator().manual_seed(0))
    offsets = []
    for o, s in zip(out, x):
        found = brute_force_crop_offset(o, s, 4)
        assert len(found) == 1
        offsets.append(found[0])
    offsets = np.array(offsets)
    for axis in range(2):
        counts = np.bincount(offsets[:, axis], minlength=9)
        assert len(counts) == 9 and counts.min() > 35, counts  # uniform on 0..8, expected 66.7 each


def test_random_hflip_flips_about_half():
    x = torch.randn(2000, 1, 2, 5)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same ^ flipped).all())
    assert abs(flipped.float().mean().item() - 0.5) < 0.04


def test_batch_augment_normalisation_is_bit_identical_to_torchvision():
    from PIL import Image
    from torchvision import transforms as T

    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    aug = BatchAugment(CIFAR10_MEAN, CIFAR10_STD, cutout_length=16)
    ours = aug(x, None)  # evaluation: no randomness
    tv = T.Compose([T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    ref = torch.stack([tv(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in x])
    assert ours.dtype == torch.float32 and torch.equal(ours, ref)


def test_batch_augment_training_semantics():
    """Train batches = crop of the zero-padded uint8 image (+flip), then normalise, then a 0-valued hole."""
    x = torch.randint(1, 256, (64, 3, 16, 16), dtype=torch.uint8)
    aug = BatchAugment(CIFAR10_MEAN, CIFAR10_STD, crop_padding=2, cutout_length=6)
    out = aug(x, torch.Generator().manual_seed(0))
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    padded_norm_zero = (0 - mean) / std  # value of a padded (black) pixel after normalisation
    n_flipped = 0
    for o, s in zip(out, x):
        hole = o == 0
        (y0, y1, x0, x1), is_box = hole_rectangles(hole[0])
        assert is_box and (y1 - y0) <= 6 and (x1 - x0) <= 6
        pixels = torch.where(hole, torch.zeros_like(o), o * std + mean) * 255
        matches = []
        for flipped, src in ((False, s), (True, s.flip(-1))):
            padded = torch.nn.functional.pad(src, (2, 2, 2, 2)).float()
            for dy in range(5):
                for dx in range(5):
                    win = padded[:, dy:dy + 16, dx:dx + 16]
                    if torch.allclose(pixels[~hole], win[~hole], atol=1e-3):
                        matches.append(flipped)
        assert len(matches) >= 1
        n_flipped += matches[0]
    assert 0 < n_flipped < 64
    assert padded_norm_zero.abs().min() > 0.1  # padding is not confused with the hole
