"""numpy arrays through real pools of Python workers, on both lanes (issue 16's tests).

The caller sends an array's buffer with its dtype and shape in its own JSON fields; the handler
rebuilds it with ``numpy.frombuffer`` on the read-only ``memoryview`` it gets (zero-copy: for a
value above ``shm_threshold_bytes`` the view maps the segment itself), computes, and returns an
array, which comes back as ``bytes``. Both below and above the threshold, in both directions.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy
import pytest
from snakepit_python.plugin import python_adapter

from snakepit_core import Pool
from snakepit_core.shm import RUN_FILE, get_shared_memory

WORKER = r"""
import os

import numpy

from snakepit_python import command, run


def array_of(args):
    view = args["data"]
    assert isinstance(view, memoryview) and view.readonly, type(view)
    return numpy.frombuffer(view, dtype=args["dtype"]).reshape(args["shape"])


@command("scale")
def scale(args):
    scaled = array_of(args) * args["by"]
    return {"data": scaled, "dtype": str(scaled.dtype), "shape": list(scaled.shape)}


@command("where")
def where(args):
    '''Where the handler's array lives: in a mapping of a segment, or in the frame.'''
    view = args["data"]
    array = array_of(args)
    mapped = [line for line in open("/proc/self/maps") if os.environ["SNAKEPIT_SHM_DIR"] in line]
    return {
        "zero_copy": numpy.shares_memory(array, numpy.frombuffer(view, dtype=numpy.uint8)),
        "writeable": bool(array.flags.writeable),
        "segments_mapped": len(mapped),
    }


@command("transpose")
def transpose(args):
    return {"data": numpy.ascontiguousarray(array_of(args).T)}


run()
"""

THRESHOLD = 64 * 1024


@pytest.fixture
def adapter(tmp_path: Path):
    script = tmp_path / "numpy_worker.py"
    script.write_text(WORKER)
    return python_adapter("numpy-worker", script)


def send(array: numpy.ndarray) -> dict[str, object]:
    return {"data": array, "dtype": str(array.dtype), "shape": list(array.shape)}


def received(answer: dict[str, object]) -> numpy.ndarray:
    data = answer["data"]
    assert type(data) is bytes
    return numpy.frombuffer(data, dtype=answer["dtype"]).reshape(answer["shape"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "array",
    [
        numpy.arange(10, dtype=numpy.float32),  # 40 bytes: inline
        numpy.linspace(0, 1, 1 << 20, dtype=numpy.float32),  # 4 MiB: shared memory
        numpy.arange(-5000, 5000, dtype=numpy.int64).reshape(100, 100),  # 80 KB, 2-D
        numpy.random.default_rng(7).standard_normal((512, 300)),  # float64, 2-D, 1.2 MB
        numpy.zeros((0, 3), dtype=numpy.int64),  # empty
    ],
    ids=["float32-small", "float32-4MiB", "int64-2d", "float64-2d", "empty"],
)
async def test_arrays_round_trip_with_dtype_and_shape(adapter, array: numpy.ndarray) -> None:
    async with Pool(adapter, pool_size=1, shm_threshold_bytes=THRESHOLD) as pool:
        answer = await pool.execute("scale", {**send(array), "by": 3})
    back = received(answer)
    assert back.dtype == array.dtype and back.shape == array.shape
    numpy.testing.assert_array_equal(back, array * 3)


async def test_a_handler_maps_a_big_array_without_copying_it(adapter) -> None:
    big = numpy.ones(1 << 20, dtype=numpy.float32)  # 4 MiB
    small = numpy.ones(16, dtype=numpy.float32)
    async with Pool(adapter, pool_size=1, shm_threshold_bytes=THRESHOLD) as pool:
        mapped = await pool.execute("where", send(big))
        inline = await pool.execute("where", send(small))
    assert mapped == {"zero_copy": True, "writeable": False, "segments_mapped": 1}
    assert inline["zero_copy"] is True and inline["writeable"] is False
    assert inline["segments_mapped"] == 0


async def test_arrays_that_are_not_contiguous_are_refused_and_copies_are_not(adapter) -> None:
    matrix = numpy.arange(12, dtype=numpy.int64).reshape(3, 4)
    async with Pool(adapter, pool_size=1, shm_threshold_bytes=THRESHOLD) as pool:
        with pytest.raises(Exception, match=r"args\.data is a buffer that is not contiguous"):
            await pool.execute("scale", {**send(matrix.T), "by": 1})
        answer = await pool.execute("transpose", send(matrix))
    numpy.testing.assert_array_equal(
        numpy.frombuffer(answer["data"], dtype=numpy.int64).reshape(4, 3), matrix.T
    )


async def test_no_segment_outlives_a_thousand_array_round_trips(adapter) -> None:
    shared = get_shared_memory()
    assert shared is not None
    arrays = [numpy.full(THRESHOLD // 8 * (1 + i % 3), i, dtype=numpy.int64) for i in range(12)]
    options = {"pool_size": 2, "worker_concurrency": 4, "shm_threshold_bytes": THRESHOLD}
    async with Pool(adapter, **options) as pool:
        for round_ in range(1000 // len(arrays)):
            answers = await asyncio.gather(
                *(pool.execute("scale", {**send(a), "by": 2}) for a in arrays)
            )
            for array, answer in zip(arrays, answers, strict=True):
                assert received(answer)[0] == array[0] * 2, round_
    assert set(os.listdir(shared.directory)) == {RUN_FILE}
