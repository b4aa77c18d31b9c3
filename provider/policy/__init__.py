"""Ember's CrossGuard policy pack: `pulumi preview --policy-pack <this folder>` (or `ember preview --policy-pack`).

The policies live in `policies.py`; `__main__.py` serves them to the engine.
"""
