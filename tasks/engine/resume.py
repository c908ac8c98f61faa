"""The one resume rule: a run continues from ``last.pt`` only when it is the same run.

"The same" means the same config, apart from runtime fields that do not change what is computed
(device, worker counts, logging), and the same digest for every input table and init checkpoint.
Anything else is refused with a message that names what differs, so an old run is never silently
continued on new data.
"""

from __future__ import annotations

from typing import Any, Mapping

# Fields that may change between a run and its resume (they change where or how fast, not what).
RUNTIME_FIELDS = frozenset({"device", "num_workers", "workers", "memory_limit_mb", "eval_batch_size", "log_every",
                            "threads"})


class ResumeMismatch(ValueError):
    """An output folder holds another run than the one asked for."""


def fingerprint(config: Mapping[str, Any], inputs: Mapping[str, str], runtime: frozenset[str] = RUNTIME_FIELDS,
                ) -> dict[str, Any]:
    """What must match for a resume: the config without its runtime fields, and the inputs' digests."""
    return {"config": {k: v for k, v in config.items() if k not in runtime}, "inputs": dict(inputs)}


def check_same_run(saved: Mapping[str, Any], wanted: Mapping[str, Any], out_uri: str) -> None:
    """Raise :class:`ResumeMismatch` naming every config field and input that differs."""
    old_c, new_c = saved.get("config", {}), wanted["config"]
    diff = [f"{k}: {old_c.get(k)!r} -> {new_c.get(k)!r}" for k in sorted(set(old_c) | set(new_c))
            if old_c.get(k) != new_c.get(k)]
    if diff:
        raise ResumeMismatch(
            f"{out_uri} holds a run with a different configuration ({', '.join(diff)}); resume needs the same "
            "settings. Use another output folder, or --no-resume to start over there."
        )
    old_i, new_i = saved.get("inputs", {}), wanted["inputs"]
    if set(old_i) != set(new_i):
        raise ResumeMismatch(
            f"{out_uri} was trained on other inputs ({', '.join(sorted(old_i)) or 'none'}, not "
            f"{', '.join(sorted(new_i)) or 'none'}); use another output folder or --no-resume"
        )
    changed = sorted(k for k in new_i if old_i[k] != new_i[k])
    if changed:
        raise ResumeMismatch(
            f"{out_uri} was trained on other contents of {', '.join(changed)} (rewritten since, or another table); "
            "use another output folder or --no-resume"
        )
