"""What a backup of a `kmsctl up` data dir holds, how it is taken consistently, and how
it is put back into a new data dir.

Consistency: stop the world. A backup is taken only while no `kmsctl up` runs on the
data dir: it takes the same lock `kmsctl up` takes (mgmt.stacklock) and holds it until
the file is written, and it refuses while processes a killed supervisor left behind still
run there. With nats-server, the token's service and the TPM's service all stopped, the
JetStream store, the SoftHSM token directory, the TPM blobs and the secrets are one
instant's state: the key registry names exactly the token objects and blobs that exist,
the CA's serial and CRL-number state matches its certificate records, and every audit
stream ends on an entry whose hash the next one will chain to. A copy taken while the
stack runs could catch the token between a key's creation and its registry record, or
one audit stream ahead of another, and nothing could tell. The price is that the stack is
down for the copy (seconds for a small store; `kmsctl backup` prints its progress).

What goes in: everything under the data dir except `run/` (lock, state, pids), `logs/`
and `swtpm/`. `swtpm/` *is* the development TPM (its seeds); copying it would make a
second TPM with the same seeds, which a real TPM never allows, so it stays out like a
real TPM would. TPM key blobs are wrapped by that TPM's storage key: restored elsewhere
they are kept (their registry records, public keys and audit history stay) but the TPM
refuses to load them (`tpm.blob_rejected` on use); on the same TPM they work (a real
TPM's board, or `restore --force` over a data dir, which keeps that dir's `swtpm/`). `config/`
and `softhsm/softhsm2.conf` hold absolute paths, and `kmsctl up` rewrites both at each
start, so a restore into another path needs nothing else.

Each backup and restore leaves one JSON line (edgekms.logs' format) in the data dir's
`logs/backup.log`: they run with the stack stopped, so the audit chain cannot take an
entry, and the line says when, from where and to where.

Restore never writes a byte before the whole file has been authenticated: a first pass
decrypts and checks every chunk and the archive's structure, the second extracts into a
hidden directory beside the target that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import shutil
import socket
import stat
import tarfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from edgekms.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from mgmt import stacklock
from mgmt.backupfile import BackupReader, BackupWriter, Secret

MANIFEST = "EDGEKMS-BACKUP.json"
# Top-level entries of a data dir that are not state (or, swtpm, not ours to copy).
EXCLUDED = frozenset({"run", "logs", "swtpm"})
# What `restore --force` keeps of the data dir it replaces.
KEPT_ON_REPLACE = ("swtpm", "logs")
# What marks a directory as a `kmsctl up` data dir (either is enough).
STATE_MARKERS = ("nats/jetstream", "secrets")
TPM_RECORD_SUFFIX = ".key"
TPM_WARNING = (
    "TPM keys are restorable only on the TPM they were made on: on any other TPM"
    " (another machine, a fresh swtpm) they stay listed but cannot sign"
    " (tpm.blob_rejected); every other key, the CA and the audit chain work."
)

Progress = Callable[[int, int], None]


@dataclass
class Manifest:
    """The first member of every backup: what it holds, for `restore` to report."""

    created: str
    hostname: str
    source: str
    files: int = 0
    bytes: int = 0
    streams: list[str] = field(default_factory=list)
    tpm_keys: dict[str, int] = field(default_factory=dict)
    version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "hostname": self.hostname,
            "source": self.source,
            "files": self.files,
            "bytes": self.bytes,
            "streams": self.streams,
            "buckets": [s.removeprefix("KV_") for s in self.streams if s.startswith("KV_")],
            "audit_streams": [s for s in self.streams if s.startswith("KMS_AUDIT")],
            "tpm_keys": self.tpm_keys,
            "edgekms_version": self.version,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            return cls(
                created=str(data["created"]),
                hostname=str(data.get("hostname", "")),
                source=str(data.get("source", "")),
                files=int(data.get("files", 0)),
                bytes=int(data.get("bytes", 0)),
                streams=[str(s) for s in data.get("streams", [])],
                tpm_keys={str(k): int(v) for k, v in dict(data.get("tpm_keys", {})).items()},
                version=str(data.get("edgekms_version", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(
                "backup.corrupt", f"the backup's manifest is damaged: {exc}"
            ) from None


LOG_NAME = "backup.log"


def log_event(data_dir: Path, message: str, **values: Any) -> None:
    """Append one structured line to <data-dir>/logs/backup.log; a full or read-only log
    directory costs the line, never the backup or restore that is already done."""
    from edgekms.logs import JSONFormatter

    record = logging.LogRecord("mgmt.backup", logging.INFO, __file__, 0, message, None, None)
    record.fields = values
    line = JSONFormatter("kmsctl").format(record) + "\n"
    logs = data_dir / "logs"
    with contextlib.suppress(OSError):
        logs.mkdir(mode=0o700, exist_ok=True)
        with (logs / LOG_NAME).open("a", encoding="utf-8") as fh:
            fh.write(line)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgekms")
    except PackageNotFoundError:
        return ""


def is_data_dir(path: Path) -> bool:
    return any((path / marker).is_dir() for marker in STATE_MARKERS)


def _files(root: Path) -> Iterator[Path]:
    """Directories and regular files to copy, in a stable order (sockets, FIFOs and
    symlinks are not state and are skipped)."""
    for top in sorted(root.iterdir()):
        if top.name in EXCLUDED:
            continue
        stack = [top]
        while stack:
            path = stack.pop()
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                yield path
                stack.extend(sorted(path.iterdir(), reverse=True))
            elif stat.S_ISREG(mode):
                yield path


def _streams(root: Path) -> list[str]:
    found: set[str] = set()
    for streams in (root / "nats" / "jetstream" / "jetstream").glob("*/streams"):
        found.update(p.name for p in streams.iterdir() if p.is_dir())
    return sorted(found)


def _tpm_state_dirs(root: Path) -> dict[str, Path]:
    """provider -> state_dir of each TPM crypto service `kmsctl up` configured here."""
    found: dict[str, Path] = {}
    for conf in sorted((root / "config").glob("crypto-*.toml")):
        with contextlib.suppress(OSError, tomllib.TOMLDecodeError):
            data = tomllib.loads(conf.read_text())
            section = data.get("tpm2")
            if isinstance(section, dict) and "state_dir" in section:
                provider = str(data.get("provider_id", conf.stem.removeprefix("crypto-")))
                state = Path(str(section["state_dir"]))
                # The configured path is absolute at the source; the blobs are under it.
                found[provider] = state if state.is_absolute() else root / state
    return found


def _tpm_keys(root: Path) -> dict[str, int]:
    counts = {}
    for provider, state in _tpm_state_dirs(root).items():
        with contextlib.suppress(OSError):
            counts[provider] = sum(1 for _ in state.glob("*" + TPM_RECORD_SUFFIX))
    return counts


def _lock_stopped_stack(
    data_dir: Path, reason: str = "backup.stack_running"
) -> stacklock.StackLock:
    """The data dir's stack lock, proving no `kmsctl up` runs and none can start while
    we copy; FailedPrecondition `backup.stack_running` otherwise."""
    try:
        lock = stacklock.acquire(data_dir / "run")
    except FailedPrecondition as exc:
        pid = exc.details.get("pid", "")
        raise FailedPrecondition(
            reason,
            f"`kmsctl up` (pid {pid or '?'}) runs on {data_dir}: a backup is taken with the"
            f" stack stopped, so that the store, the token and the blobs are one instant's"
            f" state. Stop it (kill -INT {pid or 'PID'}), back up, start it again",
            {"pid": pid, "data_dir": str(data_dir)},
        ) from None
    leftovers = stacklock.leftover_pids(data_dir)
    if leftovers:
        lock.release()
        raise FailedPrecondition(
            reason,
            f"processes of a killed `kmsctl up` still run on {data_dir} (pids"
            f" {', '.join(map(str, leftovers))}): `kmsctl up` ends them when it starts;"
            " start and stop it once, then back up",
            {"pids": ",".join(map(str, leftovers)), "data_dir": str(data_dir)},
        )
    return lock


@dataclass
class BackupResult:
    out: Path
    size: int
    manifest: Manifest


def _partial_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial-{os.getpid()}")


def check_out(out: Path, force: bool) -> None:
    """Refuse an --out that exists (without --force) or whose directory cannot take the
    file, before the stack is locked or anything is read."""
    if out.is_dir():
        raise InvalidArgument("backup.out_is_dir", f"{out} is a directory; name a file")
    if out.exists() and not force:
        raise AlreadyExists(
            "backup.out_exists", f"{out} exists; give --force to replace it", {"out": str(out)}
        )
    parent = out.parent
    if not parent.is_dir():
        raise NotFound("backup.out_dir_missing", f"{parent} does not exist", {"dir": str(parent)})
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FailedPrecondition(
            "backup.out_unwritable",
            f"cannot write into {parent} (permission denied); choose another --out",
            {"dir": str(parent)},
        )


def create_backup(
    data_dir: Path,
    out: Path,
    secret: Secret,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> BackupResult:
    """Write an encrypted backup of `data_dir` (stopped) to `out`, all or nothing."""
    data_dir = data_dir.resolve()
    if not data_dir.is_dir() or not is_data_dir(data_dir):
        raise NotFound(
            "backup.no_data_dir",
            f"{data_dir} is not an EdgeKMS data dir (no nats/jetstream, no secrets/);"
            " give the one `kmsctl up --data-dir` uses",
            {"data_dir": str(data_dir)},
        )
    check_out(out, force)
    lock = _lock_stopped_stack(data_dir)
    partial = _partial_path(out)
    try:
        paths = list(_files(data_dir))
        total = sum(p.stat().st_size for p in paths if p.is_file())
        manifest = Manifest(
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            hostname=socket.gethostname(),
            source=str(data_dir),
            files=sum(1 for p in paths if p.is_file()),
            bytes=total,
            streams=_streams(data_dir),
            tpm_keys=_tpm_keys(data_dir),
            version=_version(),
        )
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise FailedPrecondition(
                "backup.out_unwritable",
                f"cannot write {out}: {exc.strerror}",
                {"out": str(out)},
            ) from None
        try:
            with os.fdopen(fd, "wb") as raw:
                _write_archive(raw, data_dir, paths, manifest, secret, total, progress)
                raw.flush()
                os.fsync(raw.fileno())
            partial.replace(out)
        except OSError as exc:
            raise FailedPrecondition(
                "backup.out_unwritable", f"writing {out} failed: {exc.strerror}", {"out": str(out)}
            ) from None
        size = out.stat().st_size
        log_event(
            data_dir, "backup written", out=str(out.resolve()), size=size, files=manifest.files,
            streams=len(manifest.streams), tpm_keys=manifest.tpm_keys,
        )  # fmt: skip
        return BackupResult(out, size, manifest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        lock.release()


def _forget_members(tar: tarfile.TarFile) -> None:
    """TarFile keeps every member it wrote or read; with 50,000 token objects that is tens
    of MiB for nothing, as a stream is never listed back (the list is not in typeshed)."""
    members: list[tarfile.TarInfo] = vars(tar)["members"]
    members.clear()


def _write_archive(
    raw: IO[bytes],
    root: Path,
    paths: list[Path],
    manifest: Manifest,
    secret: Secret,
    total: int,
    progress: Progress | None,
) -> None:
    writer = BackupWriter(raw, secret)
    buffered = io.BufferedWriter(writer, buffer_size=256 * 1024)
    with tarfile.open(fileobj=buffered, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        body = json.dumps(manifest.to_dict(), indent=2).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(body)
        info.mode = 0o600
        tar.addfile(info, io.BytesIO(body))
        done = 0
        for path in paths:
            info = tar.gettarinfo(str(path), arcname=path.relative_to(root).as_posix())
            # Owners are this machine's; the restoring user owns what it restores.
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isreg():
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
                done += info.size
                if progress is not None:
                    progress(done, total)
            else:
                tar.addfile(info)
            _forget_members(tar)
    buffered.flush()
    writer.close()


# -- restore ------------------------------------------------------------------------


@dataclass
class RestoreResult:
    data_dir: Path
    manifest: Manifest
    replaced: bool


def _check_member(member: tarfile.TarInfo) -> None:
    name = PurePosixPath(member.name)
    if (
        name.is_absolute()
        or ".." in name.parts
        or not (member.isreg() or member.isdir())
        or (name.parts and name.parts[0] in EXCLUDED)
    ):
        raise InvalidArgument(
            "backup.corrupt", f"the backup holds an entry no backup makes: {member.name!r}"
        )


def _open(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise NotFound("backup.not_found", f"{path} does not exist", {"file": str(path)}) from None
    except OSError as exc:
        raise FailedPrecondition(
            "backup.unreadable", f"cannot read {path}: {exc.strerror}", {"file": str(path)}
        ) from None


def _read_manifest(tar: tarfile.TarFile, members: Iterator[tarfile.TarInfo]) -> Manifest:
    first = next(members, None)
    if first is None or first.name != MANIFEST or not first.isreg():
        raise InvalidArgument("backup.corrupt", "the backup has no manifest")
    fh = tar.extractfile(first)
    assert fh is not None
    try:
        data = json.loads(fh.read())
    except ValueError as exc:
        raise InvalidArgument(
            "backup.corrupt", f"the backup's manifest is damaged: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise InvalidArgument("backup.corrupt", "the backup's manifest is damaged")
    return Manifest.from_dict(data)


def verify_backup(path: Path, secret: Secret, progress: Progress | None = None) -> Manifest:
    """Read the whole file, checking every chunk's tag and every archive entry, writing
    nothing: the first pass of a restore, and `kmsctl restore --check`."""
    total = path.stat().st_size if path.exists() else 0
    with _open(path) as src:
        reader = BackupReader(src, secret)
        buffered = io.BufferedReader(reader, buffer_size=256 * 1024)
        try:
            with tarfile.open(fileobj=buffered, mode="r|") as tar:
                members = iter(tar)
                manifest = _read_manifest(tar, members)
                for member in members:
                    _check_member(member)
                    _forget_members(tar)
                    if progress is not None:
                        progress(src.tell(), total)
        except tarfile.TarError as exc:
            raise InvalidArgument(
                "backup.corrupt", f"the backup's archive is damaged: {exc}"
            ) from None
        reader.finish()
    return manifest


def check_target(target: Path, force: bool) -> bool:
    """Whether the target holds something to replace; AlreadyExists without --force."""
    if target.exists() and not target.is_dir():
        raise InvalidArgument("restore.not_a_dir", f"{target} exists and is not a directory")
    occupied = target.is_dir() and any(target.iterdir())
    if occupied and not force:
        raise AlreadyExists(
            "restore.data_dir_exists",
            f"{target} is not empty; restore into a new --data-dir, or give --force to"
            " replace what is there (a running stack there is never replaced)",
            {"data_dir": str(target)},
        )
    return occupied


def restore_backup(
    path: Path,
    target: Path,
    secret: Secret,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> RestoreResult:
    """Put the backup at `path` into `target`: verified first, then extracted beside it
    and renamed into place. A non-empty target is replaced only with `force`, and never
    while a `kmsctl up` holds it."""
    target = target.absolute()
    occupied = check_target(target, force)
    lock = (
        _lock_stopped_stack(target, "restore.stack_running")
        if occupied and is_data_dir(target)
        else None
    )
    try:
        manifest = verify_backup(path, secret, progress)
        parent = target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            staging = Path(os.path.join(parent, f".{target.name}.restore-{os.getpid()}"))
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(mode=0o700)
        except OSError as exc:
            raise FailedPrecondition(
                "restore.unwritable",
                f"cannot write into {parent}: {exc.strerror}",
                {"dir": str(parent)},
            ) from None
        try:
            _extract(path, staging, secret)
            for name in ("run", "logs"):
                (staging / name).mkdir(mode=0o700, exist_ok=True)
            # Locked before it becomes the target (the flock follows the file through
            # the rename), so no `kmsctl up` starts on it until it is complete.
            new_lock = stacklock.acquire(staging / "run")
            try:
                if occupied:
                    _swap_in(staging, target)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        target.rmdir()  # empty: replaced by the rename
                    staging.rename(target)
            finally:
                new_lock.release()
        except OSError as exc:
            raise FailedPrecondition(
                "restore.unwritable", f"restoring into {target} failed: {exc.strerror}"
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if lock is not None:
            lock.release()
    log_event(
        target, "restored", file=str(path.resolve()), created=manifest.created,
        source=manifest.source, hostname=manifest.hostname, replaced=occupied,
        tpm_keys=manifest.tpm_keys,
    )  # fmt: skip
    return RestoreResult(target, manifest, occupied)


def _swap_in(staging: Path, target: Path) -> None:
    """Put `staging` where `target` is, then move the target's own TPM (swtpm/) and logs
    into it: the backup has neither, and a development TPM thrown away takes its keys
    with it. Until the swap the old dir is whole; if the swap fails it is put back."""
    old = Path(f"{staging}.old")
    target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        old.rename(target)
        raise
    for name in KEPT_ON_REPLACE:
        if (old / name).is_dir():
            shutil.rmtree(target / name, ignore_errors=True)
            (old / name).rename(target / name)
    shutil.rmtree(old, ignore_errors=True)


def _extract(path: Path, staging: Path, secret: Secret) -> None:
    with _open(path) as src:
        reader = BackupReader(src, secret)
        buffered = io.BufferedReader(reader, buffer_size=256 * 1024)
        try:
            with tarfile.open(fileobj=buffered, mode="r|") as tar:
                members = iter(tar)
                _read_manifest(tar, members)
                for member in members:
                    _check_member(member)
                    tar.extract(member, staging, filter="tar")
                    _forget_members(tar)
        except tarfile.TarError as exc:
            raise InvalidArgument(
                "backup.corrupt", f"the backup's archive is damaged: {exc}"
            ) from None
        reader.finish()
