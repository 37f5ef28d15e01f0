"""Decode bounds: the pixel cap, the gate on decodes at once, and memory-light deep images.

The point (issue 6, hole 5): one image must not be able to take a worker's memory, and so every
other job in flight with it. Peak memory is read from the process's own max RSS in a subprocess,
since Pillow's bitmaps are invisible to tracemalloc.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scalecap.errors import ImageTooLarge
from scalecap.images import ImageLimits, decode_gate, load_image
from tests.image_corpus import huge_png_bytes

ROOT = Path(__file__).resolve().parents[1]
SCRIPTED = "tests.scripted_vlm:ScriptedVLM"


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_default_cap_is_40_megapixels_not_pillows_179():
    assert ImageLimits().max_decode_pixels == 40_000_000
    data = huge_png_bytes(10_000, 10_000)  # 100 Mpx: under Pillow's own limit, over ours
    with pytest.raises(ImageTooLarge, match=r"10000x10000 = 100000000 pixels is over max_decode_pixels"):
        load_image(data)


def test_decodes_wait_for_a_free_slot_of_the_gate():
    data = png(Image.new("RGB", (64, 64), (1, 2, 3)))
    limits = ImageLimits(max_concurrent_decodes=2)
    gate = decode_gate(2)
    assert gate is decode_gate(2) and gate is not decode_gate(3)
    done = threading.Event()
    for _ in range(2):
        gate.acquire()  # two decodes "in progress" elsewhere in the process
    try:
        t = threading.Thread(target=lambda: (load_image(data, limits=limits), done.set()), daemon=True)
        t.start()
        assert not done.wait(0.5)  # no slot: it waits
    finally:
        gate.release()
        gate.release()
    assert done.wait(10)  # a slot freed: it decodes
    assert load_image(data, limits=ImageLimits(max_concurrent_decodes=3)).size == (64, 64)


def _peak_rss_kib(code: str) -> tuple[int, str]:
    """Run `code` in a fresh interpreter; (its peak RSS growth in KiB over the import baseline, stdout)."""
    script = "import resource, sys\nfrom scalecap.images import ImageLimits, load_image\n" + (
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        + textwrap.dedent(code)
        + "\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    return int(lines[-1]), "\n".join(lines[:-1])


@pytest.mark.parametrize("kind", ["I;16", "F"])
def test_deep_images_convert_without_float64_copies_of_every_pixel(tmp_path, kind):
    side = 4000  # 16 Mpx: a float64 copy is 128 MB, and the old route made several
    ramp = np.linspace(0, 1, side, dtype=np.float32)[None, :].repeat(side, 0)
    if kind == "I;16":
        path = tmp_path / "deep.png"
        Image.fromarray((ramp * 65535).astype(np.uint16)).save(path)
    else:
        path = tmp_path / "deep.tif"
        Image.fromarray(ramp * 1000.0 - 500.0, "F").save(path)
    grown, mode = _peak_rss_kib(
        f"""
        from PIL import Image
        with Image.open({str(path)!r}) as raw:
            print(raw.mode)
        im = load_image({str(path)!r})
        assert im.mode == "RGB" and im.width * im.height <= ImageLimits().max_pixels
        px = [im.getpixel((x, 0))[0] for x in (0, im.width // 2, im.width - 1)]
        assert px[0] <= 2 and 120 <= px[1] <= 135 and px[2] >= 253, px
        """
    )
    decoded_mib = side * side * (2 if mode.startswith("I;16") else 4) / 2**20
    file_mib = path.stat().st_size / 2**20
    # The file's bytes, the decoded bitmap (32 or 64 MiB), the 8-bit result (16) and a few strips:
    # measured 59 MiB (16-bit PNG) and 177 MiB (float TIFF), where the whole-image uint32 and
    # float64 routes took 186 MiB and about 550 MiB on the same machine.
    assert grown / 1024 < file_mib + decoded_mib + 96, (mode, grown)


def test_a_run_with_a_decompression_bomb_fails_that_image_only_and_stays_small(tmp_path):
    """`scalecap caption` over good images and two PNG bombs (20000² and 10000² pixels)."""
    good = [tmp_path / "red.png", tmp_path / "blue.png"]
    Image.new("RGB", (320, 240), (220, 30, 30)).save(good[0])
    Image.new("RGB", (320, 240), (30, 50, 220)).save(good[1])
    bombs = [tmp_path / "bomb20k.png", tmp_path / "bomb10k.png"]
    bombs[0].write_bytes(huge_png_bytes(20_000, 20_000))
    bombs[1].write_bytes(huge_png_bytes(10_000, 10_000))

    def run(images: list[Path], name: str) -> tuple[list[dict], int]:
        manifest = tmp_path / f"{name}.jsonl"
        manifest.write_text("".join(json.dumps({"image": str(p), "name": p.stem}) + "\n" for p in images))
        out = tmp_path / f"{name}.out.jsonl"
        argv = ["scalecap", "caption", str(manifest), "-o", str(out), "--backend", SCRIPTED,
                "--model", "scripted", "--max-questions", "1", "--no-progress"]  # fmt: skip
        script = (
            "import resource, sys\nfrom scalecap_command import main\n"
            f"sys.argv = {argv!r}\nrc = main(sys.argv[1:])\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)\n"
        )
        r = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert r.returncode == 0, r.stderr
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        return rows, int(r.stdout.strip().splitlines()[-1])

    rows, peak = run([good[0], bombs[0], good[1], bombs[1]], "mixed")
    baseline_rows, baseline = run(good, "good")
    by_name = {r["name"]: r["scalecap_record"] for r in rows}
    assert len(rows) == 4
    for p in good:
        assert by_name[p.stem].get("final_caption"), by_name[p.stem]
    for p in bombs:
        err = by_name[p.stem]["error"]
        assert (err["stage"], err["type"]) == ("load", "ImageTooLarge"), err
        assert str(p) in err["message"] and "max_decode_pixels" in err["message"]
    assert all("final_caption" in r["scalecap_record"] for r in baseline_rows)
    # Decoding the 10000² bomb alone would take 100 MiB (1-bit mode holds a byte a pixel) and its
    # RGB form 300 MiB more; refused from the header, the run costs what a run without it does.
    assert (peak - baseline) / 1024 < 50, (peak, baseline)
