"""`python -m bench.backup`: how fast `kmsctl backup` and `kmsctl restore` move a store
(issue 14, item 5: how long the stack is down for a backup, and whether a multi-GB store
streams in constant memory). Not part of `make bench`; alone well under a minute.

On a synthetic data dir shaped like a large stack's (one big JetStream block file per
stream, many small token objects and TPM blobs; random bytes, so nothing compresses), it
times mgmt.backup's backup, the verify pass alone (`restore --check`) and a full restore
(verify + extract), and reads the process's peak RSS after each, which must stay flat as
the store grows. Results: bench/results/backup.json and backup.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from mgmt.backup import create_backup, restore_backup, verify_backup
from mgmt.backupfile import Secret

MIB = 1024 * 1024


def _make_data_dir(root: Path, mib: int, small_files: int) -> None:
    streams = root / "nats" / "jetstream" / "jetstream" / "$G" / "streams"
    for name in ("KV_kms_keys", "KV_kms_ca", "KMS_AUDIT_BROKER", "KMS_AUDIT_CA"):
        (streams / name / "msgs").mkdir(parents=True)
    per_stream = mib // 4
    for stream in streams.iterdir():
        with (stream / "msgs" / "1.blk").open("wb") as fh:
            for _ in range(per_stream):
                fh.write(os.urandom(MIB))
    tokens = root / "softhsm" / "tokens" / "t"
    tokens.mkdir(parents=True)
    (root / "tpm0").mkdir()
    for i in range(small_files):
        where = tokens if i % 2 else root / "tpm0"
        (where / f"{i:06d}.object").write_bytes(os.urandom(600))
    (root / "secrets").mkdir(mode=0o700)
    (root / "secrets" / "hsm0.pin").write_text("1234\n")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(mib: int, small_files: int, work: Path) -> dict[str, Any]:
    data = work / "data"
    _make_data_dir(data, mib, small_files)
    secret = Secret(passphrase=b"bench passphrase")
    out = work / "kms.backup"
    rss_start = _peak_rss_mib()
    started = time.perf_counter()
    result = create_backup(data, out, secret)
    backup_s = time.perf_counter() - started
    rss_backup = _peak_rss_mib()
    started = time.perf_counter()
    verify_backup(out, secret)
    verify_s = time.perf_counter() - started
    started = time.perf_counter()
    restore_backup(out, work / "restored", secret)
    restore_s = time.perf_counter() - started
    rss_restore = _peak_rss_mib()
    size = result.size / MIB
    return {
        "store_mib": mib,
        "small_files": small_files,
        "file_mib": round(size, 1),
        "backup_s": round(backup_s, 2),
        "backup_mib_s": round(size / backup_s, 1),
        "verify_s": round(verify_s, 2),
        "verify_mib_s": round(size / verify_s, 1),
        "restore_s": round(restore_s, 2),
        "restore_mib_s": round(size / restore_s, 1),
        "peak_rss_mib_before": round(rss_start, 1),
        "peak_rss_mib_after_backup": round(rss_backup, 1),
        "peak_rss_mib_after_restore": round(rss_restore, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.backup", description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="size of the synthetic store")
    parser.add_argument("--small-files", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-backup-"))
    try:
        figures = run(args.mib, args.small_files, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures["cpus"] = os.cpu_count()
    print(json.dumps(figures, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "backup.json").write_text(json.dumps(figures, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v} |" for k, v in figures.items())
    (args.out / "backup.md").write_text(
        "# Backup and restore throughput (`python -m bench.backup`)\n\n"
        "Synthetic store of random bytes (nothing compresses); one run, the machine shared "
        "with other jobs.\n\n| figure | value |\n|---|---|\n" + rows + "\n"
    )


if __name__ == "__main__":
    main()
