"""The FFHQ-wild reader on generated data, including every kind of corrupt sample."""

import json
import shutil

import numpy as np
from PIL import Image
import pytest
import torch
from transformers import CLIPTokenizer

from moa.data.datamodule import ResumableStreamSampler
from moa.data.ffhq import FFHQWildDataset
from moa.data.stores import FolderStore
from moa.data.transforms import SubjectImageSpec


@pytest.fixture
def make_dataset(tiny_dir):
    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "stable-diffusion", subfolder="tokenizer")
    spec = SubjectImageSpec.from_pretrained(tiny_dir / "clip")

    def _make(root, **kwargs):
        return FFHQWildDataset(root, tokenizer=tokenizer, subject_image_spec=spec, resolution=64, split="all", **kwargs)
    return _make


def test_sample_contents_match_the_files(make_dataset, synthetic_root):
    dataset = make_dataset(synthetic_root)
    sample = dataset[0]
    image_id = dataset.ids[0]
    annotation = json.loads((synthetic_root / image_id[:5] / f"{image_id}.json").read_text())
    people = sorted([s for s in annotation["segments"] if s["coco_label"] == "person"], key=lambda s: s["end"])
    assert sample["pixel_values"].shape == (3, 64, 64)
    assert -1.0 <= sample["pixel_values"].min() and sample["pixel_values"].max() <= 1.0
    assert sample["subject_valid"].sum().item() == len(people)
    tokens = dataset.tokenizer.convert_ids_to_tokens(sample["input_ids"].tolist())
    for slot, person in enumerate(people):
        assert tokens[sample["subject_token_index"][slot]] == person["word"] + "</w>"
        mask = sample["subject_masks"][slot]
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
    assert sample["subject_pixel_values"].shape[1:] == (3, 32, 32)
    assert torch.all(sample["subject_pixel_values"][~sample["subject_valid"]] == 0)


ANNOTATION_DEFECTS = {
    "absent_segment": lambda a, p: p.update(id=999),
    "end_out_of_range": lambda a, p: p.update(end=len(a["caption"]) + 5),
    "end_missing": lambda a, p: p.pop("end"),
    "end_a_string": lambda a, p: p.update(end=str(p["end"])),
    "id_missing": lambda a, p: p.pop("id"),
    "id_a_float": lambda a, p: p.update(id=float(p["id"])),
    "bbox_missing": lambda a, p: p.pop("bbox"),
    "bbox_three_numbers": lambda a, p: p.update(bbox=p["bbox"][:3]),
    "bbox_strings": lambda a, p: p.update(bbox=[str(v) for v in p["bbox"]]),
    "bbox_outside_the_image": lambda a, p: p.update(bbox=[500, 500, 600, 600]),
    "bbox_inverted": lambda a, p: p.update(bbox=[p["bbox"][2], p["bbox"][3], p["bbox"][0], p["bbox"][1]]),
    "face_bbox_strings": lambda a, p: p.update(face_bbox=[str(v) for v in p["face_bbox"]]),
    "face_bbox_outside_the_image": lambda a, p: p.update(face_bbox=[500, 500, 600, 600]),
    "caption_a_number": lambda a, p: a.update(caption=12),
    "caption_missing": lambda a, p: a.pop("caption"),
    "segments_not_a_list": lambda a, p: a.update(segments={"0": p}),
    "segment_not_an_object": lambda a, p: a["segments"].insert(0, "person"),
}
FILE_DEFECTS = ["truncated_jpeg", "missing_npy", "npy_of_another_size", "annotation_a_list", "annotation_not_json"]


def _corrupt(root, image_id, kind):
    stem = root / image_id[:5] / image_id
    if kind == "truncated_jpeg":
        data = stem.with_suffix(".jpg").read_bytes()
        stem.with_suffix(".jpg").write_bytes(data[: len(data) // 3])
    elif kind == "missing_npy":
        stem.with_suffix(".npy").unlink()
    elif kind == "npy_of_another_size":
        np.save(stem.with_suffix(".npy"), np.zeros((7, 5), dtype=np.int64))
    elif kind == "annotation_a_list":
        stem.with_suffix(".json").write_text("[1, 2]")
    elif kind == "annotation_not_json":
        stem.with_suffix(".json").write_text("{caption: ")
    else:
        annotation = json.loads(stem.with_suffix(".json").read_text())
        person = next(s for s in annotation["segments"] if s["coco_label"] == "person")
        ANNOTATION_DEFECTS[kind](annotation, person)
        stem.with_suffix(".json").write_text(json.dumps(annotation))


@pytest.mark.parametrize("kind", [*FILE_DEFECTS, *ANNOTATION_DEFECTS])
def test_corrupt_sample_is_skipped_counted_and_named(make_dataset, synthetic_root, tmp_path, kind, caplog):
    root = tmp_path / "ffhq"
    shutil.copytree(synthetic_root, root)
    bad_id = FolderStore(root).split("all")[2]
    _corrupt(root, bad_id, kind)
    dataset = make_dataset(root)
    sample = dataset[2]
    assert sample["index"].item() == 3  # the next usable sample
    assert sample["skipped"].item() == 1
    assert dataset.skipped == [bad_id]
    assert f"skipping sample {bad_id}" in caplog.text


def test_a_box_partly_outside_the_image_is_clipped_not_skipped(make_dataset, synthetic_root, tmp_path):
    root = tmp_path / "ffhq"
    shutil.copytree(synthetic_root, root)
    image_id = FolderStore(root).split("all")[0]
    reference = make_dataset(root)[0]
    path = root / image_id[:5] / f"{image_id}.json"
    annotation = json.loads(path.read_text())
    for segment in annotation["segments"]:
        x1, y1, x2, y2 = segment["bbox"]
        segment["bbox"] = [x1 if x1 > 0 else -40, y1 if y1 > 0 else -40, x2 + 1000, y2 + 1000]
    path.write_text(json.dumps(annotation))
    sample = make_dataset(root)[0]
    assert sample["skipped"].item() == 0
    assert sample["subject_valid"].sum() == reference["subject_valid"].sum()


def test_face_masks_are_the_subject_inside_its_face_box_and_flip_with_it(tiny_dir, synthetic_root):
    """``face_regions``: each subject's face mask is its own mask cut to its ``face_bbox``, and a flipped
    target flips the box with the mask (at the image's own resolution, so flipping is exact)."""
    def make(**kwargs):
        return FFHQWildDataset(synthetic_root, tokenizer=CLIPTokenizer.from_pretrained(tiny_dir / "stable-diffusion", subfolder="tokenizer"),
                               subject_image_spec=SubjectImageSpec.from_pretrained(tiny_dir / "clip"), resolution=96,
                               split="all", face_regions=True, **kwargs)
    plain, flipped = make(), make(target_flip_p=1.0)
    assert "subject_face_masks" not in FFHQWildDataset(
        synthetic_root, tokenizer=plain.tokenizer, subject_image_spec=plain.spec, resolution=96, split="all")[0]
    checked = 0
    for index, image_id in enumerate(plain.ids[:6]):
        annotation = json.loads((synthetic_root / image_id[:5] / f"{image_id}.json").read_text())
        people = sorted([s for s in annotation["segments"] if s["coco_label"] == "person"], key=lambda s: s["end"])
        seg = torch.from_numpy(np.load(synthetic_root / image_id[:5] / f"{image_id}.npy"))
        sample, mirrored = plain[index], flipped[(index, 0)]
        for slot, person in enumerate(people):
            x1, y1, x2, y2 = person["face_bbox"]
            expected = torch.zeros(96, 96)
            expected[y1:y2, x1:x2] = (seg[y1:y2, x1:x2] == person["id"]).float()
            assert expected.sum() > 0
            assert torch.equal(sample["subject_face_masks"][slot], expected)
            assert torch.equal(mirrored["subject_face_masks"][slot], expected.flip(-1))
            checked += 1
        assert torch.all(sample["subject_face_masks"][len(people):] == 0)
    assert checked >= 6


def test_caption_longer_than_the_tokenizer_drops_only_the_cut_subject(make_dataset, synthetic_root, tmp_path):
    root = tmp_path / "ffhq"
    shutil.copytree(synthetic_root, root)
    image_id = FolderStore(root).split("all")[0]
    path = root / image_id[:5] / f"{image_id}.json"
    annotation = json.loads(path.read_text())
    filler = "and a red cup " * 40
    annotation["caption"] += " " + filler + "and a man"
    seg = np.load(path.with_suffix(".npy"))
    late = {"id": 10, "bbox": annotation["segments"][0]["bbox"], "end": len(annotation["caption"]),
            "coco_label": "person", "word": "man"}
    assert 10 in np.unique(seg)
    annotation["segments"] = [s for s in annotation["segments"] if s["id"] != 11] + [late]
    path.write_text(json.dumps(annotation))
    sample = make_dataset(root)[0]
    # the first subject (early in the caption) stays bound; the one beyond 77 tokens is dropped
    assert sample["subject_valid"].sum().item() == 1
    assert sample["subject_token_index"][0].item() < 10


def test_missing_root_and_split_file_are_named(make_dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        make_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="image_ids.txt"):
        make_dataset(tmp_path / "empty")


def test_stream_sampler_resumes_at_the_exact_sample_and_shards_ranks():
    full = ResumableStreamSampler(10, seed=1)
    stream = iter(full)
    first = [next(stream) for _ in range(27)]
    resumed = iter(ResumableStreamSampler(10, seed=1, start=13))
    assert [next(resumed) for _ in range(14)] == first[13:]
    assert sorted(first[:10]) == list(range(10))  # each epoch is a permutation
    rank0 = iter(ResumableStreamSampler(10, seed=1, rank=0, world_size=2))
    rank1 = iter(ResumableStreamSampler(10, seed=1, rank=1, world_size=2))
    epoch0 = [next(rank0) for _ in range(5)] + [next(rank1) for _ in range(5)]
    assert sorted(epoch0) == list(range(10))
    # Draw numbers (augmentation seeds): the same indices, unique across ranks, continued on resume.
    drawn = [iter(ResumableStreamSampler(10, seed=1, rank=r, world_size=2, with_draw=True)) for r in (0, 1)]
    pairs = [next(d) for _ in range(12) for d in drawn]
    plain = iter(ResumableStreamSampler(10, seed=1, rank=0, world_size=2))
    assert [index for index, _ in pairs[::2]] == [next(plain) for _ in range(12)]
    assert len({draw for _, draw in pairs}) == len(pairs)
    later = iter(ResumableStreamSampler(10, seed=1, rank=1, world_size=2, start=4, with_draw=True))
    assert next(later) == pairs[9]


def test_shards_give_the_same_samples_as_the_folder(make_dataset, synthetic_root, tmp_path):
    from moa.data.shards import pack_shards

    for wrong in (0, -1):
        with pytest.raises(ValueError, match="samples-per-shard"):
            pack_shards(synthetic_root, tmp_path / "none", samples_per_shard=wrong)
    shards = pack_shards(synthetic_root, tmp_path / "shards", samples_per_shard=7)
    assert sorted(p.name for p in shards.iterdir()) == ["index.json", *(f"shard-{i:05d}.tar" for i in range(4))]
    folder, packed = make_dataset(synthetic_root), make_dataset(shards, data_format="shards")
    assert folder.ids == packed.ids
    for index in (0, 5, 13, 23):
        a, b = folder[index], packed[index]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_the_pipeline_gives_the_image_encoder_what_training_gave_it(make_dataset, synthetic_root):
    """A reference render and its mask handed to the pipeline become exactly the encoder input that
    training made of them (the mask's box, not the whole frame: there the figure would be smaller and
    off-centre, and the head's colours, a few pixels, were lost at sampling)."""
    from moa.inference.pipeline import Subject, subject_pixels
    from moa.synthworld.world import ReferenceRenders

    dataset = make_dataset(synthetic_root, subject_source=ReferenceRenders())
    checked = 0
    for index, image_id in enumerate(dataset.ids[:6]):
        annotation = json.loads((synthetic_root / image_id[:5] / f"{image_id}.json").read_text())
        people = [s for s in annotation["segments"] if s["coco_label"] == "person"]
        if len(people) != 1:
            continue
        reference = synthetic_root / image_id[:5] / people[0]["reference"]
        mask = np.load(f"{reference}.npy") > 0
        assert mask.sum() < 0.5 * mask.size  # a figure on a studio background, not a full-frame crop
        pixels = subject_pixels(Subject(Image.open(f"{reference}.jpg"), people[0]["word"], mask=mask), dataset.spec)
        assert torch.equal(pixels, dataset[index]["subject_pixel_values"][0])
        checked += 1
    assert checked >= 2
    with pytest.raises(ValueError, match="the mask is empty"):
        subject_pixels(Subject(Image.open(f"{reference}.jpg"), "man", mask=np.zeros_like(mask)), dataset.spec)


def test_reference_renders_feed_the_image_encoder_when_asked(make_dataset, synthetic_root, tmp_path):
    from moa.data.shards import pack_shards
    from moa.synthworld.world import ReferenceRenders

    image_id = FolderStore(synthetic_root).split("all")[0]
    annotation = json.loads((synthetic_root / image_id[:5] / f"{image_id}.json").read_text())
    people = [s for s in annotation["segments"] if s["coco_label"] == "person"]
    for person in people:
        assert (synthetic_root / image_id[:5] / f"{person['reference']}.jpg").exists()
    crop, reference = make_dataset(synthetic_root)[0], make_dataset(synthetic_root, subject_source=ReferenceRenders())[0]
    for key in ("pixel_values", "input_ids", "subject_masks", "subject_valid"):
        assert torch.equal(crop[key], reference[key])
    valid = crop["subject_valid"]
    assert not torch.allclose(crop["subject_pixel_values"][valid], reference["subject_pixel_values"][valid])
    shards = pack_shards(synthetic_root, tmp_path / "shards", samples_per_shard=10)
    packed = make_dataset(shards, data_format="shards", subject_source=ReferenceRenders())[0]
    assert torch.equal(packed["subject_pixel_values"], reference["subject_pixel_values"])
    with pytest.raises(TypeError, match="data.subject_source"):
        make_dataset(synthetic_root, subject_source="other")
