"""AUTOMATIC1111 textual-inversion embeddings inside PNG images (``a1111-png``).

A1111's trainer can save "images with stored embedding" (``textual_inversion.py``,
``save_image_with_stored_embedding``), and its loader (``EmbeddingDatabase.load_from_file``) reads an
embedding back from any ``.png`` (also ``.webp``/``.jxl``/``.avif`` through the pixel route) in the
embeddings folder, in two ways (``modules/textual_inversion/image_embedding.py``; AUTOMATIC1111/
stable-diffusion-webui, image_embedding.py at commit aea16953804660c39a03d7f4f2913f0ed2050940 and
textual_inversion.py at 22ecb78b51f7e6f0234cbc0efbde4ee9a2dc466f, the v1.x code):

* a PNG text chunk ``sd-ti-embedding``: ``base64(json.dumps(data, cls=EmbeddingEncoder))`` where
  ``data`` is the ``.pt`` dict (``string_to_token``, ``string_to_param``, ``name``, ``step``,
  ``sd_checkpoint``, ``sd_checkpoint_name``) and every tensor is written as
  ``{"TORCHTENSOR": tensor.tolist()}`` (decoded by ``EmbeddingDecoder`` as
  ``torch.from_numpy(np.array(list))``: float64, holding the float32 values exactly);
* "data in image" (``insert_image_data_embed``): the same JSON, zlib-compressed (level 9), split
  into nibbles; the low nibbles and the high nibbles each fill a block of pixels (height = the
  image's, 3 channels, padded by repeating the data), each block XOR-ed with an LCG stream
  (``m=2**32, a=1664525, c=1013904223, seed=0``, ``% 255``, masked to 4 bits) and decorated in its
  high nibbles with dots shaded after the first vector; the blocks are pasted left and right of
  the picture with one black column between. ``extract_image_data_embed`` crops black borders,
  keeps the low nibbles, splits at the first and last all-zero column, undoes the XOR and
  decompresses (zlib ignores the repeated tail).

The loader prefers the text chunk, and then names the embedding after ``data['name']`` (the file
stem only when there is none) -- unlike ``.pt`` files, which A1111 names after the file. What the
data holds is then read like a ``.pt``: ``string_to_param`` (one entry), ``clip_g`` + ``clip_l``
(SDXL; such a dict must hold nothing else, A1111 calls ``.detach()`` on every value), or a
one-tensor dict.

Reading: the text chunk is parsed without any imaging library (PNG chunks are length-prefixed;
``zTXt``/``iTXt`` inflated with a bound); the pixel route decodes the image with Pillow. Writing
(``--to a1111-png``) makes a small PNG (a picture of the vectors, one row of pixels per vector)
carrying the ``sd-ti-embedding`` text chunk A1111 reads, with Pillow. Pillow is not one of
loradex's own requirements (diffusers requires it, so it is installed wherever loradex is); where
it is missing, those two paths say so in a one-line FormatError.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from loradex.converters import safetensors_io as sio
from loradex.converters.common import ConversionReport, register_format
from loradex.converters.embeddings import (
    A1111_FIELDS,
    A1111_STAR_TOKEN_ID,
    COMPONENT_KEYS,
    _a1111_metadata,
    _extract,
    _layout,
    _resolve_arch,
    _TIConverter,
    check_vectors,
    token_notes,
)
from loradex.core.adapter import Adapter, Embedding
from loradex.errors import ConversionError, FormatError

if TYPE_CHECKING:
    import torch
else:
    from loradex.core.lazy import torch  # imported on first use (see core/lazy.py)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: the text chunk keyword A1111 writes and reads
TEXT_KEY = "sd-ti-embedding"
#: the JSON object A1111's EmbeddingEncoder writes for a tensor
TENSOR_KEY = "TORCHTENSOR"
#: Largest PNG looked at, largest text chunk / inflated payload accepted (a 75-vector SDXL
#: embedding is ~4 MB of JSON; images with stored embeddings are a few MB).
MAX_PNG_BYTES = 256 * 1024 * 1024
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
#: Images larger than this are not decoded looking for hidden data (A1111's are ~512 px).
MAX_PIXELS = 16 * 1024 * 1024
#: A1111's LCG (``image_embedding.lcg``) and its first values, from A1111's own self-test.
LCG_M, LCG_A, LCG_C = 2**32, 1664525, 1013904223


def is_png(path: str | Path) -> bool:
    """Whether the file starts with the 8-byte PNG signature (False when it cannot be read)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return f.read(8) == PNG_MAGIC
    except OSError:
        return False


def _need_pillow(what: str):
    try:
        from PIL import Image, PngImagePlugin
    except ImportError:  # pragma: no cover - Pillow comes with diffusers
        raise FormatError(f"{what} needs Pillow (pip install pillow; diffusers installs it)") from None
    return Image, PngImagePlugin


# ---- the text chunk ---------------------------------------------------------------------------
def _inflate(data: bytes, where: str) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, MAX_PAYLOAD_BYTES)
    except zlib.error as e:
        raise FormatError(f"{where}: corrupt compressed PNG text chunk ({e})") from None
    if d.unconsumed_tail:
        raise FormatError(f"{where}: a PNG text chunk inflates to more than {MAX_PAYLOAD_BYTES} bytes")
    return out


def png_text_chunks(path: str | Path) -> dict[str, str]:
    """The text chunks (``tEXt``, ``zTXt``, ``iTXt``) of a PNG file, keyword -> text, read from the
    chunk stream directly (no image decoding). FormatError for a file that is not a PNG or whose
    chunks run past its end."""
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_PNG_BYTES:
        raise FormatError(f"{p}: {size} bytes, more than the {MAX_PNG_BYTES} read from a PNG")
    out: dict[str, str] = {}
    with open(p, "rb") as f:
        if f.read(8) != PNG_MAGIC:
            raise FormatError(f"{p}: not a PNG file")
        pos = 8
        while pos + 8 <= size:
            head = f.read(8)
            if len(head) < 8:
                break
            length, ctype = struct.unpack(">I4s", head)
            if pos + 12 + length > size:
                raise FormatError(f"{p}: PNG chunk {ctype!r} runs past the end of the file")
            if ctype in (b"tEXt", b"zTXt", b"iTXt"):
                if length > MAX_PAYLOAD_BYTES:
                    raise FormatError(f"{p}: PNG text chunk of {length} bytes, more than {MAX_PAYLOAD_BYTES}")
                data = f.read(length)
                f.seek(4, 1)
                key, _, rest = data.partition(b"\0")
                name = key.decode("latin-1")
                try:
                    if ctype == b"tEXt":
                        out[name] = rest.decode("latin-1")
                    elif ctype == b"zTXt":
                        out[name] = _inflate(rest[1:], str(p)).decode("latin-1")
                    else:  # iTXt: compression flag, method, language\0, translated keyword\0, text
                        flag = rest[:1] == b"\1"
                        _lang, _, rest2 = rest[2:].partition(b"\0")
                        _tk, _, text = rest2.partition(b"\0")
                        out[name] = (_inflate(text, str(p)) if flag else text).decode("utf-8")
                except UnicodeDecodeError:
                    raise FormatError(f"{p}: PNG text chunk {name!r} is not text") from None
            else:
                f.seek(length + 4, 1)
            pos += 12 + length
            if ctype == b"IEND":
                break
    return out


def _decode_tensor(value: object, where: str) -> torch.Tensor:
    import numpy as np

    try:
        arr = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise FormatError(f"{where}: a {TENSOR_KEY} entry is not a rectangular array of numbers") from None
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise FormatError(f"{where}: a {TENSOR_KEY} entry has shape {list(arr.shape)}; expected [n_vectors, dim]")
    # A1111 decodes to float64 (np.array of Python floats); the values were float32 (its Embedding
    # vectors are float32), so float32 holds them exactly
    return torch.from_numpy(arr).to(torch.float32)


def decode_json(payload: bytes | str, where: str) -> dict:
    """A1111's ``EmbeddingDecoder``: JSON with ``{"TORCHTENSOR": [...]}`` objects as tensors."""

    def hook(d: dict):
        if TENSOR_KEY in d:
            return _decode_tensor(d[TENSOR_KEY], where)
        return d

    try:
        obj = json.loads(payload, object_hook=hook)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{where}: the stored embedding is not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: the stored embedding is a JSON {type(obj).__name__}, not an object")
    return obj


def decode_text_chunk(text: str, where: str) -> dict:
    """A1111's ``embedding_from_b64``: base64 -> JSON -> dict with tensors."""
    try:
        raw = base64.b64decode(text.strip(), validate=False)
    except (binascii.Error, ValueError):
        raise FormatError(f"{where}: the {TEXT_KEY} text chunk is not base64") from None
    return decode_json(raw, where)


class _Encoder(json.JSONEncoder):
    """A1111's ``EmbeddingEncoder``: a tensor becomes ``{"TORCHTENSOR": tensor.tolist()}``."""

    def default(self, o):
        if isinstance(o, torch.Tensor):
            return {TENSOR_KEY: o.detach().cpu().float().tolist()}
        return super().default(o)


def encode_text_chunk(data: dict) -> str:
    """A1111's ``embedding_to_b64``: ``base64(json.dumps(data))`` (as text, the way Pillow's
    ``PngInfo.add_text`` stores it in a ``tEXt`` chunk)."""
    return base64.b64encode(json.dumps(data, cls=_Encoder).encode()).decode("ascii")


# ---- data hidden in the pixels ------------------------------------------------------------------
def lcg_stream(n: int):
    """The first ``n`` values of A1111's ``lcg()`` generator as uint8 (``seed % 255``)."""
    import numpy as np

    out = np.empty(n, dtype=np.uint8)
    seed = 0
    m, a, c = LCG_M, LCG_A, LCG_C
    for i in range(n):
        seed = (a * seed + c) % m
        out[i] = seed % 255
    return out


def _xor_block(block):
    import numpy as np

    rand = lcg_stream(int(np.prod(block.shape))).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), rand & 0x0F)


def _crop_black(img, tol: int = 0):
    mask = (img > tol).all(2)
    mask0, mask1 = mask.any(0), mask.any(1)
    col_start, col_end = mask0.argmax(), mask.shape[1] - mask0[::-1].argmax()
    row_start, row_end = mask1.argmax(), mask.shape[0] - mask1[::-1].argmax()
    return img[row_start:row_end, col_start:col_end]


def extract_pixel_data(path: str | Path) -> dict | None:
    """A1111's ``extract_image_data_embed`` on the image at ``path``: the dict hidden in its pixels,
    or None when it holds none (A1111 then treats the file as a preview image and skips it)."""
    import numpy as np

    Image, _ = _need_pillow("reading an embedding hidden in an image's pixels")
    p = Path(path)
    try:
        with Image.open(p) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                return None
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    out = _crop_black(arr) & 0x0F
    black = np.where(np.sum(out, axis=(0, 2)) == 0)[0]
    if black.shape[0] < 2:
        return None
    lower = out[:, : black.min(), :]
    upper = out[:, black.max() + 1 :, :]
    if lower.shape != upper.shape or lower.size == 0:
        return None
    block = (_xor_block(upper) << 4) | _xor_block(lower)
    d = zlib.decompressobj()
    try:
        payload = d.decompress(block.flatten().tobytes(), MAX_PAYLOAD_BYTES)
    except zlib.error:
        return None
    if not d.eof:
        return None
    try:
        return decode_json(payload, str(p))
    except FormatError:
        return None


# ---- reading ----------------------------------------------------------------------------------
def read_png_data(path: str | Path) -> tuple[dict, str] | None:
    """``(data, route)`` of an embedding image (route ``"text"`` or ``"pixels"``), A1111's order:
    the ``sd-ti-embedding`` text chunk, else the pixels; None when the PNG holds no embedding."""
    p = Path(path)
    chunks = png_text_chunks(p)
    if TEXT_KEY in chunks:
        return decode_text_chunk(chunks[TEXT_KEY], str(p)), "text"
    data = extract_pixel_data(p)
    return (data, "pixels") if data is not None else None


def read_png_embedding(path: str | Path, token: str | None = None, arch=None) -> Adapter:
    """An Adapter holding the embedding of an A1111 embedding image (see the module docstring)."""
    p = Path(path)
    where = str(p)
    found = read_png_data(p)
    if found is None:
        raise FormatError(f"{p}: a PNG image without an embedding (no {TEXT_KEY} text chunk, no data in its pixels)")
    data, route = found
    layout = _layout({k for k in data if k not in A1111_FIELDS and k != "string_to_token"})
    if "string_to_param" in data:
        layout = "a1111-ti"
    if layout is None:
        raise FormatError(f"{where}: the stored embedding has no string_to_param, clip_l/clip_g or single tensor")
    view = data if layout == "a1111-ti" else {k: v for k, v in data.items() if k not in A1111_FIELDS}
    raw, file_token, extra = _extract(view, layout, where)
    vectors = check_vectors(raw, where)
    meta = {**_a1111_metadata(data), **extra, "a1111.png_route": route}
    # A1111 names an embedding image after its 'name' field (load_from_file: data.get('name', name))
    name = data.get("name") if isinstance(data.get("name"), str) and data.get("name") else None
    tok = token or name or file_token or p.stem
    notes = token_notes(tok)
    return Adapter(
        embeddings={tok: Embedding(tok, vectors)},
        metadata=meta,
        arch=_resolve_arch(arch, vectors, where, meta),
        source_format="a1111-png",
        notes=notes,
    )


def _preview(vectors: dict[str, torch.Tensor]):
    """A small picture of the vectors (one row of grey pixels per vector, each vector scaled to
    0..255, at least 64 px high): what a user sees in the embeddings folder."""
    import numpy as np

    Image, _ = _need_pillow("writing an embedding image")
    rows = torch.cat([t.float() for t in vectors.values()], dim=1)
    lo, hi = rows.min(dim=1, keepdim=True).values, rows.max(dim=1, keepdim=True).values
    grey = ((rows - lo) / (hi - lo).clamp_min(1e-12) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    width = min(grey.shape[1], 512)
    grey = grey[:, : width]
    reps = max(1, math.ceil(64 / grey.shape[0]))
    img = np.repeat(grey, reps, axis=0)
    return Image.fromarray(np.stack([img] * 3, axis=-1), mode="RGB")


@register_format
class A1111Png(_TIConverter):
    """AUTOMATIC1111's embedding image: a PNG whose ``sd-ti-embedding`` text chunk holds the
    embedding (read: that chunk, or the data A1111 hides in the pixels)."""

    name = "a1111-png"
    #: asked before the safetensors formats: a PNG is no safetensors file, and their header check
    #: would answer with a meaningless "header length ... does not fit" error
    priority = 15
    #: the file endings it writes (the CLI names an output without one after the first)
    suffixes = (".png",)
    description = "AUTOMATIC1111 embedding image (.png with an sd-ti-embedding text chunk, or data in its pixels)"

    def detect(self, path: Path) -> bool:
        """True for a PNG file holding an embedding (the ``sd-ti-embedding`` text chunk, else data
        in the pixels); False for anything that is not a PNG. A PNG without an embedding is a
        FormatError, so ``converters.detect`` names that instead of a safetensors header error."""
        if not path.is_file() or not is_png(path):
            return False
        if read_png_data(path) is None:
            # a PNG that is no embedding image: say so here rather than let the safetensors
            # formats fail on its bytes
            raise FormatError(f"{path}: a PNG image without an embedding (no {TEXT_KEY} text chunk, "
                              "no data hidden in its pixels)")
        return True

    def read(self, path: Path, arch=None, token: str | None = None) -> Adapter:
        """:func:`read_png_embedding`: one embedding, named ``token``, else the JSON's ``name`` field
        (A1111's rule for images), else the file stem; ``a1111.png_route`` in the metadata says
        whether it came from the text chunk or the pixels."""
        return read_png_embedding(path, token=token, arch=arch)

    def write(self, adapter, path, report: ConversionReport, dtype=None, title=None, token=None, arch=None,
              rank=None):
        """Write a preview PNG of the vectors with an ``sd-ti-embedding`` ``tEXt`` chunk (A1111's
        ``embedding_to_b64`` of the ``.pt`` dict; SDXL: ``{clip_l, clip_g}``, which A1111 names after
        the file). Nothing is hidden in the pixels. NaN/Inf values are a ConversionError (JSON
        cannot hold them); ``rank`` is ignored; needs Pillow."""
        _, PngImagePlugin = _need_pillow("writing an embedding image (--to a1111-png)")
        path = Path(path)
        emb, a = self._prepare(adapter, path, report, token, dtype, arch)
        if "text_encoder_2" in emb.vectors:
            # A1111 reads an SDXL embedding dict only when it holds nothing but clip_g and clip_l
            data: dict[str, object] = {COMPONENT_KEYS[c]: t for c, t in emb.vectors.items()}
            report.notes.append("SDXL: stored as {clip_l, clip_g} (A1111 then names it after the file)")
            if path.stem != emb.token:
                report.notes.append(f"A1111 calls this embedding {path.stem!r} (the file name), not {emb.token!r}")
        else:
            m = adapter.metadata
            step = m.get("a1111.step")
            data = {
                "string_to_token": {"*": A1111_STAR_TOKEN_ID},
                "string_to_param": {"*": emb.vectors["text_encoder"]},
                "name": emb.token,
                "step": int(step) if step is not None and step.lstrip("-").isdigit() else None,
                "sd_checkpoint": m.get("a1111.sd_checkpoint"),
                "sd_checkpoint_name": m.get("a1111.sd_checkpoint_name"),
            }
        if any(not bool(torch.isfinite(t).all()) for t in emb.vectors.values()):
            raise ConversionError(f"embedding {emb.token!r} holds NaN/Inf values, which JSON cannot store")
        info = PngImagePlugin.PngInfo()
        info.add_text(TEXT_KEY, encode_text_chunk(data))
        img = _preview(emb.vectors)
        with sio.atomic_path(path) as tmp:
            try:
                img.save(tmp, "PNG", pnginfo=info)
            except (OSError, ValueError) as e:
                raise FormatError(f"{path}: cannot write the image: {e}") from None
        if path.suffix.lower() != ".png":
            report.notes.append(f"A1111 reads embedding images named .png; {path.name} will be skipped there")


__all__ = [
    "PNG_MAGIC", "TEXT_KEY", "A1111Png", "decode_text_chunk", "encode_text_chunk", "extract_pixel_data",
    "is_png", "lcg_stream", "png_text_chunks", "read_png_data", "read_png_embedding",
]
