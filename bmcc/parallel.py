"""`ordered_map`: a function over many items on a thread pool, results in input order.

Used wherever files are read or decoded in bulk (preparing the dataset, predicting, explaining):
JPEG decoding and file reads release the GIL, so threads keep the cores busy, and only `window`
items are in flight, so memory stays bounded however many items there are.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
from collections.abc import Callable, Iterable, Iterator


def ordered_map[T, R](fn: Callable[[T], R], items: Iterable[T], *, num_threads: int,
                      window: int, thread_name_prefix: str = "bmcc") -> Iterator[R]:
  """Yields fn(item) for each item in order, computing up to `window` items ahead on threads.

  An exception raised by `fn` is raised when its result is reached; catch inside `fn` to carry
  per-item failures as values instead.
  """
  if window < 1 or num_threads < 1:
    raise ValueError(f"window={window} and num_threads={num_threads} must be at least 1.")
  todo = iter(items)
  with concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix) as pool:
    pending = collections.deque(pool.submit(fn, item) for item in itertools.islice(todo, window))
    while pending:
      result = pending.popleft().result()
      following = next(todo, _END)
      if following is not _END:
        pending.append(pool.submit(fn, following))
      yield result


_END = object()
