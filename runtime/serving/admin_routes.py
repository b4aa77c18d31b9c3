"""The deployment owner's routes: list, load and unload addons, and reconcile with the store's desired set."""

from __future__ import annotations

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
    replica.owner(request)
    engine = replica.ready().engine
    return {"served": engine.served_addons, "slots": list(engine.lora.slots) if engine.lora else [],
            "failed": replica.adapter_failures}


@router.post("/adapters", openapi_extra=documented_body(AdapterLoadRequest))
async def load_adapter(request: Request, replica: Replica = Depends(replica_of)) -> dict:
    replica.owner(request)
    body = await parse_body(request, AdapterLoadRequest)

    source = replica.addon_source(body.name)

    def add(engine: Engine) -> list[str]:
        if engine.lora is None:
            raise APIError(400, "this deployment serves no addons (max_loras=0)")
        try:
            engine.lora.add(body.name, source)
        except AdapterError as exc:
            raise APIError(400, str(exc), param="name", code="bad_adapter") from None
        replica.count_adapters(engine)
        return engine.served_addons

    return {"served": await replica.ready().call(add)}


@router.delete("/adapters/{name:path}")
async def unload_adapter(name: str, request: Request, replica: Replica = Depends(replica_of)) -> dict:
    replica.owner(request)

    def remove(engine: Engine) -> list[str]:
        if engine.lora is None or not engine.lora.loaded(name):
            raise APIError(404, f"addon {name!r} is not loaded", param="name", code="model_not_found")
        engine.lora.remove(name)
        replica.count_adapters(engine)
        return engine.served_addons

    return {"served": await replica.ready().call(remove)}


@router.post("/reconcile")
async def reconcile(request: Request, replica: Replica = Depends(replica_of)) -> dict:
    replica.owner(request)
    return await replica.reconcile()
