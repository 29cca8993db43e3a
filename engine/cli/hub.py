"""CLI subcommand for hub ids: download (into the Hugging Face cache, for later offline use)."""

from __future__ import annotations

import sys


def cmd_download(args) -> int:
    from ..model.hub import snapshot

    snap = snapshot(args.model, args.revision, progress=not args.quiet)
    if not args.quiet:
        print(f"{snap.repo_id} {snap.revision} (commit {snap.commit}) is in the cache", file=sys.stderr)
    print(snap.folder)
    return 0


def add_commands(sub) -> None:
    d = sub.add_parser(
        "download",
        help="fetch a hub model's pipeline files into the Hugging Face cache (HF_HOME), e.g. for offline use",
        parents=[sub.common],
    )
    d.add_argument("model", help="hub id, e.g. fal/AuraFlow-v0.3")
    d.add_argument("--revision", help="branch, tag or commit hash (default: main)")
    d.set_defaults(fn=cmd_download)
