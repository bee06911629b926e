"""Choose the FAISS index for a collection's size, dimension and memory budget (pure functions)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from indexer.errors import InputError

# Below this many vectors exact search is chosen: it answers one query in about 1 ms here,
# a 1000-query batch at >= 700 queries/s, with perfect recall and no training (ARCHITECTURE.md
# "Index choice" has the measurements behind every constant in this module).
EXACT_BELOW = 100_000
TRAIN_PER_LIST = 50  # k-means training vectors per inverted list (FAISS warns below 39)
HNSW_QUANTIZER_LISTS = 16_384  # from here on vectors find their lists through an HNSW graph
HNSW_M = 32
INDEX_TYPES = ("auto", "flat", "ivf", "ivfsq", "hnsw")
ID_BYTES = 8  # an int64 id per vector, stored in the inverted lists or the id map
HNSW_LINK_BYTES = 4
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class IndexChoice:
    """What to build: a FAISS factory string and how it will be trained, stored and tuned."""

    kind: str  # flat | ivf | ivfsq | hnsw | factory
    factory: str  # the FAISS index_factory string
    nlist: int | None  # inverted lists (IVF kinds)
    on_disk: bool  # inverted lists in an mmapped file beside the index
    memory_bytes: int  # estimated resident size of the index (0: unknown, a factory string)
    reason: str


def parse_size(text: str, flag: str = "--max-index-memory") -> int:
    """'512M', '16G', '1.5GiB', '1000000' -> bytes; InputError otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise InputError(f"{flag} {text!r} is not a size: write it like 512M, 16G or 2T")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** "_kmgt".index(unit or "_"))


def check_index_type(name: str) -> None:
    """InputError unless name is one of INDEX_TYPES or looks like a FAISS factory string."""
    if name not in INDEX_TYPES:
        _factory(0, name)


def parse_index_flags(
    index_type: str | None, max_memory: str | None
) -> tuple[str | None, int | None]:
    """--index-type checked and --max-index-memory in bytes (None stays None: not given)."""
    if index_type is not None:
        check_index_type(index_type)
    return index_type, None if max_memory is None else parse_size(max_memory)


def choose_index(n: int, dim: int, max_memory: int, requested: str = "auto") -> IndexChoice:
    """The index for n vectors of dim floats within max_memory bytes, as requested."""
    if requested == "auto":
        return _auto(n, dim, max_memory)
    if requested == "flat":
        return _flat(n, dim, "asked for")
    if requested in ("ivf", "ivfsq"):
        return _ivf(n, dim, max_memory, sq8=requested == "ivfsq", why="asked for")
    if requested == "hnsw":
        return _hnsw(n, dim)
    return _factory(n, requested)


def _auto(n: int, dim: int, max_memory: int) -> IndexChoice:
    flat = _flat(n, dim, f"exact: fewer than {EXACT_BELOW:,} vectors")
    if n < EXACT_BELOW and flat.memory_bytes <= max_memory:
        return flat
    why = f"{n:,} vectors" if n >= EXACT_BELOW else "exact search would not fit the budget"
    ivf = _ivf(n, dim, max_memory, sq8=False, why=why, on_disk=False)
    if ivf.memory_bytes <= max_memory:
        return ivf
    sq8 = _ivf(n, dim, max_memory, sq8=True, why=f"{why}; floats over budget", on_disk=False)
    if sq8.memory_bytes <= max_memory:
        return sq8
    why = f"{why}; over budget: lists on disk"
    return _ivf(n, dim, max_memory, sq8=False, why=why, on_disk=True)


def _flat(n: int, dim: int, why: str) -> IndexChoice:
    return IndexChoice("flat", "IDMap,Flat", None, False, n * (4 * dim + ID_BYTES), why)


def nlist_for(n: int) -> int:
    """Inverted lists: the power of two nearest 4*sqrt(n), at most n / TRAIN_PER_LIST, >= 1."""
    target = 4 * math.sqrt(max(n, 1))
    nearest = 2 ** round(math.log2(target))
    cap = max(1, n // TRAIN_PER_LIST)
    return max(1, min(nearest, 2 ** int(math.log2(cap))))


def _ivf(
    n: int, dim: int, max_memory: int, *, sq8: bool, why: str, on_disk: bool | None = None
) -> IndexChoice:
    """IVF over nlist_for(n) lists; on disk when asked, or (on_disk None) when over budget."""
    nlist = nlist_for(n)
    centroids = nlist * dim * 4
    in_memory = centroids + n * ((dim if sq8 else 4 * dim) + ID_BYTES)
    if on_disk is None:
        on_disk = in_memory > max_memory
    memory = centroids if on_disk else in_memory
    quantizer = f"_HNSW{HNSW_M}" if nlist >= HNSW_QUANTIZER_LISTS else ""
    factory = f"IVF{nlist}{quantizer},{'SQ8' if sq8 else 'Flat'}"
    return IndexChoice("ivfsq" if sq8 else "ivf", factory, nlist, on_disk, memory, why)


def _hnsw(n: int, dim: int) -> IndexChoice:
    per_vector = 4 * dim + ID_BYTES + int(2 * HNSW_M * HNSW_LINK_BYTES * 1.05)
    factory = f"IDMap,HNSW{HNSW_M},Flat"
    return IndexChoice("hnsw", factory, None, False, n * per_vector, "asked for")


def _factory(n: int, factory: str) -> IndexChoice:
    if not re.match(r"^[A-Za-z0-9_,.()]+$", factory) or not any(c.isupper() for c in factory):
        raise InputError(
            f"--index-type {factory!r} is neither one of {', '.join(INDEX_TYPES)} nor a FAISS "
            "factory string (like IVF1024,SQ8 or HNSW32): pick one of those"
        )
    ivf = re.search(r"IVF(\d+)", factory)
    nlist = int(ivf.group(1)) if ivf else None
    return IndexChoice("factory", factory, nlist, False, 0, "asked for")


def train_size(n: int, nlist: int | None) -> int:
    """Vectors sampled to train: TRAIN_PER_LIST per list, at most n."""
    return min(n, (nlist or 1) * TRAIN_PER_LIST)
