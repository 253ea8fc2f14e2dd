"""vlmkit's per-family image preprocessing against transformers' image processors (PIL backend).

The reference is the PIL backend (`*ImageProcessorPil`), which AutoImageProcessor returns when torchvision is
not installed; it is named explicitly so installing torchvision later cannot silently change the reference.
Each reference processor is saved with save_pretrained and vlmkit reads that preprocessor_config.json.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from vlmkit.processing.image_ops import nest_images, normalization_table  # noqa: E402
from vlmkit.processing.image_processors import (  # noqa: E402
    ClipImageSettings, IdeficsImageSettings, image_processor_for,
)
from vlmkit.processing.image_tiling import (  # noqa: E402
    Idefics2ImageSettings, Idefics3ImageSettings, idefics3_tile_grid,
)


def reference_class(name):
    # transformers 5: "<Name>Pil"; transformers 4: the plain (slow, PIL-based) class.
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


CLIP = reference_class("CLIPImageProcessor")
IDEFICS = reference_class("IdeficsImageProcessor")
IDEFICS2 = reference_class("Idefics2ImageProcessor")
IDEFICS3 = reference_class("Idefics3ImageProcessor")
SMOLVLM = reference_class("SmolVLMImageProcessor")

TOL = 1e-5


def make_image(width, height, mode="RGB", seed=0):
    """Smooth gradients plus noise: exercises the resampling filters like a photo would, and then some."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    channels = len(mode)
    planes = [np.sin(xx / (5 + 3 * c)) * 90 + np.cos(yy / (7 + 2 * c)) * 70 + 128 + rng.normal(0, 20, (height, width))
              for c in range(channels)]
    array = np.clip(np.stack(planes, -1), 0, 255).astype(np.uint8)
    if channels == 1:
        array = array[..., 0]
    if mode == "RGBA":
        array[..., 3] = np.where(xx % 3 == 0, 0, array[..., 3])  # fully transparent columns as well
    return Image.fromarray(array, mode)


@pytest.fixture(scope="module")
def images():
    return {
        "photo": make_image(640, 480, seed=1),
        "odd": make_image(333, 517, seed=2),
        "wide": make_image(1001, 97, seed=3),
        "tiny": make_image(7, 5, seed=4),
        "rgba": make_image(401, 299, "RGBA", seed=5),
        "square": make_image(364, 364, seed=6),
        "gray": make_image(150, 200, "L", seed=7),
    }


@pytest.fixture(scope="module")
def batches(images):
    # Prompts with 2, 1, 3 and 1 images: exercises padding to the most images per prompt.
    return [[images["photo"], images["odd"]], [images["wide"]],
            [images["tiny"], images["rgba"], images["square"]], [images["gray"]]]


def config_of(reference, tmp_path) -> dict:
    reference.save_pretrained(tmp_path)
    return json.loads((tmp_path / "preprocessor_config.json").read_text())


def assert_close(ours: torch.Tensor, theirs, what=""):
    theirs = torch.as_tensor(np.asarray(theirs))
    assert tuple(ours.shape) == tuple(theirs.shape), what
    assert ours.dtype == torch.float32
    diff = (ours - theirs.float()).abs().max().item()
    assert diff <= TOL, f"{what}: max |diff| {diff}"


def flat_reference(reference, nested):
    out = reference([im for sample in nested for im in sample], return_tensors="pt")
    return out if isinstance(out, torch.Tensor) else out["pixel_values"]  # IDEFICS returns the tensor itself


# ------------------------------------------------------------------------------------------- CLIP (LLaVA)

@pytest.mark.parametrize("kwargs", [
    {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},  # LLaVA-1.5
    {},  # class defaults (224)
    {"size": {"shortest_edge": 100}, "crop_size": {"height": 150, "width": 151}},  # crop larger: zero padding
    {"size": 64, "crop_size": 60},  # legacy int sizes in old configs
])
def test_clip_matches_transformers(kwargs, batches, tmp_path):
    reference = CLIP(**kwargs)
    ours = image_processor_for("llava", config_of(reference, tmp_path))
    out = ours(batches)
    assert out["num_images"] == [2, 1, 3, 1]
    assert_close(out["pixel_values"], flat_reference(reference, batches), f"clip {kwargs}")


# ----------------------------------------------------------------------------------------------- IDEFICS

@pytest.mark.parametrize("image_size", [224, 97])
def test_idefics_matches_transformers_and_pads_per_prompt(image_size, batches, tmp_path):
    reference = IDEFICS(image_size=image_size)
    ours = image_processor_for("idefics", config_of(reference, tmp_path))
    out = ours(batches)
    pixel_values = out["pixel_values"]
    assert tuple(pixel_values.shape) == (4, 3, 3, image_size, image_size)
    theirs = flat_reference(reference, batches)
    start = 0
    for i, count in enumerate(out["num_images"]):
        assert_close(pixel_values[i, :count], theirs[start:start + count], f"idefics prompt {i}")
        assert not pixel_values[i, count:].any()  # missing images are all-zero slots
        start += count


def test_idefics_prompt_without_images(images):
    out = image_processor_for("idefics", {"image_size": 32})([[], [images["photo"]]])
    assert out["num_images"] == [0, 1]
    assert tuple(out["pixel_values"].shape) == (2, 1, 3, 32, 32)
    assert not out["pixel_values"][0].any()
    none = image_processor_for("idefics", {"image_size": 32})([[]])
    assert tuple(none["pixel_values"].shape) == (1, 1, 3, 32, 32)  # as IdeficsProcessor: at least one slot


# ---------------------------------------------------------------------------------------------- Idefics2

@pytest.mark.parametrize("kwargs", [
    {"do_image_splitting": False},  # default sizes (378 / 980)
    {"do_image_splitting": True, "size": {"shortest_edge": 120, "longest_edge": 400}},
    {"do_image_splitting": True, "size": {"shortest_edge": 50, "longest_edge": 200}},  # stretches small crops
])
def test_idefics2_matches_transformers(kwargs, batches, tmp_path):
    reference = IDEFICS2(**kwargs)
    ours = image_processor_for("idefics2", config_of(reference, tmp_path))
    out = ours(batches)
    theirs = reference(batches, return_tensors="pt")
    assert_close(out["pixel_values"], theirs["pixel_values"], f"idefics2 {kwargs}")
    assert torch.equal(out["pixel_attention_mask"], theirs["pixel_attention_mask"])
    crops = 5 if kwargs["do_image_splitting"] else 1
    assert out["crops_per_image"] == [[crops] * n for n in (2, 1, 3, 1)]
    assert out["pixel_values"].shape[1] == 3 * crops


def test_idefics2_split_order_is_quadrants_then_whole(images):
    image = make_image(200, 100, seed=9)
    fixed = {"size": {"height": 40, "width": 40}, "do_image_splitting": True}
    out = image_processor_for("idefics2", fixed)([[image]])["pixel_values"][0]
    whole = image_processor_for("idefics2", {**fixed, "do_image_splitting": False})
    quadrants = [(0, 0, 100, 50), (100, 0, 200, 50), (0, 50, 100, 100), (100, 50, 200, 100)]
    for k, box in enumerate(quadrants):
        torch.testing.assert_close(out[k], whole([[image.crop(box)]])["pixel_values"][0, 0])
    torch.testing.assert_close(out[4], whole([[image]])["pixel_values"][0, 0])


# ------------------------------------------------------------------------------------- Idefics3 / SmolVLM

@pytest.mark.parametrize("cls,family,kwargs", [
    (IDEFICS3, "idefics3", {}),  # 1456 / 364 defaults
    (IDEFICS3, "idefics3", {"do_image_splitting": False, "size": {"longest_edge": 600}}),
    (IDEFICS3, "idefics3", {"size": {"longest_edge": 300}, "max_image_size": {"longest_edge": 128}}),
    (IDEFICS3, "idefics3", {"size": {"longest_edge": 500}, "max_image_size": {"longest_edge": 128}}),  # not a multiple
    (SMOLVLM, "smolvlm", {"size": {"longest_edge": 1024}, "max_image_size": {"longest_edge": 512}}),
])
def test_idefics3_matches_transformers(cls, family, kwargs, batches, images, tmp_path):
    reference = cls(**kwargs)
    # Large tiles are slow in the reference; fewer images there keep the file fast.
    large = family == "smolvlm" or not kwargs
    nested = [[images["odd"], images["rgba"]], [images["wide"]]] if large else batches
    ours = image_processor_for(family, config_of(reference, tmp_path))
    out = ours(nested)
    theirs = reference(nested, return_tensors="pt", return_row_col_info=True)
    assert_close(out["pixel_values"], theirs["pixel_values"], f"{family} {kwargs}")
    assert torch.equal(out["pixel_attention_mask"], theirs["pixel_attention_mask"])
    assert out["image_rows"] == theirs["rows"] and out["image_cols"] == theirs["cols"]
    settings = ours.settings
    for sample, rows, cols, crops in zip(nested, out["image_rows"], out["image_cols"], out["crops_per_image"]):
        for image, r, c, n in zip(sample, rows, cols, crops):
            assert idefics3_tile_grid(image.height, image.width, settings) == (r, c)
            assert n == (r * c + 1 if r else 1)


def test_idefics3_tiles_are_row_major_then_global():
    image = make_image(256, 128, seed=11)  # with 128-pixel tiles and longest edge 256: 1 row x 2 cols
    settings = {"size": {"longest_edge": 256}, "max_image_size": {"longest_edge": 128}, "resample": 2}
    out = image_processor_for("idefics3", settings)([[image]])
    assert (out["image_rows"], out["image_cols"], out["crops_per_image"]) == ([[1]], [[2]], [[3]])
    pixels = out["pixel_values"][0]
    plain = image_processor_for("idefics3", {**settings, "do_image_splitting": False, "do_resize": False})
    torch.testing.assert_close(pixels[0], plain([[image.crop((0, 0, 128, 128))]])["pixel_values"][0, 0])
    torch.testing.assert_close(pixels[1], plain([[image.crop((128, 0, 256, 128))]])["pixel_values"][0, 0])


def test_small_image_is_not_split_without_resize():
    out = image_processor_for("idefics3", {"do_resize": False})([[make_image(100, 80)]])
    assert out["image_rows"] == [[0]] and out["crops_per_image"] == [[1]]
    assert tuple(out["pixel_values"].shape) == (1, 1, 3, 364, 364)


# ------------------------------------------------------------------------------------- settings & factory

@pytest.mark.parametrize("cls,family,settings_cls", [
    (CLIP, "clip", ClipImageSettings), (IDEFICS, "idefics", IdeficsImageSettings),
    (IDEFICS2, "idefics2", Idefics2ImageSettings), (IDEFICS3, "idefics3", Idefics3ImageSettings),
    (SMOLVLM, "smolvlm", Idefics3ImageSettings),
])
def test_defaults_equal_transformers_class_defaults(cls, family, settings_cls, tmp_path):
    from_saved = image_processor_for(family, config_of(cls(), tmp_path)).settings
    assert isinstance(from_saved, settings_cls)
    assert from_saved == settings_cls.from_dict({})  # an empty config means the transformers defaults


def test_factory_rejects_unknown_family():
    with pytest.raises(ValueError, match="unknown image processor family"):
        image_processor_for("blip", {})


def test_nesting_rules(images):
    photo = images["photo"]
    assert nest_images(photo) == [[photo]]
    assert nest_images([photo, photo]) == [[photo, photo]]  # a flat list is ONE prompt, as in transformers
    assert nest_images([[photo], [photo]]) == [[photo], [photo]]
    with pytest.raises(TypeError):
        nest_images([["not an image"]])


def test_lookup_table_matches_plain_arithmetic():
    table = normalization_table(ClipImageSettings())
    values = np.arange(256, dtype=np.float64) / 255
    expected = (values[None] - np.array(ClipImageSettings().image_mean)[:, None]) / np.array(
        ClipImageSettings().image_std)[:, None]
    np.testing.assert_allclose(table, expected, atol=1e-6)
