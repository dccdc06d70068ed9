"""The SpiffeWorkloadAPI gRPC service (edgekms/v1/workload.proto, the specification's).

Every call must carry the metadata `workload.spiffe.io: true` (INVALID_ARGUMENT
otherwise, as the specification says: it shows the call was meant for a Workload API,
not forwarded there by a confused proxy). The caller is the one the gate attested for
this connection; one that matches no entry gets PERMISSION_DENIED and nothing else.
FetchX509SVID, FetchX509Bundles and FetchJWTBundles are streams: a new message goes out
whenever what they carry changes (rotation, a bundle change, an entry added or
removed), and a device refused by the KMS ends them with PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import struct_pb2

from edgekms.errors import InvalidArgument, KMSError, PermissionDenied
from edgekms.v1 import ca_pb2
from edgekms.v1 import workload_pb2 as wl
from edgekms.v1 import workload_pb2_grpc as wl_grpc
from spiffe_agent import jwtsvid
from spiffe_agent.attest import Caller
from spiffe_agent.svids import Identities

log = logging.getLogger(__name__)

HEADER = "workload.spiffe.io"


def td_id(trust_domain: str) -> str:
    """How bundles are keyed on the wire: the trust domain's SPIFFE ID."""
    return f"spiffe://{trust_domain}"


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: KMSError) -> None:
    await context.abort(exc.grpc_status, f"{exc.reason}: {exc.message}")


class WorkloadAPI(wl_grpc.SpiffeWorkloadAPIServicer):
    def __init__(
        self, identities: Identities, caller_of: Callable[[str], Caller | KMSError | None]
    ):
        self.ids = identities
        self.caller_of = caller_of

    # ---- checks every call makes -----------------------------------------------------

    def _caller(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> Caller:
        metadata = {k: v for k, v in (context.invocation_metadata() or ())}
        if metadata.get(HEADER) != "true":
            raise InvalidArgument(
                "spiffe.header_missing", "security header missing from request (workload.spiffe.io)"
            )
        found = self.caller_of(context.peer())
        if found is None:
            raise PermissionDenied("spiffe.unattested", "this connection was not attested")
        if isinstance(found, KMSError):
            raise found
        if self.ids.state.denied is not None:
            raise PermissionDenied(
                "spiffe.device_refused",
                f"the KMS refuses this device ({self.ids.state.denied.reason})",
            )
        if not self.ids.state.synced:
            raise _unavailable()
        log.debug("event=spiffe_call method=%s pid=%d uid=%d", method, found.pid, found.uid)
        return found

    def _entries(self, caller: Caller) -> list[ca_pb2.SpiffeEntry]:
        entries = self.ids.matching(caller.selectors)
        if not entries:
            log.info(
                "event=spiffe_no_identity pid=%d uid=%d gid=%d exe=%s unit=%s",
                caller.pid, caller.uid, caller.gid, caller.exe, caller.unit,
            )  # fmt: skip
            raise PermissionDenied("spiffe.no_identity", "no identity issued")
        return entries

    def _federated_x509(self) -> dict[str, bytes]:
        """The foreign trust domains' X.509 authorities (kmsctl spiffe federate)."""
        bundle = self.ids.state.bundle
        if bundle is None:
            return {}
        return {
            td_id(f.trust_domain): b"".join(f.x509_authorities_der)
            for f in bundle.federated
            if f.x509_authorities_der
        }

    def _x509_bundles(self) -> dict[str, bytes]:
        bundle = self.ids.state.bundle
        if bundle is None:
            return {}
        return {
            td_id(bundle.trust_domain): b"".join(bundle.x509_authorities_der),
            **self._federated_x509(),
        }

    def _jwt_bundles(self) -> dict[str, bytes]:
        bundle = self.ids.state.bundle
        if bundle is None:
            return {}
        return {
            td_id(bundle.trust_domain): bundle.jwks,
            **{td_id(f.trust_domain): f.jwks for f in bundle.federated},
        }

    async def _stream(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
        build: Callable[[Caller], Any],
    ) -> AsyncIterator[Any]:
        """Send `build(caller)` now and again whenever it changes; end with the error
        that makes it impossible (a refused device, an entry removed)."""
        try:
            caller = self._caller(context, method)
        except KMSError as exc:
            await _abort(context, exc)
            return
        last = b""
        while True:
            version = self.ids.version
            try:
                if self.ids.state.denied is not None:
                    raise PermissionDenied(
                        "spiffe.device_refused",
                        f"the KMS refuses this device ({self.ids.state.denied.reason})",
                    )
                message = await build(caller)
            except KMSError as exc:
                log.info("event=spiffe_stream_ended method=%s reason=%s", method, exc.reason)
                await _abort(context, exc)
                return
            data = message.SerializeToString(deterministic=True)
            if data != last:
                last = data
                yield message
            await self.ids.wait_change(version)

    # ---- the RPCs ------------------------------------------------------------------

    async def _x509_response(self, caller: Caller) -> wl.X509SVIDResponse:
        entries = self._entries(caller)
        # Minted side by side: a workload with many entries waits for the slowest, not
        # for the sum (each mint is a round trip to the token).
        held = await asyncio.gather(*(self.ids.svid(e) for e in entries))
        svids = []
        for entry, svid in zip(entries, held, strict=True):
            svids.append(
                wl.X509SVID(
                    spiffe_id=entry.spiffe_id,
                    x509_svid=b"".join(svid.chain_der),
                    x509_svid_key=svid.key_der,
                    bundle=b"".join(self.ids.state.bundle.x509_authorities_der)
                    if self.ids.state.bundle
                    else b"",
                )
            )
        return wl.X509SVIDResponse(svids=svids, federated_bundles=self._federated_x509())

    async def FetchX509SVID(
        self, request: wl.X509SVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[wl.X509SVIDResponse]:
        async for message in self._stream(context, "FetchX509SVID", self._x509_response):
            yield message

    async def FetchX509Bundles(
        self, request: wl.X509BundlesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[wl.X509BundlesResponse]:
        async def build(caller: Caller) -> wl.X509BundlesResponse:
            self._entries(caller)
            return wl.X509BundlesResponse(bundles=self._x509_bundles())

        async for message in self._stream(context, "FetchX509Bundles", build):
            yield message

    async def FetchJWTBundles(
        self, request: wl.JWTBundlesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[wl.JWTBundlesResponse]:
        async def build(caller: Caller) -> wl.JWTBundlesResponse:
            self._entries(caller)
            return wl.JWTBundlesResponse(bundles=self._jwt_bundles())

        async for message in self._stream(context, "FetchJWTBundles", build):
            yield message

    async def FetchJWTSVID(
        self, request: wl.JWTSVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> wl.JWTSVIDResponse:
        try:
            caller = self._caller(context, "FetchJWTSVID")
            audience = list(request.audience)
            if not audience:
                raise InvalidArgument("spiffe.audience_missing", "audience must be specified")
            entries = self._entries(caller)
            if request.spiffe_id:
                entries = [e for e in entries if e.spiffe_id == request.spiffe_id]
                if not entries:
                    raise PermissionDenied(
                        "spiffe.no_identity", f"no identity {request.spiffe_id[:120]} issued"
                    )
            svids = [
                wl.JWTSVID(spiffe_id=e.spiffe_id, svid=await self.ids.jwt(e, audience))
                for e in entries
            ]
        except KMSError as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from None
        return wl.JWTSVIDResponse(svids=svids)

    async def ValidateJWTSVID(
        self, request: wl.ValidateJWTSVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> wl.ValidateJWTSVIDResponse:
        try:
            caller = self._caller(context, "ValidateJWTSVID")
            self._entries(caller)
            bundles = {
                td.removeprefix("spiffe://"): jwks for td, jwks in self._jwt_bundles().items()
            }
            spiffe_id, claims = jwtsvid.validate(request.svid, request.audience, bundles)
        except KMSError as exc:
            log.info("event=spiffe_jwt_refused reason=%s", exc.reason)
            await _abort(context, exc)
            raise AssertionError("unreachable") from None
        struct = struct_pb2.Struct()
        struct.update(claims)
        return wl.ValidateJWTSVIDResponse(spiffe_id=spiffe_id, claims=struct)


def _unavailable() -> KMSError:
    from edgekms.errors import Unavailable

    return Unavailable("spiffe.not_ready", "the agent has not reached the KMS yet: try again")
