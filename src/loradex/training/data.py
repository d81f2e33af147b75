"""Training data: a folder of images with optional ``.txt`` captions, curated before training.

``check_dataset(root)`` looks at every file once and reports, per image:

* **unreadable**: PIL cannot decode it (truncated, not an image, zero bytes);
* **too small**: the short side is below ``min_size`` (upscaled faces train badly);
* **blurry**: the variance of the Laplacian of the grey image is below ``blur_threshold``. The
  measure (Pech-Pacheco et al. 2000, "Diatom autofocusing in brightfield microscopy") is computed
  with the 4-neighbour kernel ``[[0,1,0],[1,-4,1],[0,1,0]]`` on 0-255 grey values, exactly what
  ``cv2.Laplacian(gray, cv2.CV_64F).var()`` computes; images are first shrunk so the long side is at
  most 512 px so the number does not depend on the camera resolution. 100 is the usual threshold
  for photos;
* **near-duplicates**: perceptual hashes (pHash: the sign of the low 8x8 DCT coefficients of the
  32x32 grey image against their median, DC term excluded, so 63 bits; Zauner 2010) at most
  ``dup_distance`` bits apart (Hamming), grouped transitively. Of each group the image with no
  other issue, then the largest, then the sharpest is kept;
* **faces** (optional extra ``faces``: ``opencv-python-headless<5``; OpenCV 5 dropped the Haar
  cascades): OpenCV's bundled ``haarcascade_frontalface_default.xml``; the largest face centres the
  training crop;
* **aspect bucket**: the bucket (width, height) of area <= resolution^2 and sides a multiple of
  ``step`` whose aspect ratio is closest (in log ratio) to the image's (kohya sd-scripts' bucketing
  idea: train at several shapes without cropping everything to squares).

``DatasetReport.kept()`` is the cleaned view; ``load_examples`` turns it into training tensors (the
crop centred on the face when one was found, else on the image centre, then resized to the bucket).

**Repeats** (kohya's DreamBooth folders, ``config_util.generate_dreambooth_subsets_config_by_subdirs``
in kohya-ss/sd-scripts 48d368f): a subfolder named ``<N>_<words>`` (``10_sks person``) holds images
seen N times per epoch, and ``<words>`` is the prompt of its images that have no caption (kohya's
class tokens). Images directly in the folder are seen once and prompted with the instance prompt.
Other subfolders are listed as skipped, as kohya ignores folders without a repeat count.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from loradex.errors import LoradexError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: Shrink to this long side before measuring blur (resolution-independent measure).
BLUR_MAX_SIDE = 512
DEFAULT_BLUR_THRESHOLD = 100.0
DEFAULT_DUP_DISTANCE = 6
DEFAULT_MIN_SIZE = 256
#: Pixels beyond the detection box a face crop keeps: the crop side is this times the face side.
FACE_CROP_FACTOR = 2.5


class DatasetError(LoradexError):
    """The dataset folder is missing, empty, or nothing usable is left after curation."""


# ---- measures (pure numpy) -----------------------------------------------------------------------
def laplacian_variance(gray: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a 2-D grey image (0-255 values). The border is
    reflected without repeating the edge pixel (numpy ``reflect``), as OpenCV's default
    ``BORDER_REFLECT_101`` does. Images smaller than 3x3 give 0."""
    g = np.asarray(gray, dtype=np.float64)
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    p = np.pad(g, 1, mode="reflect")
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4.0 * g
    return float(lap.var())


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``C`` (``C @ x`` is the DCT of ``x``)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


_DCT32 = _dct_matrix(32)


def phash(img) -> int:
    """Perceptual hash of a PIL image as an int: 32x32 grey (Lanczos), orthonormal 2-D DCT-II, the
    8x8 low frequencies without the DC term (63 values) compared with their median; bit ``i`` is
    set when value ``i`` (row-major) is above it. Stored as 16 hex digits (``ImageInfo.phash``)."""
    from PIL import Image

    g = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    d = _DCT32 @ g @ _DCT32.T
    low = d[:8, :8].flatten()[1:]
    bits = low > np.median(low)
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def dhash(img) -> int:
    """64-bit difference hash: 9x8 grey, one bit per horizontal neighbour pair (left > right)."""
    from PIL import Image

    g = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int32)
    bits = (g[:, :-1] > g[:, 1:]).flatten()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hamming(a: int, b: int) -> int:
    """Bits in which two 64-bit hashes differ (the near-duplicate distance)."""
    return (a ^ b).bit_count()


# ---- buckets and crops ---------------------------------------------------------------------------
def bucket_step(resolution: int) -> int:
    """Side granularity: 64 px at SD sizes (kohya's default), 8 px for toy resolutions."""
    return 64 if resolution >= 256 else 8


def make_buckets(resolution: int, step: int | None = None, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs with sides multiples of ``step``, area <= resolution^2, aspect ratio
    within ``max_ratio``; for each width the tallest height that fits (and the transposes)."""
    step = step or bucket_step(resolution)
    area = resolution * resolution
    out = {(resolution, resolution)}
    w = step
    while w <= resolution * max_ratio:
        h = (area // w) // step * step
        if h >= step and max(w, h) / min(w, h) <= max_ratio:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out)


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose log aspect ratio is closest to the image's (ties: the larger area)."""
    r = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


def crop_box(width: int, height: int, target: tuple[int, int],
             face: tuple[int, int, int, int] | None = None) -> tuple[int, int, int, int]:
    """The largest box of the target's aspect ratio inside the image, centred on the face (x, y, w,
    h) when given (and shrunk towards ``FACE_CROP_FACTOR`` x the face so the face fills the crop),
    else on the image centre. Returns (left, top, right, bottom)."""
    tw, th = target
    ar = tw / th
    cw, ch = (width, width / ar) if width / height <= ar else (height * ar, height)
    cx, cy = width / 2, height / 2
    if face is not None:
        fx, fy, fw, fh = face
        cx, cy = fx + fw / 2, fy + fh / 2
        want = FACE_CROP_FACTOR * max(fw, fh)
        if want < min(cw, ch):  # zoom in on the face, keeping the aspect ratio
            s = want / min(cw, ch)
            cw, ch = cw * s, ch * s
    left = min(max(cx - cw / 2, 0), width - cw)
    top = min(max(cy - ch / 2, 0), height - ch)
    return round(left), round(top), round(left + cw), round(top + ch)


# ---- faces ---------------------------------------------------------------------------------------
def face_detector():
    """OpenCV's bundled frontal-face Haar cascade, or None when OpenCV (the ``faces`` extra) is
    missing or has no cascades (OpenCV >= 5 removed them)."""
    try:
        import cv2
    except ImportError:
        return None
    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        return None
    path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
    if not path.is_file():
        return None
    det = cv2.CascadeClassifier(str(path))
    return None if det.empty() else det


def detect_faces(detector, img) -> list[tuple[int, int, int, int]]:
    """Faces (x, y, w, h) in image pixels, largest first. Detection runs on a copy whose long side
    is at most 640 px (the cascade's scale search is quadratic in the image size)."""
    g = np.asarray(img.convert("L"))
    s = min(1.0, 640 / max(g.shape))
    if s < 1.0:
        from PIL import Image

        g = np.asarray(img.convert("L").resize((max(1, round(g.shape[1] * s)), max(1, round(g.shape[0] * s))),
                                                Image.Resampling.BILINEAR))
    min_side = max(12, round(min(g.shape) * 0.08))
    found = detector.detectMultiScale(g, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
    faces = [tuple(int(round(v / s)) for v in f) for f in (found if len(found) else [])]
    return sorted(faces, key=lambda f: -f[2] * f[3])


# ---- the report ----------------------------------------------------------------------------------
@dataclass
class ImageInfo:
    """One file's curation record: its measures, bucket and crop, and why it is left out (if it is)."""

    path: str
    readable: bool
    width: int = 0
    height: int = 0
    blur: float | None = None
    phash: str | None = None
    faces: list[tuple[int, int, int, int]] = field(default_factory=list)
    bucket: tuple[int, int] | None = None
    crop: tuple[int, int, int, int] | None = None
    caption: str | None = None
    #: kohya repeat folder (``10_sks person``) the image is in; None: the dataset folder itself
    subset: str | None = None
    repeats: int = 1
    #: the folder's prompt for images without a caption (kohya's class tokens)
    class_tokens: str | None = None
    #: Why it is left out: unreadable, too-small, blurry, duplicate-of:<path>. Empty: kept.
    issues: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def kept(self) -> bool:
        """True when nothing leaves the image out."""
        return not self.issues


@dataclass
class DatasetReport:
    """The curation of a folder: every image's record and the settings used; ``kept()`` is the
    cleaned view the trainer uses."""

    root: str
    resolution: int
    min_size: int
    blur_threshold: float
    dup_distance: int
    faces_checked: bool
    images: list[ImageInfo]
    skipped: list[str] = field(default_factory=list)  # files that are not images (captions excluded)

    def kept(self) -> list[ImageInfo]:
        """The images the trainer uses (no issue)."""
        return [i for i in self.images if i.kept]

    def by_issue(self) -> dict[str, list[str]]:
        """Issue kind (``duplicate-of:x`` counts as ``duplicate-of``) -> the paths it leaves out."""
        out: dict[str, list[str]] = {}
        for i in self.images:
            for issue in i.issues:
                out.setdefault(issue.split(":", 1)[0], []).append(i.path)
        return out

    def buckets(self) -> dict[str, int]:
        """``WxH`` -> how many kept images train at that bucket."""
        out: dict[str, int] = {}
        for i in self.kept():
            k = f"{i.bucket[0]}x{i.bucket[1]}"
            out[k] = out.get(k, 0) + 1
        return out

    def fingerprint(self) -> str:
        """sha256 over the kept images' bytes and captions, in name order: the dataset hash
        recorded in a trained adapter's lineage."""
        h = hashlib.sha256()
        for i in sorted(self.kept(), key=lambda i: i.path):
            h.update((f"{i.subset}/" if i.subset else "").encode() + Path(i.path).name.encode() + b"\0")
            h.update(hashlib.sha256(Path(i.path).read_bytes()).digest())
            h.update((i.caption or "").encode() + b"\0")
        return h.hexdigest()

    def to_dict(self) -> dict:
        """The report as JSON-ready data (``loradex dataset check --json``)."""
        return {
            "root": self.root, "resolution": self.resolution, "min_size": self.min_size,
            "blur_threshold": self.blur_threshold, "dup_distance": self.dup_distance,
            "faces_checked": self.faces_checked, "total": len(self.images), "kept": len(self.kept()),
            "issues": self.by_issue(), "buckets": self.buckets(), "skipped": self.skipped,
            "images": [asdict(i) | {"kept": i.kept} for i in self.images],
        }

    def summary(self) -> str:
        """One line: kept of total, counts per issue, faces."""
        issues = self.by_issue()
        parts = [f"{len(self.kept())} of {len(self.images)} images kept"]
        parts += [f"{len(v)} {k}" for k, v in sorted(issues.items())]
        faces = sum(1 for i in self.kept() if i.faces)
        parts.append(f"faces in {faces}" if self.faces_checked else "faces not checked (pip install 'loradex[faces]')")
        return ", ".join(parts)


def _caption(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    if txt.is_file():
        try:
            return " ".join(txt.read_text(encoding="utf-8", errors="replace").split()) or None
        except OSError:
            return None
    return None


def _open(path: Path):
    """Decode fully (PIL opens lazily: truncation shows only on load) and convert to RGB."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def repeat_folder(name: str) -> tuple[int, str] | None:
    """kohya's ``extract_dreambooth_params``: ``"10_sks person"`` -> ``(10, "sks person")``; None
    when the name does not start with a positive count and ``_``."""
    head, sep, rest = name.partition("_")
    if not sep or not head.isdigit() or int(head) < 1:
        return None
    return int(head), rest


def _dataset_files(root: Path, skipped: list[str]):
    """``(path, subset)`` of every file of ``root`` (subset None) and of its kohya repeat folders
    (subset ``(folder name, repeats, class tokens)``), in name order; other folders are skipped."""
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    for p in entries:
        if p.is_file():
            yield p, None
    for p in entries:
        if not p.is_dir():
            continue
        rf = repeat_folder(p.name)
        if rf is None:
            skipped.append(f"{p.name}/")
            continue
        for f in sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith(".")):
            yield f, (p.name, rf[0], rf[1] or None)


def check_dataset(
    root: str | Path, resolution: int = 512, min_size: int = DEFAULT_MIN_SIZE,
    blur_threshold: float = DEFAULT_BLUR_THRESHOLD, dup_distance: int = DEFAULT_DUP_DISTANCE,
    faces: bool | None = None, progress=None,
) -> DatasetReport:
    """Curate the images of ``root`` and of its kohya repeat folders (``<N>_<words>``; nothing
    deeper). ``faces``: True requires OpenCV, None uses it when installed, False skips detection.
    ``progress``: called with 1 per file."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    detector = None
    if faces is not False:
        detector = face_detector()
        if detector is None and faces:
            raise DatasetError("face detection needs OpenCV with its Haar cascades: pip install 'loradex[faces]'")
    buckets = make_buckets(resolution)
    images: list[ImageInfo] = []
    skipped: list[str] = []
    hashes: list[tuple[ImageInfo, int]] = []
    for path, subset in _dataset_files(root, skipped):
        if progress:
            progress(1)
        shown = f"{subset[0]}/{path.name}" if subset else path.name
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if path.suffix.lower() != ".txt":
                skipped.append(shown)
            continue
        info = ImageInfo(path=str(path), readable=False, caption=_caption(path))
        if subset:
            info.subset, info.repeats, info.class_tokens = subset
        images.append(info)
        try:
            img = _open(path)
        except Exception as e:  # PIL raises many types for bad files: all mean "unreadable"
            info.issues.append("unreadable")
            info.error = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            continue
        info.readable = True
        info.width, info.height = img.size
        if min(img.size) < min_size:
            info.issues.append("too-small")
        small = img
        if max(img.size) > BLUR_MAX_SIDE:
            from PIL import Image

            s = BLUR_MAX_SIDE / max(img.size)
            small = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BILINEAR)
        info.blur = round(laplacian_variance(np.asarray(small.convert("L"))), 3)
        if info.blur < blur_threshold:
            info.issues.append("blurry")
        h = phash(img)
        info.phash = f"{h:016x}"
        hashes.append((info, h))
        if detector is not None:
            info.faces = detect_faces(detector, img)
        info.bucket = assign_bucket(info.width, info.height, buckets)
        info.crop = crop_box(info.width, info.height, info.bucket, info.faces[0] if info.faces else None)
    _mark_duplicates(hashes, dup_distance)
    return DatasetReport(str(root), resolution, min_size, blur_threshold, dup_distance, detector is not None,
                         images, skipped)


def _mark_duplicates(hashes: list[tuple[ImageInfo, int]], dup_distance: int) -> None:
    """Group images whose hashes are within ``dup_distance`` (single linkage, union-find); keep the
    largest, then sharpest, of each group (duplicates are judged among readable images that have
    no other issue first, so a sharp copy wins over a blurry one)."""
    n = len(hashes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if hamming(hashes[i][1], hashes[j][1]) <= dup_distance:
                parent[find(i)] = find(j)
    groups: dict[int, list[ImageInfo]] = {}
    for i, (info, _) in enumerate(hashes):
        groups.setdefault(find(i), []).append(info)
    for members in groups.values():
        if len(members) < 2:
            continue
        best = max(members, key=lambda m: (not m.issues, m.width * m.height, m.blur or 0.0))
        for m in members:
            if m is not best:
                m.issues.append(f"duplicate-of:{Path(best.path).name}")


# ---- the cleaned view as training examples -------------------------------------------------------
@dataclass
class Example:
    """One training image: pixels in [-1, 1] shaped (3, H, W) at its bucket size, its prompt, the
    dataset folder it counts in (kohya's ``ss_dataset_dirs`` key) and its repeats per epoch."""

    path: str
    pixels: object  # torch.Tensor
    prompt: str
    subset: str | None = None
    repeats: int = 1


def instance_prompt(token: str, class_word: str | None) -> str:
    """DreamBooth's convention (Ruiz et al. 2022): "a photo of [V] [class noun]"."""
    return f"a photo of {token} {class_word}" if class_word else f"a photo of {token}"


def load_examples(report: DatasetReport, token: str, class_word: str | None = None,
                  resolution: int | None = None) -> list[Example]:
    """The kept images, cropped (face-centred when a face was found) and resized to their bucket
    (re-bucketed when ``resolution`` differs from the report's), each with its prompt: the caption
    as is when it mentions ``token`` (a whole word, any case), ``"<instance prompt>, <caption>"``
    when it does not, the instance prompt alone without a caption; in a kohya repeat folder the
    folder's words take the instance prompt's place. DatasetError when nothing is kept."""
    import torch
    from PIL import Image

    kept = report.kept()
    if not kept:
        raise DatasetError(f"{report.root}: no usable images ({report.summary()})")
    buckets = make_buckets(resolution) if resolution and resolution != report.resolution else None
    instance = instance_prompt(token, class_word)
    out = []
    for info in kept:
        base = info.class_tokens or instance
        img = _open(Path(info.path))
        bucket = assign_bucket(info.width, info.height, buckets) if buckets else info.bucket
        box = crop_box(info.width, info.height, bucket, info.faces[0] if info.faces else None)
        img = img.crop(box).resize(bucket, Image.Resampling.LANCZOS)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
        cap = info.caption
        mentions = cap is not None and re.search(rf"(?<!\w){re.escape(token)}(?!\w)", cap, re.IGNORECASE)
        prompt = base if not cap else (cap if mentions else f"{base}, {cap}")
        out.append(Example(info.path, x, prompt, info.subset or Path(report.root).name, info.repeats))
    return out
