"""Sparsifying merges (TIES, DARE, DARE-TIES, magnitude) of dense float32 updates, computed block
by block in cache, and equal bit for bit to ``peft.utils.merge_utils`` on the same inputs.

Pure math: no loradex imports, no I/O. ``loradex.merge.ties`` writes the per-input updates ``d_i``
as the rows of one ``(N, numel)`` float32 tensor, calls :func:`prepare_rows` and
:func:`combine_rows`, and rank-reduces the result. The definitions are peft's (``ties``,
``dare_linear``, ``dare_ties``, ``magnitude_prune``; ``majority_sign_method="total"``):

* trim (``magnitude_prune``, ``ties``): keep the ``k = int(density * numel)`` entries of largest
  ``|d_i|`` -- the set ``torch.topk(|d_i|, k)`` returns -- and zero the rest;
* drop (``dare_*``): keep each entry with probability ``density`` and divide the kept by
  ``density``;
* linear (``magnitude_prune``, ``dare_linear``): ``sum_i w_i d_i'``;
* TIES (``ties``, ``dare_ties``): ``e = +1`` where ``sum_i d_i' >= 0`` else ``-1``;
  ``sum_i w_i d_i' [sign(d_i') = e] / max(1, #{i: sign(d_i') = e})``.

**Why it is fast.** peft (and the float64 path loradex had before) stacks float64 copies of every
update, finds each trim threshold with ``torch.topk`` (a partial sort, 60-200 ns per entry) and
makes a fresh full-size tensor for every step. The steps here are memory-bound passes, so they
are fused into blocks that stay in cache (a pass over a hot block costs ~0.1 ns per entry, over
memory ~0.5-1 ns), with reused buffers (:class:`Workspace`):

* the threshold is the exact ``k``-th largest magnitude ``t`` (:func:`magnitude_threshold`): the
  order statistics of a strided sample bracket it (``[lo, hi]``, :data:`SAMPLE_SIGMAS` binomial
  standard deviations of margin); one sweep over the row, block by block, takes ``|d|``, counts
  the entries above ``hi`` and gathers the ~2% inside the bracket, and ``torch.kthvalue`` picks
  ``t`` among those. The sample only decides how fast this is, never the result;
* the cut itself (``|d| >= t``, one ``hardshrink``) is applied inside the combine's chunks
  (:class:`Cut`); the kept set is topk's set exactly, unless entries tie at the cut (then the
  first of them in row-major order are kept, see :func:`magnitude_cut`);
* DARE's Bernoulli masks are drawn as before (``torch.bernoulli`` of float64 probabilities from the
  module's generator: the draws peft makes on a float64 tensor), written as ``bool``;
* sign election and the disjoint mean run over column chunks of the rows with peft's operations
  in peft's order, comparisons written to float buffers (~4x cheaper than ``bool``). The chunks
  start at multiples of :data:`CHUNK_ALIGN` entries, where ``torch.sum(dim=0)`` over the inputs
  adds in the same order as on the whole stacked tensor (checked on torch 2.x for 2-16 inputs
  and odd sizes, 1 or 2 threads): the result is then identical to peft's, zeros' signs aside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Chunks of the combine start at multiples of this many entries (see the module docstring).
CHUNK_ALIGN = 4096
#: Entries of all inputs together in one chunk of the combine (1 MiB of float32).
CHUNK_ENTRIES = 1 << 18
#: Entries per block of the threshold sweep (1 MiB of float32: its buffers stay in cache; smaller
#: blocks pay more per-call overhead than they save, measured).
SELECT_BLOCK = 1 << 18
#: Below this many entries the exact threshold is ``torch.kthvalue`` of all of them.
SMALL_SELECT = 1 << 17
#: Binomial standard deviations of margin around the sampled threshold position (a miss, which
#: only costs a ``kthvalue`` of everything, has probability ~7e-6).
SAMPLE_SIGMAS = 4.5

METHODS = ("ties", "dare", "dare_ties", "magnitude")


class Workspace:
    """Reusable flat buffers, one per (name, dtype), grown to the largest size asked for.

    A fresh large tensor costs page faults on first touch (measured here: ~2.5 ns per float32
    entry, ten times the ``abs`` that fills it); a merge that reuses its buffers across modules
    pays that once. Not thread-safe: one workspace per worker thread."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A contiguous tensor of ``shape`` (uninitialised) viewing the buffer ``name``."""
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        key = (name, dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype)
            self._bufs[key] = buf
        return buf[:n].view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the reusable buffers this workspace holds."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


@dataclass
class Cut:
    """How a trim cuts one row: entries with ``|d| > below`` survive (``below`` None: all of them),
    then the flat indices ``drop`` (tied entries past the ``k``-th) are zeroed; ``keep`` (a bool
    mask, the NaN case handed to ``torch.topk``) replaces both when set."""

    below: float | None = None
    drop: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    def apply_(self, row: torch.Tensor) -> torch.Tensor:
        """The cut in place on the whole 1-D ``row`` (what :func:`combine_rows` does chunk by chunk)."""
        self.pre_(row)
        if self.below is not None:
            torch.ops.aten.hardshrink.out(row, self.below, out=row)
        return row

    def pre_(self, row: torch.Tensor) -> None:
        """The parts that are not a threshold (``keep``, ``drop``), in place on the whole row."""
        if self.keep is not None:
            row.mul_(self.keep)
        if self.drop is not None and self.drop.numel():
            row[self.drop] = 0


def _sample_abs(row: torch.Tensor, s: int) -> torch.Tensor:
    """About ``s`` magnitudes of a 1-D tensor at a fixed odd stride from a fixed offset: cheap (no
    random gather) and spread over rows and columns alike, the stride being coprime to 2, 3, 5 and
    7 and so to every common layer width. Deterministic."""
    n = row.numel()
    stride = max(1, n // s) | 1
    while stride > 1 and math.gcd(stride, 3 * 5 * 7) != 1:
        stride += 2
    return row[stride // 2::stride].abs()


def _gather(values: torch.Tensor, flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values[flags], positions)`` for a sparse (a few %) contiguous ``bool`` mask, positions
    ascending: ``nonzero`` over the mask read as 8-byte words (8x fewer entries), then the hit
    words' 8 positions checked -- ~3x faster than ``values[flags]``, whose ``nonzero`` visits every
    entry."""
    n = values.numel()
    n8 = n // 8 * 8
    if n8 == 0 or flags.storage_offset() % 8:
        pos = torch.nonzero(flags).view(-1)
        return values[pos], pos
    words = torch.nonzero(flags[:n8].view(torch.int64)).view(-1)
    pos = (words[:, None] * 8 + torch.arange(8)).view(-1)
    pos = pos[flags[pos]]
    if n8 < n:
        pos = torch.cat([pos, torch.nonzero(flags[n8:]).view(-1) + n8])
    return values[pos], pos


def magnitude_threshold(row: torch.Tensor, k: int, *, workspace: Workspace | None = None) -> tuple[torch.Tensor, int]:
    """``(t, c)`` for a 1-D float ``row`` and ``1 <= k <= numel``: the ``k``-th largest ``|row|``
    in ``torch.topk``'s order (NaN ranks above everything; ``t`` is NaN when the top ``k`` are all
    NaN), exactly the value ``torch.kthvalue`` gives, and the number ``c >= k`` of entries that
    rank at or above it (NaN included).

    Large rows: the ``lo``/``hi`` order statistics of a strided sample bracket ``t``; one sweep in
    :data:`SELECT_BLOCK`-entry blocks takes ``|d|`` into a hot buffer, counts the entries ``<=
    hi`` (the others, NaN included, rank above the bracket) and gathers those ``>= lo`` among
    them; ``torch.kthvalue`` picks ``t`` there. A bracket that misses falls back to ``kthvalue``
    of everything."""
    t, count, _ = _select(row, k, workspace or Workspace())
    return t, count


def _select(row: torch.Tensor, k: int, ws: Workspace) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """:func:`magnitude_threshold` plus, when ``c > k``, the ascending flat positions of the
    entries with ``|d| = t`` (the bracket's gathered positions hold them all)."""
    n = row.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")

    def whole() -> tuple[torch.Tensor, int, torch.Tensor | None]:
        mags = row.abs()
        nan = int(torch.count_nonzero(torch.isnan(mags)))
        if nan >= k:
            return torch.tensor(float("nan"), dtype=mags.dtype), nan, None
        t = torch.kthvalue(mags[~torch.isnan(mags)] if nan else mags, n - k + 1).values
        count = nan + int(torch.count_nonzero(mags >= t))
        return t, count, torch.nonzero(mags == t).view(-1) if count > k else None

    if n <= SMALL_SELECT or not row.is_floating_point():
        return whole()
    sample = _sample_abs(row, min(1 << 16, max(1 << 12, n >> 6)))
    s = sample.numel()
    f = (n - k) / n  # the target's position from below, as a fraction
    margin = SAMPLE_SIGMAS * math.sqrt(s * f * (1 - f)) + 2
    jl, jh = math.floor(f * s - margin), math.ceil(f * s + margin)
    if jh >= s or jl < 0 or bool(torch.isnan(sample).any()):
        return whole()
    hi = float(torch.kthvalue(sample, jh + 1).values)
    lo = float(torch.kthvalue(sample, jl + 1).values)
    block = min(SELECT_BLOCK, n)
    mags = ws.get("select_mags", (block,), row.dtype)
    le = ws.get("select_le", (block,), row.dtype)
    ge = ws.get("select_ge", (block,), row.dtype)
    flags = ws.get("select_flags", (block,), torch.bool)
    at_most_hi = 0  # exact: each block's float sum is an integer below 2^24
    cands, where = [], []
    for start in range(0, n, block):
        length = min(block, n - start)
        m = torch.abs(row[start:start + length], out=mags[:length])
        torch.le(m, hi, out=le[:length])
        at_most_hi += int(le[:length].sum())
        torch.ge(m, lo, out=ge[:length]).mul_(le[:length])
        vals, pos = _gather(m, flags[:length].copy_(ge[:length]))
        cands.append(vals)
        where.append(pos + start)
    above = n - at_most_hi  # > hi, or NaN
    cand = torch.cat(cands)
    need = k - above
    if need <= 0 or need > cand.numel():
        return whole()
    t = torch.kthvalue(cand, cand.numel() - need + 1).values
    count = above + int(torch.count_nonzero(cand >= t))
    return t, count, torch.cat(where)[cand == t] if count > k else None


def magnitude_cut(row: torch.Tensor, density: float, *, workspace: Workspace | None = None) -> Cut:
    """The :class:`Cut` of peft's ``magnitude_based_pruning`` for a 1-D float ``row``: keep the
    ``k = int(density * numel)`` entries of largest magnitude (``density >= 1``: all; ``k = 0``:
    none).

    With ``t`` the ``k``-th largest magnitude (:func:`magnitude_threshold`) the entries kept are
    those with ``|d| > t`` and, of those with ``|d| = t``, the first ones in row-major order up to
    ``k`` in all. That is topk's set whenever no two entries tie at the cut; when they do, which
    of the tied entries ``topk`` returns is up to its partial sort (``std::nth_element`` on CPU),
    and asking it costs 60-200 ns per entry (a cut tie is likely in a layer of 10^7 entries:
    float32 magnitudes there repeat). Such a result differs from peft's only in which of several
    exactly equal magnitudes is kept. Magnitudes with NaN filling the top ``k`` (which ``topk``
    ranks first) are handed to ``torch.topk``, as in peft. The threshold becomes one
    ``hardshrink`` at ``nextafter(t, 0)`` (``|d| > nextafter(t, 0)`` is ``|d| >= t``)."""
    n = row.numel()
    if density >= 1:
        return Cut()
    k = int(density * n)
    if k <= 0:
        return Cut(keep=torch.zeros(n, dtype=torch.bool))
    t, count, tied = _select(row, k, workspace or Workspace())
    if math.isnan(float(t)):
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.topk(row.abs(), k=k, largest=True).indices] = True
        return Cut(keep=keep)
    if float(t) == 0.0:  # every nonzero entry is kept; the zeros tie, and stay zeros either way
        return Cut()
    cut = Cut(below=float(torch.nextafter(t, torch.zeros((), dtype=t.dtype))))
    if count > k:  # entries equal to t on both sides of the cut: keep the first ones
        cut.drop = tied[tied.numel() - (count - k):]
    return cut


def trim_(row: torch.Tensor, density: float, *, workspace: Workspace | None = None) -> torch.Tensor:
    """peft's ``magnitude_based_pruning`` in place on a 1-D float tensor (:func:`magnitude_cut`,
    applied). Returns ``row``."""
    return magnitude_cut(row, density, workspace=workspace).apply_(row)


def trim_mask(delta: torch.Tensor, density: float, *, workspace: Workspace | None = None) -> torch.Tensor:
    """The ``bool`` mask (``delta``'s shape) of the entries :func:`magnitude_cut` keeps."""
    flat = delta.reshape(-1)
    cut = magnitude_cut(flat, density, workspace=workspace)
    if cut.keep is not None:
        return cut.keep.view(delta.shape)
    mags = flat.abs()
    mask = torch.ones(flat.numel(), dtype=torch.bool) if cut.below is None else (mags > cut.below) | mags.isnan()
    if cut.drop is not None:
        mask[cut.drop] = False
    return mask.view(delta.shape)


def bernoulli_keep(shape, density: float, generator: torch.Generator, out: torch.Tensor | None = None) -> torch.Tensor:
    """DARE's keep mask (``bool``): ``torch.bernoulli`` of float64 probabilities ``density`` drawn
    from ``generator`` in row-major order -- the draws of ``torch.bernoulli(torch.full_like(d,
    density))`` for a float64 ``d`` of that shape (peft's ``random_pruning`` on float64 updates,
    loradex's masks since the DARE merge exists). float32 probabilities would draw differently."""
    shape = tuple(shape)
    mask = out if out is not None else torch.empty(shape, dtype=torch.bool)
    p = torch.tensor(float(density), dtype=torch.float64).expand(shape)
    return mask.view(shape).bernoulli_(p, generator=generator)


def prepare_rows(method: str, rows: torch.Tensor, density: float, generator: torch.Generator | None = None,
                 *, workspace: Workspace | None = None) -> list[Cut] | None:
    """The sparsification of the ``(N, numel)`` float rows, as peft's ``prune`` (``density >= 1``:
    none, as peft). DARE (``dare``, ``dare_ties``) drops and rescales in place (``tensor * mask /
    density``), one mask per row in row order from ``generator``, and returns None; a trim
    (``ties``, ``magnitude``) returns each row's :class:`Cut` for :func:`combine_rows` to apply
    (``Cut.apply_`` applies one at once)."""
    if method not in METHODS:
        raise ValueError(f"unknown sparse method {method!r}")
    if density >= 1:
        return None
    ws = workspace or Workspace()
    if method in ("ties", "magnitude"):
        return [magnitude_cut(row, density, workspace=ws) for row in rows]
    if generator is None:
        raise ValueError("dare needs a generator (seeded per module)")
    for row in rows:
        keep = bernoulli_keep(row.shape, density, generator, out=ws.get("keep", row.shape, torch.bool))
        row.mul_(keep).div_(density)
    return None


def _sum0(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``torch.sum(x, 0, out=out)`` for an ``(N, L)`` tensor; for ``N <= 2`` the one addition it
    makes (``a + b`` is exact to the last bit either way; ~2x faster than the reduction kernel,
    which zero-fills ``out`` first)."""
    if x.shape[0] == 1:
        return out.copy_(x[0])
    if x.shape[0] == 2:
        return torch.add(x[0], x[1], out=out)
    return torch.sum(x, 0, out=out)


def combine_rows(method: str, rows: torch.Tensor, weights, *, cuts: list[Cut] | None = None,
                 out: torch.Tensor | None = None, workspace: Workspace | None = None,
                 chunk: int = CHUNK_ENTRIES) -> torch.Tensor:
    """The merged update of the ``(N, numel)`` rows, 1-D (``numel``), in ``rows``' dtype: ``sum_i
    w_i d_i'`` (``dare``, ``magnitude``) or TIES' elected-sign disjoint mean (``ties``,
    ``dare_ties``), with ``d_i'`` the rows after their ``cuts`` (from :func:`prepare_rows`; the
    rows themselves are then left as they are, except the entries a cut's ``drop``/``keep``
    zeroes). Chunk by chunk, with peft's operations in peft's order (``weights`` become a tensor of
    ``rows``' dtype, as peft's ``torch.tensor(weights)``)."""
    if method not in METHODS:
        raise ValueError(f"unknown sparse method {method!r}")
    ws = workspace or Workspace()
    n_in, n = rows.shape
    if len(weights) != n_in:
        raise ValueError(f"{n_in} rows but {len(weights)} weights")
    w = torch.tensor([float(x) for x in weights], dtype=rows.dtype).reshape(n_in, 1)
    result = out.view(-1) if out is not None else torch.empty(n, dtype=rows.dtype)
    below = [None] * n_in
    if cuts is not None:
        for row, cut in zip(rows, cuts):
            cut.pre_(row)
        below = [c.below for c in cuts]
    thresholds = any(b is not None for b in below)
    step = max(CHUNK_ALIGN, chunk // max(1, n_in) // CHUNK_ALIGN * CHUNK_ALIGN)
    ties = method in ("ties", "dare_ties")
    for s in range(0, n, step):
        e = min(n, s + step)
        length = e - s
        block = rows[:, s:e]
        if thresholds:  # the trims' cuts, into a hot (N, length) buffer
            cut_block = ws.get("cut", (n_in, length), rows.dtype)
            for i in range(n_in):
                if below[i] is None:
                    cut_block[i].copy_(block[i])
                else:
                    torch.ops.aten.hardshrink.out(block[i], below[i], out=cut_block[i])
            block = cut_block
        weighted = torch.mul(block, w, out=ws.get("weighted", (n_in, length), rows.dtype))
        if not ties:
            _sum0(weighted, result[s:e])
            continue
        # peft calculate_majority_sign_mask: sign(d) == where(sum_i d_i >= 0, 1, -1). Here as floats
        # (comparisons written to a float buffer, ~4x cheaper than bool, and no where): e = 2 [sum
        # >= 0] - 1 (NaN: -1, as peft), agree = [d * e > 0] (exact products; zeros and NaN agree
        # with nothing, as sign(d) == e), the count a float sum of exact small integers
        total = _sum0(block, ws.get("total", (length,), rows.dtype))
        elected = torch.ge(total, 0, out=ws.get("elected", (length,), rows.dtype)).mul_(2).sub_(1)
        agree = torch.mul(block, elected, out=ws.get("agree", (n_in, length), rows.dtype))
        torch.gt(agree, 0, out=agree)
        weighted.mul_(agree)  # peft disjoint_merge: (weighted * mask).sum(0) / clamp(mask.sum(0), 1)
        mixed = _sum0(weighted, ws.get("mixed", (length,), rows.dtype))
        count = _sum0(agree, ws.get("count", (length,), rows.dtype)).clamp_(min=1.0)
        torch.div(mixed, count, out=result[s:e])
    return result
