"""The layers of pac, lowest first: a module may import from its own layer or a lower one, never a higher one.

Plain data, checked by tests/test_layers.py and quoted by docs/architecture.md ("Layers"). A module belongs to
the layer of the longest prefix below that names it (a prefix is a dotted module name: `pac.cache` covers
`pac.cache.reader`, not `pac.cachex`); a module no prefix names fails the test until it is placed here.

Within layer 1 the packages stay independent, with one exception that runs plainly downward: the cache stores
tokenised data (pac.cache may import pac.data, not the reverse). net and plan import neither.
"""

from __future__ import annotations

LAYERS: dict[str, int] = {
    "pac": 0,  # the package itself: a version string
    "pac.errors": 0,
    "pac.layers": 0,
    "pac.argtypes": 2,  # option types (layer lists parse with pac.plan's parser); read by method registrations
    "pac.data": 1,
    "pac.cache": 1,
    "pac.net": 1,
    "pac.plan": 1,
    "pac.models": 2,
    "pac.methods": 3,
    "pac.runconfig": 3,  # a run's configuration: the method's options come from the registry
    # What a run does with a method (build, train on its sources, save, load): the train layer's, named lazily
    # by the method's registration (pac.methods.registry.lazy) so that registering needs neither torch nor them.
    "pac.methods.parallel_adapters.run": 4,
    "pac.methods.lora.run": 4,
    "pac.methods.boundary.run": 4,
    "pac.methods.full.run": 4,
    "pac.methods.taskedge.run": 4,
    "pac.methods.zo.step": 4,  # the step interface is the train layer's
    "pac.methods.zo.run": 4,
    "pac.methods.galore.run": 4,
    "pac.methods.head_bn.run": 4,
    "pac.retain": 3,  # retain-mix answers: prompts, cached base-model answers
    "pac.generate": 3,  # decoding with a trained adapter
    "pac.model_card": 3,  # README and GGUF notes for an exported adapter
    "pac.runtime": 4,  # training and pipelines on one machine or several
    # `pac profile`: each method's step measured in a fresh process that has loaded what `pac train` loads (the API)
    "pac.runtime.step_profile": 6,
    "pac.runtime.collaborative": 5,
    "pac.runtime.coordinator": 5,
    "pac.runtime.peer": 5,
    "pac.workflow": 6,
    "pac.report": 6,  # `pac report`: a run directory drawn (the benchmarks draw with its helpers too)
    "pac.api": 6,
    "pac.cli": 7,
    "launcher": 7,
}

LAYER_NAMES: dict[int, str] = {
    0: "errors",
    1: "data, cache, net, plan",
    2: "models",
    3: "methods",
    4: "train/pipeline",
    5: "cluster runtime",
    6: "api",
    7: "cli, launcher",
}

# Imports between layer-1 packages that are allowed (importer package -> imported package).
LAYER_ONE_DOWNWARD: frozenset[tuple[str, str]] = frozenset({("pac.cache", "pac.data")})


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name: that of the longest prefix in LAYERS naming it, None if none does."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        layer = LAYERS.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None
