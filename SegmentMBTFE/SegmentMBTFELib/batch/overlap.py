"""Three stages of a batch at once: read the next case and write the last one while the network works.

A case goes through reading + preprocessing, the network, and export + writing. Run one after the other,
the network (the GPU, or torch's threads) idles while files are read and written; run as a pipeline,
reading case i+1 and writing case i-1 happen in two threads while the caller's thread runs the network on
case i. numpy, scipy, SimpleITK and torch release the GIL in their heavy work, so the threads overlap for
real. This is only for a process of its own (the command line, the Slicer module's worker), never
Slicer's, whose main thread holds the GIL.

Memory stays bounded: at most one case ahead and one behind; and a case for which `room` says there is
not enough memory for three cases at once runs with nothing beside it. The stages are the caller's; each
stage's result depends only on its own case, so the results are those of the sequential run.
"""
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

Item, Prepared, Computed, Done = TypeVar("Item"), TypeVar("Prepared"), TypeVar("Computed"), TypeVar("Done")


def run_in_stages(items: Sequence[Item], prepare: Callable[[Item], Prepared], compute: Callable[[Prepared], Computed],
                  finish: Callable[[Computed], Done], on_done: Callable[[Done], None],
                  room: Callable[[Prepared], bool] = lambda prepared: True, overlap: bool = True,
                  stop_ahead: Callable[[], None] = lambda: None) -> None:
    """prepare -> compute -> finish for each item, on_done(result) in the items' order.

    compute runs in the calling thread (Ctrl+C reaches it); with `overlap`, prepare runs one item ahead and
    finish one item behind in threads of their own, unless room(prepared) is False for the item at hand.
    When compute (or anything) raises, `stop_ahead()` is called so the case read ahead can stop at its
    next cancel point, and the case behind, whose network work is done, is still finished and reported."""
    if not overlap:
        for item in items:
            on_done(finish(compute(prepare(item))))
        return
    with ThreadPoolExecutor(1, "read-ahead") as reader, ThreadPoolExecutor(1, "write-behind") as writer:
        ahead, behind = None, None
        try:
            for index, item in enumerate(items):
                prepared = ahead.result() if ahead is not None else prepare(item)
                ahead = None
                side_by_side = room(prepared)
                if not side_by_side:  # this case alone: the last one written first, nothing read ahead
                    behind = _report(behind, on_done)
                elif index + 1 < len(items):
                    ahead = reader.submit(prepare, items[index + 1])
                computed = compute(prepared)
                behind = _report(behind, on_done)
                if side_by_side:
                    behind = writer.submit(finish, computed)
                else:
                    on_done(finish(computed))
            _report(behind, on_done)
            behind = None
        finally:
            if ahead is not None:
                stop_ahead()
                ahead.cancel()
                _wait_quietly(ahead)
            if behind is not None:  # stopped part-way: the case behind is finished and reported all the same
                _wait_quietly(behind, on_done)


def _report(future: Future, on_done) -> None:
    """on_done(the stage's result), once per future whatever on_done raises."""
    if future is not None and not getattr(future, "reported", False):
        result = future.result()
        future.reported = True
        on_done(result)
    return None


def _wait_quietly(future: Future, on_done=None) -> None:
    """Wait for a stage while leaving with another exception; what the stage raises (Cancelled, most likely)
    is of no use now. on_done gets its result if it has one."""
    try:
        if on_done is not None:
            _report(future, on_done)
        else:
            future.result()
    except BaseException:  # noqa: BLE001 - the caller is already leaving with its own exception
        return
