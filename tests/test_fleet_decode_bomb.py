"""A worker fed PNG bombs among good images: the bombs fail alone, the worker's memory stays flat.

Issue 6, hole 5: with Pillow's default cap a 20,000 x 20,000 PNG (50 KB on disk) is a memory
spike that can kill a worker and charge an attempt to every job in flight with it. Real
redis-server and a real `scalecap worker` process; its peak RSS is read from /proc (VmHWM).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fleet_support import Fleet, make_images
from tests.image_corpus import huge_png_bytes

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_png_bombs_fail_alone_and_the_worker_stays_small(redis_url, tmp_path):
    fleet = Fleet(redis_url, tmp_path)
    try:
        worker = fleet.scripted(concurrency=4)
        client = fleet.client()
        warm = make_images(tmp_path / "warm", ["yellow", "white"])
        client.wait(client.submit([str(p) for p in warm], model="scripted").batch_id, timeout=60)
        before = _vm_hwm_kib(worker.pid)

        good = make_images(tmp_path / "imgs", ["red", "green", "blue"])
        bombs = [tmp_path / "bomb20k.png", tmp_path / "bomb10k.png"]
        bombs[0].write_bytes(huge_png_bytes(20_000, 20_000))  # over Pillow's own limit too
        bombs[1].write_bytes(huge_png_bytes(10_000, 10_000))  # 100 Mpx: only our 40 Mpx cap stops it
        refs = [str(good[0]), str(bombs[0]), str(good[1]), str(bombs[1]), str(good[2])]
        sub = client.submit(refs, model="scripted")
        st = client.wait(sub.batch_id, timeout=60)
        assert (st["done"], st["failed"], st["state"]) == (3, 2, "finished")

        records = {r["image"]: r["scalecap_record"] for r in client.results(sub.batch_id)}
        for p in good:
            assert records[str(p)].get("final_caption"), records[str(p)]
        for p in bombs:
            err = records[str(p)]["error"]
            assert (err["stage"], err["type"]) == ("load", "ImageTooLarge"), err
            assert "max_decode_pixels" in err["message"]
        assert worker.alive
        grown_mib = (_vm_hwm_kib(worker.pid) - before) / 1024
        # Decoding the 10000² bomb would take 100 MiB in mode "1" and 300 MiB more as RGB.
        assert grown_mib < 60, grown_mib
    finally:
        fleet.close()
