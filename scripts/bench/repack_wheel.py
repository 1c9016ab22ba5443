#!/usr/bin/env python3
"""Repack a wheel smaller: drop files by glob, keep only some top-level folders, recompress.

    repack_wheel.py IN.whl OUT_DIR [--drop GLOB]... [--keep-top NAME]... [--lzma]

--drop GLOB     drop members whose path matches GLOB (fnmatch, '*' crosses '/').
--keep-top NAME keep only these top-level entries (plus the .dist-info); repeatable.
--lzma          compress with LZMA (zipfile/pip read it; about 25% smaller than deflate on .so files).

The RECORD file is rewritten to list only the kept files, so pip installs the result cleanly.
The output keeps the input's file name (pip reads the tags from it).
"""
import argparse
import fnmatch
import os
import sys
import zipfile


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel")
    ap.add_argument("out_dir")
    ap.add_argument("--drop", action="append", default=[])
    ap.add_argument("--keep-top", action="append", default=[])
    ap.add_argument("--lzma", action="store_true")
    a = ap.parse_args()

    src = zipfile.ZipFile(a.wheel)
    names = [i.filename for i in src.infolist()]
    dist_info = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    if len(dist_info) != 1:
        sys.exit(f"{a.wheel}: expected one .dist-info folder, found {sorted(dist_info)}")
    dist_info = dist_info.pop()
    record = f"{dist_info}/RECORD"

    def keep(n):
        top = n.split("/")[0]
        if top == dist_info:
            return True
        if a.keep_top and top not in a.keep_top:
            return False
        return not any(fnmatch.fnmatch(n, g) for g in a.drop)

    kept = [n for n in names if keep(n)]
    dropped = len(names) - len(kept)
    os.makedirs(a.out_dir, exist_ok=True)
    out = os.path.join(a.out_dir, os.path.basename(a.wheel))
    tmp = out + ".tmp"
    method = zipfile.ZIP_LZMA if a.lzma else zipfile.ZIP_DEFLATED
    kept_set = set(kept)
    with zipfile.ZipFile(tmp, "w", compression=method, compresslevel=None if a.lzma else 9) as dst:
        for n in kept:
            if n.endswith("/"):
                continue
            data = src.read(n)
            if n == record:
                lines = data.decode().splitlines()
                lines = [l for l in lines if l.split(",")[0] in kept_set]
                data = ("\n".join(lines) + "\n").encode()
            info = src.getinfo(n)
            zi = zipfile.ZipInfo(n, date_time=info.date_time)
            zi.external_attr = info.external_attr
            zi.compress_type = method
            dst.writestr(zi, data)
    os.replace(tmp, out)
    before, after = os.path.getsize(a.wheel), os.path.getsize(out)
    print(f"repacked {os.path.basename(a.wheel)}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB ({dropped} members dropped)")


if __name__ == "__main__":
    main()
