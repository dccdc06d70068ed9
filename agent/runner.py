"""The agent's loop: passes over the items that are due, the reload commands after a
change, retries with backoff, the state file, and the signals.

* SIGTERM / SIGINT: finish the item in hand, write the state, exit 0.
* SIGHUP: read the config again; a file that does not load is logged and the old config
  kept. New items are due at once, removed ones are forgotten.
* `once`: one pass over every due item, then exit: 0 if every item ended well, else the
  exit code of the first failure (kmsctl's: 8 the KMS is away, 6 a reload command
  failed, 3 bad input, ...).

One connection to the KMS (KMSClient) is kept between passes and dropped after a
failure that says the KMS is away, so the next try dials again instead of waiting for
gRPC's own reconnect backoff (up to two minutes).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from pathlib import Path
from types import FrameType

from agent import crl as crl_files
from agent.certs import keep_cert
from agent.config import AgentConfig, CertItem, CrlItem, IdentityItem, load_config
from agent.identity import keep_identity
from agent.reload import run_reload
from agent.schedule import crl_refresh_time, retry_time
from agent.state import ItemState, iso, load_state, save_state
from edgekms import errors
from edgekms.logs import fields
from mgmt.client import KMSClient

log = logging.getLogger("agent")

Item = IdentityItem | CertItem | CrlItem

# The longest single wait: a clock that jumps (NTP on a board that booted in 1970) is
# noticed within this.
MAX_SLEEP = 30.0
# Deadline of each KMS call made by the agent.
CALL_TIMEOUT = 20.0

# Exit codes as mgmt.cli.common.ExitCode numbers them (not imported: it imports click).
EXIT_BY_CODE = {
    "ERROR_CODE_INVALID_ARGUMENT": 3,
    "ERROR_CODE_NOT_FOUND": 4,
    "ERROR_CODE_ALREADY_EXISTS": 5,
    "ERROR_CODE_FAILED_PRECONDITION": 6,
    "ERROR_CODE_PERMISSION_DENIED": 7,
    "ERROR_CODE_UNAUTHENTICATED": 7,
    "ERROR_CODE_UNAVAILABLE": 8,
    "ERROR_CODE_DEADLINE_EXCEEDED": 8,
    "ERROR_CODE_RESOURCE_EXHAUSTED": 8,
}
EXIT_INTERNAL = 9
# KMS failures after which the connection is dialled again.
_DIAL_AGAIN = frozenset(
    {"ERROR_CODE_UNAVAILABLE", "ERROR_CODE_DEADLINE_EXCEEDED", "ERROR_CODE_UNAUTHENTICATED"}
)


def exit_code_for(exc: errors.KMSError) -> int:
    return EXIT_BY_CODE.get(exc.code_name, EXIT_INTERNAL)


def _event(level: int, event: str, **values: object) -> None:
    """One structured line: the event is the message, its details are fields (issue 14:
    no logfmt inside `msg`; a value with spaces, an error's text, broke it)."""
    log.log(level, event, extra=fields(event=event, **values))


class Agent:
    """Keeps the items of one config file fresh. Not thread-safe: one loop."""

    def __init__(self, config: AgentConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.states: dict[str, ItemState] = {}
        self._kms: KMSClient | None = None
        self._wake = threading.Event()
        self._stop = False
        self._reload_config = False
        self._sync_states(load_state(config.state_file))

    # -- plumbing -----------------------------------------------------------------------

    def _sync_states(self, known: dict[str, ItemState]) -> None:
        fresh: dict[str, ItemState] = {}
        for item in self.config.items:
            found = known.get(item.name)
            fresh[item.name] = (
                found
                if found is not None and found.kind == item.kind
                else (ItemState(kind=item.kind))
            )
        self.states = fresh

    def _client(self) -> KMSClient:
        if self._kms is None:
            self._kms = KMSClient.from_config(self.config.client_config, timeout=CALL_TIMEOUT)
        return self._kms

    def _drop_client(self) -> None:
        if self._kms is not None:
            self._kms.close()
            self._kms = None

    def close(self) -> None:
        self._drop_client()

    def request_stop(self) -> None:
        self._stop = True
        self._wake.set()

    def request_reload(self) -> None:
        self._reload_config = True
        self._wake.set()

    def install_signals(self) -> None:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.request_reload()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def reload_config(self) -> None:
        self._reload_config = False
        try:
            config = load_config(self.config.path)
        except errors.KMSError as exc:
            _event(
                logging.ERROR,
                "agent_config_rejected",
                reason=exc.reason,
                error=exc.message,
            )
            return
        old_client = self.config.client_config
        self.config = config
        self._sync_states(self.states)
        if config.client_config != old_client:
            self._drop_client()
        _event(
            logging.INFO,
            "agent_config_reloaded",
            items=len(config.items),
        )

    # -- one item -----------------------------------------------------------------------

    def _work(self, item: Item, state: ItemState, now: float) -> bool:
        """Do the item's work if due; True if its files changed."""
        if isinstance(item, IdentityItem | CertItem):
            if isinstance(item, IdentityItem):
                outcome = keep_identity(item, now, CALL_TIMEOUT)
                if outcome.changed:
                    self._drop_client()  # the next call dials with the new certificate
            else:
                outcome = keep_cert(item, self._client, now)
            state.serial = outcome.serial
            state.not_after = outcome.not_after
            state.work_due = outcome.due
            if outcome.changed:
                _event(
                    logging.INFO,
                    f"agent_cert_{outcome.action}",
                    item=item.name,
                    serial=outcome.serial,
                    not_after=iso(outcome.not_after),
                    renew_at=iso(outcome.due),
                    kind=item.kind,
                )
            return outcome.changed
        if now < state.work_due:
            return False  # not due (a pending reload is run by the caller)
        result = crl_files.keep_crl(item, self._client(), now)
        state.crl_numbers = list(result.crl_numbers)
        state.next_update = result.next_update
        state.work_due = crl_refresh_time(
            now, result.next_update, self.config.min_interval, self.config.crl_max_interval
        )
        _event(
            logging.INFO,
            "agent_crl_updated" if result.changed else "agent_crl_checked",
            item=item.name,
            crl_numbers=list(result.crl_numbers),
            next_update=iso(result.next_update),
            refresh_at=iso(state.work_due),
            changed=result.changed,
            path=str(item.path),
        )
        return result.changed

    def _reload_env(self, item: Item) -> dict[str, str]:
        env = {"EDGEKMS_AGENT_ITEM": item.name, "EDGEKMS_AGENT_KIND": item.kind}
        if isinstance(item, IdentityItem):
            env["EDGEKMS_AGENT_CLIENT_CONFIG"] = str(item.client_config)
        elif isinstance(item, CertItem):
            env["EDGEKMS_AGENT_CERT"] = str(item.cert)
            env["EDGEKMS_AGENT_KEY"] = str(item.key)
            if item.chain is not None:
                env["EDGEKMS_AGENT_CHAIN"] = str(item.chain)
        else:
            env["EDGEKMS_AGENT_CRL"] = str(item.path)
        return env

    def tick(self, item: Item, now: float) -> errors.KMSError | None:
        """One pass over one item; the error it ended with, if any."""
        state = self.states[item.name]
        try:
            try:
                if self._work(item, state, now):
                    state.last_change = now
                    state.reload_pending = bool(item.exec)
            except errors.KMSError:
                raise
            except Exception as exc:
                # A bug or an OS surprise in one item must not end the loop for all of
                # them: logged with its traceback, retried like any failure.
                log.exception("event=agent_unexpected item=%s", item.name)
                raise errors.Internal("agent.unexpected", f"{type(exc).__name__}: {exc}") from exc
            if state.reload_pending and not item.exec:
                state.reload_pending = False  # the command was taken out of the config
            if state.reload_pending:
                output = run_reload(item.exec, self._reload_env(item), self.config.exec_timeout)
                state.reload_pending = False
                _event(
                    logging.INFO,
                    "agent_reload_ok",
                    item=item.name,
                    program=item.exec[0],
                    output=output,
                )
        except errors.KMSError as exc:
            state.failures += 1
            state.last_error = {"reason": exc.reason, "message": exc.message, "at": iso(now) or ""}
            if exc.code_name in _DIAL_AGAIN:
                self._drop_client()
            deadline = state.next_update if isinstance(item, CrlItem) else state.not_after
            state.next_due = retry_time(
                now,
                state.failures,
                self.config.retry_initial,
                self.config.retry_max,
                deadline,
                self.rng,
            )
            event = "agent_reload_failed" if exc.reason == "agent.reload_failed" else "agent_retry"
            _event(
                logging.WARNING,
                event,
                item=item.name,
                reason=exc.reason,
                error=exc.message,
                failures=state.failures,
                retry_in=round(state.next_due - now, 1),
                retry_at=iso(state.next_due),
            )
            return exc
        state.failures = 0
        state.last_error = None
        state.last_ok = now
        # Never two passes over one item closer than min_interval (a renewal point that
        # a very short lifetime puts in the past at once must not spin).
        state.next_due = max(state.work_due, now + self.config.min_interval)
        return None

    # -- passes -------------------------------------------------------------------------

    def run_pass(self, now: float | None = None) -> list[errors.KMSError]:
        """Every due item once; the errors they ended with."""
        failed = []
        for item in self.config.items:
            if self._stop:
                break
            now = time.time()
            if self.states[item.name].next_due <= now:
                err = self.tick(item, now)
                if err is not None:
                    failed.append(err)
        try:
            save_state(self.config.state_file, self.states, time.time())
        except errors.KMSError as exc:  # a full disk must not stop the renewals
            _event(
                logging.ERROR,
                "agent_state_unsaved",
                reason=exc.reason,
                error=exc.message,
            )
        return failed

    def run_once(self) -> int:
        failed = self.run_pass()
        self.close()
        return exit_code_for(failed[0]) if failed else 0

    def run_forever(self) -> int:
        _event(
            logging.INFO,
            "agent_started",
            config=str(self.config.path),
            items=len(self.config.items),
        )
        try:
            while not self._stop:
                if self._reload_config:
                    self.reload_config()
                self.run_pass()
                if self._stop:
                    break
                next_due = min(s.next_due for s in self.states.values())
                wait = min(MAX_SLEEP, max(0.0, next_due - time.time()))
                self._wake.wait(wait)
                self._wake.clear()
        finally:
            self.close()
        _event(logging.INFO, "agent_stopped")
        return 0


def open_agent(config_path: Path) -> Agent:
    return Agent(load_config(config_path))
