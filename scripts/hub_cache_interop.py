#!/usr/bin/env python3
"""The Python side of tests/hub.rs's cache interoperability tests, with the real
huggingface_hub (pinned in scripts/bootstrap):

  write  downloads FILES of REPO at REVISION with `hf_hub_download` from HF_ENDPOINT (the
         test's local hub) into the cache HF_HUB_CACHE, so that huggingface_hub lays it out;
  read   loads FILES with `hf_hub_download(..., local_files_only=True)`, the snapshot with
         `snapshot_download(local_files_only=True)` and scans the cache with `scan_cache_dir`
         (run it with HF_HUB_OFFLINE=1), and prints one JSON line: each file's path and
         sha256, the snapshot folder, and what the scan found.

Usage: hub_cache_interop.py {write|read} {model|dataset} REPO REVISION FILE...
"""

import hashlib
import json
import os
import sys

import huggingface_hub
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download


def main() -> None:
    mode, repo_type, repo, revision, *files = sys.argv[1:]
    cache = os.environ["HF_HUB_CACHE"]
    if mode == "write":
        for f in files:
            hf_hub_download(repo, f, repo_type=repo_type, revision=revision, cache_dir=cache)
        return
    assert mode == "read", mode
    out = {"version": huggingface_hub.__version__, "files": {}}
    for f in files:
        path = hf_hub_download(repo, f, repo_type=repo_type, revision=revision, cache_dir=cache, local_files_only=True)
        with open(path, "rb") as fh:
            out["files"][f] = {"path": path, "sha256": hashlib.sha256(fh.read()).hexdigest()}
    out["snapshot"] = snapshot_download(
        repo, repo_type=repo_type, revision=revision, cache_dir=cache, local_files_only=True
    )
    info = scan_cache_dir(cache)
    out["warnings"] = [str(w) for w in info.warnings]
    out["repos"] = [
        {
            "repo_id": r.repo_id,
            "repo_type": r.repo_type,
            "nb_files": r.nb_files,
            "refs": sorted(r.refs),
            "revisions": sorted(v.commit_hash for v in r.revisions),
        }
        for r in sorted(info.repos, key=lambda r: r.repo_id)
    ]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
