"""Shared helper of the training-script tests: a run killed right after a checkpoint."""

from typing import Any, Callable

import pytest


def killed_after_checkpoint(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, run: Callable[[], Any],
                            at_step: int | None = None) -> None:
    """Call run() with owner.<name> (the script's checkpoint save: a `Run.save` method or
    `torch.save`) raising KeyboardInterrupt right after its first real save (at_step: after the
    save of the state at that step), as a run killed then; the save is restored afterwards."""
    real = getattr(owner, name)

    def save_then_die(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        state = next((a for a in args if isinstance(a, dict)), {})
        if at_step is None or state.get("step") == at_step:
            raise KeyboardInterrupt("killed after a checkpoint")

    monkeypatch.setattr(owner, name, save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(owner, name, real)
