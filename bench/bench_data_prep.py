"""Benchmark DOTA tiling throughput (source images/s, patches/s) of data_prep.py with 1 and 2 workers.

Uses the real DOTA samples in ../shared/data/dota (P0706 1111x1182, P1888 712x557), each linked --copies
times under new names so that the worker pool has enough images to share. Every run writes into a fresh
folder (no patch is reused), so the time covers label parsing, window/object assignment, decoding, cropping,
padding and PNG writing.

    python bench/bench_data_prep.py
    python bench/bench_data_prep.py --copies 8 --workers 1,2,4 --patch 512 --json bench_tiling.json
"""
import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: model, train, ...

import data_prep


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "dota"),
                    help="folder with images/ and labelTxt/ (the real samples)")
parser.add_argument("--copies", type=int, default=4, help="times each sample image is repeated")
parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to time")
parser.add_argument("--patch", type=int, default=1024, help="patch size")
parser.add_argument("--gap", type=int, default=200, help="gap between windows")
parser.add_argument("--repeats", type=int, default=2, help="timed runs per worker count (the best is reported)")
parser.add_argument("--json", default=None, help="also write the results (and these arguments) to this file")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# a root with --copies links of every sample image that has a label file

src = Path(args.data)
images = sorted(p for p in (src / "images").iterdir() if (src / "labelTxt" / f"{p.stem}.txt").is_file())
if not images:
    raise SystemExit(f"no labelled images in {src} (the real samples are needed)")
tmp = Path(tempfile.mkdtemp(prefix="bench_tiling_"))
root = tmp / "root"
(root / "images").mkdir(parents=True)
(root / "labelTxt").mkdir()
for k in range(args.copies):
    for p in images:
        os.symlink(p.resolve(), root / "images" / f"{p.stem}c{k}{p.suffix}")
        shutil.copy(src / "labelTxt" / f"{p.stem}.txt", root / "labelTxt" / f"{p.stem}c{k}.txt")
n_images = len(images) * args.copies

# -----------------------------------------------------------------------------
# timed runs

results = []
print(f"{n_images} images ({', '.join(p.stem for p in images)} x {args.copies}), patch {args.patch}, gap {args.gap}, "
      f"{os.cpu_count()} CPUs")
print(f"{'workers':>8} {'seconds':>8} {'images/s':>9} {'patches/s':>10}")
for workers in [int(w) for w in args.workers.split(",")]:
    best = None
    for r in range(args.repeats):
        out = tmp / f"out_w{workers}_r{r}"
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            summary = data_prep.main(["dota", "--root", str(root), "--split", "val", "--out", str(out), "--patch",
                                      str(args.patch), "--gap", str(args.gap), "--workers", str(workers)])
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
        shutil.rmtree(out)
    patches = summary["counts"]["patches written"]
    results.append({"workers": workers, "seconds": best, "images_per_s": n_images / best, "patches_per_s": patches / best,
                    "images": n_images, "patches": patches})
    print(f"{workers:>8} {best:>8.2f} {n_images / best:>9.2f} {patches / best:>10.2f}")
shutil.rmtree(tmp)
if args.json:
    Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
