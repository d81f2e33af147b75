"""Dataset curation (loradex.training.data, `loradex dataset check`): planted problems are found,
the measures agree with OpenCV, faces centre the crops, and the cleaned view feeds the trainer."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw, ImageFilter

from loradex.training import data as D


def shapes(seed: int, size: int = 64) -> Image.Image:
    """Random filled rectangles and ellipses: sharp edges, a distinct perceptual hash per seed."""
    r = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(v) for v in r.integers(0, 255, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = (int(v) for v in r.integers(0, size - 8, 2))
        w, h = (int(v) for v in r.integers(8, size // 2, 2))
        col = tuple(int(v) for v in r.integers(0, 255, 3))
        (d.rectangle if r.random() < 0.5 else d.ellipse)([x0, y0, x0 + w, y0 + h], fill=col)
    return im


def drawn_face(size: int = 200, s: float = 50) -> Image.Image:
    """A cartoon face OpenCV's Haar cascade detects (skin oval, brows, eyes, nose, mouth)."""
    c = size / 2
    im = Image.new("RGB", (size, size), (40, 60, 40))
    d = ImageDraw.Draw(im)
    d.ellipse([c - s * 0.8, c - s, c + s * 0.8, c + s * 1.05], fill=(225, 190, 165))
    for dx in (-0.35, 0.35):
        d.rectangle([c + dx * s - s * 0.22, c - s * 0.42, c + dx * s + s * 0.22, c - s * 0.34], fill=(60, 40, 30))
        d.ellipse([c + dx * s - s * 0.15, c - s * 0.25, c + dx * s + s * 0.15, c - s * 0.08], fill=(30, 30, 30))
    d.polygon([(c, c - s * 0.05), (c - s * 0.12, c + s * 0.3), (c + s * 0.12, c + s * 0.3)], fill=(190, 150, 130))
    d.ellipse([c - s * 0.3, c + s * 0.45, c + s * 0.3, c + s * 0.6], fill=(150, 60, 60))
    return im.filter(ImageFilter.GaussianBlur(1.5))


@pytest.fixture()
def planted(tmp_path):
    """5 good images (one captioned), a JPEG near-copy of one at another size, a blurred image, a
    tiny image, a truncated PNG, a text file named .jpg, and a stray non-image file."""
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(5):
        shapes(10 + i).save(root / f"good{i}.png")
    (root / "good0.txt").write_text("sks dog on a  red sofa\n")
    buf = io.BytesIO()
    shapes(10).resize((80, 80), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=85)
    (root / "copy_of_good0.jpg").write_bytes(buf.getvalue())
    shapes(30).filter(ImageFilter.GaussianBlur(3)).save(root / "blurry.png")
    shapes(31).resize((12, 12)).save(root / "tiny.png")
    full = io.BytesIO()
    shapes(32).save(full, "PNG")
    (root / "truncated.png").write_bytes(full.getvalue()[:200])
    (root / "notes.jpg").write_text("not an image")
    (root / "readme.md").write_text("hi")
    return root


def test_laplacian_variance_equals_opencv():
    cv2 = pytest.importorskip("cv2")
    g = np.asarray(shapes(3, 48).convert("L"))
    assert D.laplacian_variance(g) == pytest.approx(cv2.Laplacian(g, cv2.CV_64F).var(), rel=1e-9)


def test_perceptual_hashes_separate_images_and_match_copies():
    a, b = shapes(1), shapes(2)
    copy = a.resize((90, 90), Image.Resampling.BICUBIC)
    for h in (D.phash, D.dhash):
        assert D.hamming(h(a), h(copy)) <= 4
        assert D.hamming(h(a), h(b)) > 12


def test_check_finds_each_planted_problem(planted):
    r = D.check_dataset(planted, resolution=32, min_size=32, blur_threshold=50)
    by_name = {i.path.rsplit("/", 1)[-1]: i for i in r.images}
    issues = r.by_issue()
    assert sorted(p.rsplit("/", 1)[-1] for p in issues["unreadable"]) == ["notes.jpg", "truncated.png"]
    assert [p.rsplit("/", 1)[-1] for p in issues["too-small"]] == ["tiny.png"]
    assert "blurry" in by_name["blurry.png"].issues
    assert by_name["blurry.png"].blur < 50 < min(by_name[f"good{i}.png"].blur for i in range(5))
    # the larger copy wins its duplicate group: the original is the one left out
    assert by_name["good0.png"].issues == ["duplicate-of:copy_of_good0.jpg"]
    assert by_name["copy_of_good0.jpg"].kept
    assert sorted(i.path.rsplit("/", 1)[-1] for i in r.kept()) == [
        "copy_of_good0.jpg", "good1.png", "good2.png", "good3.png", "good4.png"]
    assert r.skipped == ["readme.md"]
    assert by_name["good0.png"].caption == "sks dog on a red sofa"
    assert by_name["good1.png"].bucket == (32, 32)
    d = r.to_dict()
    assert d["kept"] == 5 and d["total"] == 10 and json.dumps(d)


def test_buckets_follow_aspect_ratio():
    b = D.make_buckets(512)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in b)
    assert D.assign_bucket(1200, 800, b)[0] > D.assign_bucket(1200, 800, b)[1]
    assert D.assign_bucket(800, 1200, b)[0] < D.assign_bucket(800, 1200, b)[1]
    assert D.assign_bucket(640, 640, b) == (512, 512)


def test_faces_centre_the_crop(tmp_path):
    pytest.importorskip("cv2")
    if D.face_detector() is None:
        pytest.skip("OpenCV without Haar cascades")
    root = tmp_path / "faces"
    root.mkdir()
    wide = Image.new("RGB", (400, 240), (40, 60, 40))
    wide.paste(drawn_face(s=30).crop((40, 40, 160, 160)), (140, 60))  # face centre near (200, 120)
    wide.save(root / "face.png")
    shapes(5, 200).save(root / "noface.png")
    r = D.check_dataset(root, resolution=64, min_size=64, blur_threshold=1)
    face, noface = r.images
    assert noface.faces == [] and r.faces_checked
    assert len(face.faces) == 1
    x, y, w, h = face.faces[0]
    assert abs(x + w / 2 - 200) < 15 and abs(y + h / 2 - 120) < 15
    left, top, right, bottom = face.crop
    assert left <= x and top <= y and right >= x + w and bottom >= y + h
    assert abs((left + right) / 2 - (x + w / 2)) <= 1 and abs((top + bottom) / 2 - (y + h / 2)) <= 1
    assert right - left < 300 and bottom - top < 240  # zoomed in on the face
    bw, bh = face.bucket
    assert abs((right - left) / (bottom - top) - bw / bh) < 0.02
    (ex,) = D.load_examples(_only(r, "/face.png"), token="sks")
    assert tuple(ex.pixels.shape) == (3, bh, bw)


def _only(r: D.DatasetReport, name: str) -> D.DatasetReport:
    r.images = [i for i in r.images if i.path.endswith(name)]
    return r


def test_examples_prompts_and_pixels(planted):
    r = D.check_dataset(planted, resolution=32, min_size=32, blur_threshold=50)
    ex = D.load_examples(r, token="sks", class_word="dog")
    assert len(ex) == 5
    assert all(tuple(e.pixels.shape) == (3, 32, 32) and e.pixels.min() >= -1 and e.pixels.max() <= 1 for e in ex)
    assert {e.prompt for e in ex} == {"a photo of sks dog"}
    by_name = {i.path.rsplit("/", 1)[-1]: i for i in r.images}
    by_name["good0.png"].caption = "sks, smiling"
    by_name["good1.png"].caption = "smiling"
    by_name["good0.png"].issues = []
    prompts = {e.path.rsplit("/", 1)[-1]: e.prompt for e in D.load_examples(r, token="sks", class_word="dog")}
    assert prompts["good0.png"] == "sks, smiling"
    assert prompts["good1.png"] == "a photo of sks dog, smiling"
    fp = r.fingerprint()
    assert len(fp) == 64 and fp == r.fingerprint()


def test_cli_dataset_check(planted, tmp_path):
    from loradex.cli import cli

    res = CliRunner().invoke(cli, ["dataset", "check", str(planted), "--resolution", "32", "--min-size", "32",
                                   "--blur-threshold", "50", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["kept"] == 5 and len(d["issues"]["unreadable"]) == 2
    res = CliRunner().invoke(cli, ["dataset", "check", str(planted), "--min-size", "32", "--blur-threshold", "50"])
    assert res.exit_code == 0 and "5 of 10 images kept" in res.output and "duplicate-of:copy_of_good0.jpg" in res.output


def test_cli_dataset_check_bad_input(tmp_path, capsys):
    from loradex.cli import main

    with pytest.raises(SystemExit) as e:
        main(["dataset", "check", str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_kohya_repeat_folders(tmp_path):
    """``<N>_<words>`` subfolders (kohya's DreamBooth layout): their images repeat N times and,
    without a caption, are prompted with the folder's words; images in the root repeat once; other
    folders are skipped (listed); the fingerprint names images by folder."""
    root = tmp_path / "data"
    (root / "10_sks dog").mkdir(parents=True)
    (root / "3_pattern_art").mkdir()
    (root / "misc").mkdir()
    shapes(1).save(root / "10_sks dog" / "a.png")
    shapes(2).save(root / "10_sks dog" / "b.png")
    (root / "10_sks dog" / "b.txt").write_text("sks dog, on grass")
    shapes(3).save(root / "3_pattern_art" / "c.png")
    shapes(4).save(root / "misc" / "d.png")
    shapes(5).save(root / "e.png")
    assert D.repeat_folder("10_sks dog") == (10, "sks dog") and D.repeat_folder("pattern") is None
    assert D.repeat_folder("0_x") is None and D.repeat_folder("3_pattern_art") == (3, "pattern_art")
    r = D.check_dataset(root, resolution=32, min_size=32, blur_threshold=0)
    assert r.skipped == ["misc/"] and len(r.kept()) == 4
    ex = {e.path.rsplit("/", 1)[-1]: e for e in D.load_examples(r, token="sks", class_word="dog")}
    assert (ex["a.png"].prompt, ex["a.png"].subset, ex["a.png"].repeats) == ("sks dog", "10_sks dog", 10)
    assert ex["b.png"].prompt == "sks dog, on grass"
    assert ex["c.png"].prompt == "pattern_art" and ex["c.png"].repeats == 3
    assert (ex["e.png"].prompt, ex["e.png"].subset, ex["e.png"].repeats) == ("a photo of sks dog", "data", 1)
    fp = r.fingerprint()
    (root / "10_sks dog" / "a.png").rename(root / "3_pattern_art" / "a.png")
    assert D.check_dataset(root, resolution=32, min_size=32, blur_threshold=0).fingerprint() != fp
