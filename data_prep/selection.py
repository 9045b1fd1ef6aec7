"""Which rows of a dataset are taken: the first ``k`` or a seeded uniform sample of ``k``, and how a section's total
is shared between its datasets by weight. Pure functions over iterables; the data stage calls them per dataset.

A sample is drawn in one pass and in memory for ``k`` rows only (reservoir sampling, Algorithm R), so a dataset
streamed from the hub or a file larger than memory can be sampled; the rows keep their order of arrival. The same
``key`` (the run's seed and the dataset's place in the recipe) gives the same rows.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def take_head(items: Iterable[T], k: int) -> list[T]:
    """The first ``k`` items; nothing after the ``k``-th is read."""
    out: list[T] = []
    if k <= 0:
        return out
    for item in items:
        out.append(item)
        if len(out) >= k:
            break
    return out


def take_sample(items: Iterable[T], k: int, key: str) -> list[T]:
    """A uniform random sample of ``k`` items (all of them when there are fewer), in their order of arrival, seeded by
    ``key``. Every item is read; at most ``k`` are held."""
    rng = random.Random(key)
    held: list[tuple[int, T]] = []
    for i, item in enumerate(items):
        if i < k:
            held.append((i, item))
        else:
            j = rng.randrange(i + 1)
            if j < k:
                held[j] = (i, item)
    held.sort(key=lambda p: p[0])
    return [item for _, item in held]


def take(items: Iterable[T], k: int | None, how: str, key: str) -> Iterable[T]:
    """``items`` limited to ``k`` by ``how`` (``head`` or ``random``); unlimited when ``k`` is None (then lazily)."""
    if k is None:
        return items
    return take_head(items, k) if how == "head" else take_sample(items, k, key)


class ShortOfRows(ValueError):
    """A dataset has fewer rows than its weight's share of the section total."""

    def __init__(self, index: int, have: int, need: int):
        super().__init__(f"dataset {index} has {have} rows, its weight asks for {need}")
        self.index, self.have, self.need = index, have, need


def quotas(total: int, sizes: list[int], weights: list[float] | None) -> list[int]:
    """Rows to take from each dataset so that they sum to ``total``: in the ratio of ``weights``, or of ``sizes``
    when there are none (every row when the sizes sum to no more than ``total``). Shares are rounded by largest
    remainder, so they sum exactly. A weighted dataset smaller than its share raises ``ShortOfRows``."""
    if weights is None:
        n = sum(sizes)
        if n <= total:
            return list(sizes)
        weights = [float(s) for s in sizes]
    w = sum(weights)
    exact = [total * x / w for x in weights]
    out = [int(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    for i, (q, have) in enumerate(zip(out, sizes)):
        if q > have:
            raise ShortOfRows(i, have, q)
    return out


def counted(items: Iterable[T], counter: dict, name: str) -> Iterator[T]:
    """``items``, counting in ``counter[name]`` how many have passed (also when the reader stops early)."""
    for item in items:
        counter[name] += 1
        yield item
