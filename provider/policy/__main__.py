"""Serves Ember's policies to the Pulumi engine (it starts this file and talks to it over gRPC)."""

from pulumi_policy import EnforcementLevel, PolicyPack

from ember.provider.policy.policies import POLICIES

PolicyPack("ember", POLICIES, enforcement_level=EnforcementLevel.MANDATORY,
           description="Ember's domain rules (mandatory) and configurable guardrails")
