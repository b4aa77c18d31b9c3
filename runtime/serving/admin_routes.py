"""The deployment owner's routes: list, load and unload addons, and reconcile with the store's desired set. Each addon
loaded, unloaded or refused goes to the audit log, its actor the name of the key that asked."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from ember.runtime.engine.engine import Engine
from ember.runtime.lora.adapters import AdapterError
from ember.runtime.serving.bodies import documented_body, parse_body
from ember.runtime.serving.errors import APIError
from ember.runtime.serving.protocol import AdapterLoadRequest
from ember.runtime.serving.replica import Replica, replica_of

router = APIRouter(prefix="/admin")


@router.get("/adapters")
async def list_adapters(request: Request, replica: Replica = Depends(replica_of)) -> dict:
    await replica.owner(request)
    engine = replica.ready().engine
    return {"served": engine.served_addons, "slots": list(engine.lora.slots) if engine.lora else [],
            "failed": replica.adapter_failures}


@router.post("/adapters", openapi_extra=documented_body(AdapterLoadRequest))
async def load_adapter(request: Request, replica: Replica = Depends(replica_of)) -> dict:
    caller = await replica.owner(request)
    body = await parse_body(request, AdapterLoadRequest)

    def add(engine: Engine) -> list[str]:
        if engine.lora is None:
            raise APIError(400, "this deployment serves no addons (max_loras=0)")
        try:
            engine.lora.add(body.name, source)
        except AdapterError as exc:
            raise APIError(400, str(exc), param="name", code="bad_adapter") from None
        replica.count_adapters(engine)
        return engine.served_addons

    try:
        source = replica.addon_source(body.name)
        served = await replica.ready().call(add)
    except APIError as exc:
        if exc.status != 503:  # refused; still loading is no verdict on the addon
            await asyncio.to_thread(replica.audit_refusal, body.name, caller.key_id, exc.message)
        raise
    await asyncio.to_thread(replica.audit, "addon.loaded", body.name, caller.key_id)
    return {"served": served}


@router.delete("/adapters/{name:path}")
async def unload_adapter(name: str, request: Request, replica: Replica = Depends(replica_of)) -> dict:
    caller = await replica.owner(request)

    def remove(engine: Engine) -> list[str]:
        if engine.lora is None or not engine.lora.loaded(name):
            raise APIError(404, f"addon {name!r} is not loaded", param="name", code="model_not_found")
        engine.lora.remove(name)
        replica.count_adapters(engine)
        return engine.served_addons

    served = await replica.ready().call(remove)
    await asyncio.to_thread(replica.audit, "addon.unloaded", name, caller.key_id)
    return {"served": served}


@router.post("/reconcile")
async def reconcile(request: Request, replica: Replica = Depends(replica_of)) -> dict:
    return await replica.reconcile((await replica.owner(request)).key_id)
