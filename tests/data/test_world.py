"""The embedded world's generator and shard writer: determinism, captions that match the
attributes, the vocabulary, and shards written atomically with disjoint splits."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from data.shards import HELDOUT_OFFSET, main, split_urls, write_world_shards
from data.world import (
    CELLS,
    COLOURS,
    SHAPES,
    SceneGenerator,
    cell_phrases,
    emoji_catalogue,
    emoji_glyph,
    preview_grid,
    world_vocabulary,
)


@pytest.fixture(scope="module")
def generator() -> SceneGenerator:
    return SceneGenerator(image_size=64, seed=3)


def _pixels(scene) -> np.ndarray:
    return np.asarray(scene.image)


def test_same_seed_and_index_give_identical_scenes(generator):
    other = SceneGenerator(image_size=64, seed=3)
    for index in (0, 7, 123_456):
        a, b = generator.scene(index), other.scene(index)
        assert np.array_equal(_pixels(a), _pixels(b))
        assert (a.caption, a.attributes, a.key) == (b.caption, b.attributes, b.key)


def test_scenes_differ_by_index_and_by_seed(generator):
    a, b = generator.scene(0), generator.scene(1)
    assert a.key != b.key and not np.array_equal(_pixels(a), _pixels(b))
    c = SceneGenerator(image_size=64, seed=4).scene(0)
    assert not np.array_equal(_pixels(a), _pixels(c))
    assert len({generator.scene(i).caption for i in range(30)}) == 30


def test_scene_index_alone_decides_it(generator):
    later_first = SceneGenerator(image_size=64, seed=3)
    later_first.scene(99)  # rendering other scenes first (and warming caches) changes nothing
    assert np.array_equal(_pixels(later_first.scene(5)), _pixels(generator.scene(5)))


def test_layout_and_caption_do_not_depend_on_image_size(generator):
    big = SceneGenerator(image_size=128, seed=3).scene(11)
    small = generator.scene(11)
    assert big.image.size == (128, 128) and big.image.mode == "RGB"
    assert (big.caption, big.attributes) == (small.caption, small.attributes)


def test_caption_mentions_every_object_and_the_background(generator):
    for index in range(60):
        scene = generator.scene(index)
        objects, background = scene.attributes["objects"], scene.attributes["background"]
        assert 1 <= len(objects) <= 3
        assert len({o["cell"] for o in objects}) == len(objects)  # distinct cells
        for obj in objects:
            assert obj["cell"] in CELLS
            colour = f"{obj['colour']} " if obj["kind"] == "shape" else ""
            assert f"{obj['size']} {colour}{obj['name']}" in scene.caption, (scene.caption, obj)
            assert any(p in scene.caption for p in cell_phrases(obj["cell"])), (scene.caption, obj)
            if obj["kind"] == "shape":
                assert obj["name"] in SHAPES and obj["colour"] in COLOURS
                assert obj["colour"] != background["colour"]
        assert background["colour"] in scene.caption and "background" in scene.caption


def test_scene_attributes_are_json_and_images_are_rgb(generator):
    scene = generator.scene(2)
    assert json.loads(json.dumps(scene.attributes)) == scene.attributes
    assert scene.image.mode == "RGB" and scene.image.size == (64, 64)
    assert _pixels(scene).std() > 5  # not a flat image


def test_v2_vocabulary_is_a_few_hundred_sorted_unique_emoji():
    catalogue = emoji_catalogue("v2")
    assert 200 <= len(catalogue) <= 320
    assert [e.codepoint for e in catalogue] == sorted(e.codepoint for e in catalogue)
    vocab = world_vocabulary("v2")
    names = vocab["emoji"]
    assert len(set(names)) == len(names) and "cat face" in names and "automobile" in names
    assert all(n == n.lower() and not {"flag", "person", "man", "woman"} & set(n.split()) for n in names)
    assert set(vocab) >= {"emoji", "shapes", "colours", "sizes", "cells", "patterns"}
    assert vocab == world_vocabulary("v2")


def test_every_chosen_emoji_renders_in_colour():
    for emoji in emoji_catalogue():
        rgba = np.asarray(emoji_glyph(emoji.codepoint, 32))
        assert (rgba[..., 3] > 0).mean() > 0.05, emoji
    cat = np.asarray(emoji_glyph(0x1F431, 32))[..., :3]
    assert cat.std(axis=-1).max() > 40  # coloured, not a grey silhouette


def test_photos_need_scikit_image(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "skimage", None)  # as if it were not installed
    from data import world

    world._skimage_photos.cache_clear()
    with pytest.raises(ImportError, match="scikit-image"):
        SceneGenerator(photos=True)
    world._skimage_photos.cache_clear()


def test_photo_backgrounds_with_a_stand_in_scikit_image(monkeypatch):
    import sys
    import types

    fake = types.ModuleType("skimage")
    fake.data = types.SimpleNamespace(brick=lambda: np.tile(np.arange(256, dtype=np.uint8), (256, 1)))
    monkeypatch.setitem(sys.modules, "skimage", fake)
    from data import world

    world._skimage_photos.cache_clear()
    try:
        gen = SceneGenerator(photos=True)
        photo = next(s for s in map(gen.scene, range(200)) if s.attributes["background"]["pattern"] == "photo")
        assert "photo" in photo.caption and photo.image.size == (64, 64)
    finally:
        world._skimage_photos.cache_clear()


def test_preview_grid(generator):
    sheet = preview_grid([generator.scene(i) for i in range(4)], columns=2)
    assert sheet.width >= 2 * 64 * 3


def test_write_world_shards(tmp_path):
    manifest = write_world_shards(tmp_path, num_train=7, num_heldout=3, seed=1, image_size=64, shard_size=3,
                                  progress=False)
    assert manifest["splits"]["train"] == {"count": 7, "shards": 3, "pattern": "train-{000000..000002}.tar",
                                           "first_index": 0}
    assert manifest["splits"]["heldout"]["pattern"] == "heldout-{000000..000000}.tar"
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert "OpenMoji" in manifest["attribution"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "heldout-000000.tar", "manifest.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]

    def keys(split):
        names = []
        for path in sorted(tmp_path.glob(f"{split}-*.tar")):
            with tarfile.open(path) as tar:
                names += tar.getnames()
        assert sorted({n.rsplit(".", 1)[1] for n in names}) == ["json", "png", "txt"]
        return {n.rsplit(".", 1)[0] for n in names}

    train, heldout = keys("train"), keys("heldout")
    assert len(train) == 7 and len(heldout) == 3 and not train & heldout
    assert SceneGenerator(seed=1).scene(HELDOUT_OFFSET).key in heldout
    assert split_urls(tmp_path, "heldout").endswith("heldout-{000000..000000}.tar")


def test_shards_are_reproducible_and_stale_shards_go(tmp_path):
    write_world_shards(tmp_path / "a", 4, 1, seed=2, shard_size=2, progress=False)
    write_world_shards(tmp_path / "b", 4, 1, seed=2, shard_size=2, progress=False)
    assert (tmp_path / "a/train-000001.tar").read_bytes() == (tmp_path / "b/train-000001.tar").read_bytes()
    write_world_shards(tmp_path / "a", 2, 1, seed=2, shard_size=2, progress=False)
    assert not (tmp_path / "a/train-000001.tar").exists()


def test_command_line(tmp_path):
    manifest = main([str(tmp_path / "out"), "--train", "2", "--heldout", "1", "--shard-size", "5",
                     "--preview", str(tmp_path / "p.png")])
    assert manifest["splits"]["train"]["count"] == 2 and (tmp_path / "p.png").is_file()


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        SceneGenerator(image_size=8)
    with pytest.raises(ValueError, match="shard_size"):
        write_world_shards(tmp_path, 1, 1, shard_size=0)


def test_texture_grains_the_background_only_and_keeps_layout_and_caption():
    plain, grained = SceneGenerator(64, seed=3, texture=0.0).scene(2), SceneGenerator(64, seed=3, texture=0.3).scene(2)
    assert (plain.caption, plain.attributes) == (grained.caption, grained.attributes)
    diff = np.abs(_pixels(plain).astype(float) - _pixels(grained).astype(float))
    assert diff.mean() > 3.0  # the grain is visible, not a rounding difference
    with pytest.raises(ValueError, match="texture"):
        SceneGenerator(texture=1.5)


def test_world_shards_record_their_texture(tmp_path):
    from data.world import WORLD_TEXTURE

    manifest = write_world_shards(tmp_path, num_train=2, num_heldout=1, progress=False)
    assert manifest["texture"] == WORLD_TEXTURE


def test_world_v3_draws_its_sixteen_emoji_and_keeps_the_grammar():
    v2, v3 = SceneGenerator(seed=3, world="v2"), SceneGenerator(seed=3, world="v3")
    kinds = set(world_vocabulary("v3")["emoji"])
    assert len(kinds) == 16 and kinds < set(world_vocabulary("v2")["emoji"])
    names = {o["name"] for i in range(300) for o in v3.scene(i).attributes["objects"]}
    assert names - set(SHAPES) == kinds  # every emoji appears, and no other
    a, b = v2.scene(5), v3.scene(5)
    assert a.attributes["background"] == b.attributes["background"]  # same layout stream, other kinds
    assert all(o["name"] in b.caption for o in b.attributes["objects"])


def test_world_v4_draws_one_object_of_v3s_kinds_per_scene():
    v3, v4 = SceneGenerator(seed=3, world="v3"), SceneGenerator(seed=3, world="v4")
    assert world_vocabulary("v4")["emoji"] == world_vocabulary("v3")["emoji"]
    assert {len(v4.scene(i).attributes["objects"]) for i in range(100)} == {1}
    assert max(len(v3.scene(i).attributes["objects"]) for i in range(100)) == 3
    assert len(SceneGenerator(seed=3, world="v4", max_objects=2).scene(7).attributes["objects"]) in (1, 2)


def test_an_unknown_world_is_named(tmp_path):
    with pytest.raises(ValueError, match="v9.*v2"):
        SceneGenerator(world="v9")
    manifest = write_world_shards(tmp_path, num_train=1, num_heldout=1, progress=False, world="v3")
    assert manifest["world"] == "v3"
