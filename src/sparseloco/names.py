"""Canonical parameter names: a parameter's wire identity, whatever wraps the model.

Peers identify tensors by name, so the name must not depend on how a peer runs its model.
Wrappers add module levels to the names of ``named_parameters()`` without changing the model:

* ``torch.compile``: ``_orig_mod.`` (in front, or in front of a compiled submodule's names);
* DDP and ``torch.nn.DataParallel``: a leading ``module.``;
* FSDP1 (``FullyShardedDataParallel``): ``_fsdp_wrapped_module.`` before every wrapped module;
* activation checkpointing (``checkpoint_wrapper``): ``_checkpoint_wrapped_module.``.

FSDP2 (``fully_shard``) keeps the names. :func:`canonical_name` drops every ``_orig_mod``,
``_fsdp_wrapped_module`` and ``_checkpoint_wrapped_module`` component wherever it stands, and
``module`` components only at the front: deeper down ``module`` may be a real submodule, at
the front it is DDP's (a model whose own top-level submodule is called ``module`` loses that
component on every peer alike, so peers still agree; a collision is an error).
"""

from __future__ import annotations

from sparseloco.errors import ConfigError

#: components inserted by wrappers, dropped wherever they appear
WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
#: components inserted by wrappers in front of the names only (DDP, DataParallel)
LEADING_WRAPPER_COMPONENTS = frozenset({"module"})


def canonical_name(name: str) -> str:
    """The wire name of a parameter called ``name`` by ``named_parameters()``.

    ``canonical_name("module._orig_mod.h.0._checkpoint_wrapped_module.attn.weight")`` is
    ``"h.0.attn.weight"``. Raises :class:`ConfigError` if nothing but wrappers is left.
    """
    parts = [c for c in name.split(".") if c not in WRAPPER_COMPONENTS]
    start = 0
    while start < len(parts) - 1 and parts[start] in LEADING_WRAPPER_COMPONENTS:
        start += 1
    if not parts:
        raise ConfigError(f"parameter name {name!r} consists only of wrapper prefixes")
    return ".".join(parts[start:])
